"""Federated adaptation's pure parts: the head's gradient, the aggregation rules, outliers, sampling and the
privacy accountant (checked against Google's dp_accounting 0.4.4 RdpAccountant, integer orders 2..256)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edgeops.adapt.aggregate import Update, aggregate, clip, combine, outliers, sample_devices
from edgeops.adapt.artifact import NoHead, find_head
from edgeops.adapt.privacy import epsilon
from edgeops.agent.edgeops_agent import train_head
from edgeops.manifest.models import AdaptSpec


def _loss(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
    z = x @ w + b
    z = z - z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


def test_one_full_batch_step_is_a_step_down_the_cross_entropy_gradient() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), rng.integers(0, 3, 40)
    w, b = rng.normal(size=(6, 3)).astype(np.float32), np.zeros(3, np.float32)
    new_w, new_b = train_head(x, y, w, b, epochs=1, learning_rate=0.1, batch_size=40)
    eps, numeric = 1e-5, np.zeros_like(w, dtype=np.float64)
    for i in range(6):
        for j in range(3):
            up, down = w.astype(np.float64).copy(), w.astype(np.float64).copy()
            up[i, j] += eps
            down[i, j] -= eps
            numeric[i, j] = (_loss(x, y, up, b) - _loss(x, y, down, b)) / (2 * eps)
    assert np.allclose((w - new_w) / 0.1, numeric, atol=1e-4)
    assert _loss(x, y, new_w, new_b) < _loss(x, y, w, b)


def test_fedprox_pulls_towards_the_starting_tensors() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(64, 5)), rng.integers(0, 4, 64)
    w, b = np.zeros((5, 4), np.float32), np.zeros(4, np.float32)
    free, _ = train_head(x, y, w, b, epochs=20, learning_rate=0.5)
    held, _ = train_head(x, y, w, b, epochs=20, learning_rate=0.5, proximal_mu=1.0)
    assert np.linalg.norm(held) < np.linalg.norm(free)


def _updates(vectors: list[list[float]], samples: list[int] | None = None) -> list[Update]:
    return [Update(f"d{i}", np.array(v, dtype=np.float64), (samples or [1] * len(vectors))[i])
            for i, v in enumerate(vectors)]


def test_fedavg_weighs_by_samples_and_the_robust_rules_ignore_one_wild_value() -> None:
    updates = _updates([[1.0, 0.1], [3.0, 0.2], [2.0, 0.3], [2.0, 0.4], [100.0, 0.25]], [1, 3, 1, 1, 1])
    mean, _ = combine(updates, "fedavg")
    assert mean[0] == pytest.approx((1 + 9 + 2 + 2 + 100) / 7)
    median, cut = combine(updates, "median")
    assert median[0] == 2.0 and cut["d4"] > 0
    trimmed, cut = combine(updates, "trimmed_mean", trim_fraction=0.2)
    assert trimmed[0] == pytest.approx((2 + 2 + 3) / 3) and cut["d4"] == pytest.approx(0.5)


def test_a_long_or_opposite_update_is_excluded_and_named() -> None:
    honest = [[1.0, 0.1], [0.9, 0.0], [1.1, -0.1], [1.0, 0.05]]
    found = outliers(_updates(honest + [[-1.0, 0.0]]), max_norm_ratio=6, min_cosine=-0.5)
    assert set(found) == {"d4"} and "points away" in found["d4"]
    found = outliers(_updates(honest + [[30.0, 0.0]]), max_norm_ratio=6, min_cosine=-0.5)
    assert set(found) == {"d4"} and "median" in found["d4"]
    assert outliers(_updates(honest[:2]), 6, 0.9) == {}  # two updates: no majority to judge by


def test_the_controller_clips_again_and_noise_makes_every_device_weigh_the_same() -> None:
    updates = _updates([[3.0, 4.0], [0.3, 0.4], [0.6, 0.8]], [100, 1, 1])
    plain = aggregate(updates, "fedavg", clip_norm=1.0)
    assert plain.clipped == ("d0",) and np.linalg.norm(plain.vector) <= 1.0 + 1e-6
    noisy = aggregate(updates, "fedavg", clip_norm=1.0, noise_multiplier=1e-9, rng=np.random.default_rng(0))
    assert noisy.noise_std == pytest.approx(1e-9 / 3)
    assert noisy.vector == pytest.approx(np.array([0.6 + 0.3 + 0.6, 0.8 + 0.4 + 0.8]) / 3, abs=1e-6)


@given(st.lists(st.lists(st.floats(-50, 50), min_size=3, max_size=3), min_size=1, max_size=9),
       st.sampled_from(["fedavg", "fedprox", "trimmed_mean", "median"]), st.floats(0.1, 10))
@settings(max_examples=60, deadline=None)
def test_an_aggregate_is_never_longer_than_the_clipping_norm(vectors: list[list[float]], method: str,
                                                             norm: float) -> None:
    result = aggregate(_updates(vectors), method, clip_norm=norm)  # type: ignore[arg-type]
    assert np.linalg.norm(result.vector) <= norm * (1 + 1e-5)
    assert set(result.used) | set(result.excluded) == {f"d{i}" for i in range(len(vectors))}


def test_clip_keeps_short_vectors() -> None:
    assert clip(np.array([0.3, 0.4]), 1.0)[1] is False
    assert np.linalg.norm(clip(np.array([3.0, 4.0]), 1.0)[0]) == pytest.approx(1.0)


def test_sampling_takes_the_fraction_at_least_the_minimum_and_never_more_than_there_are() -> None:
    rng = np.random.default_rng(0)
    names = [f"d{i}" for i in range(10)]
    assert len(sample_devices(names, 0.25, 2, rng)) == 3
    assert len(sample_devices(names, 0.05, 4, rng)) == 4
    assert sample_devices(names[:2], 1.0, 4, rng) == names[:2]


@pytest.mark.parametrize(("q", "sigma", "rounds", "expected"), [
    (1.0, 1.0, 1, 4.752728336819822), (0.5, 1.2, 10, 8.867159637944365),
    (0.25, 2.0, 50, 4.890964173954066), (0.01, 4.0, 10000, 1.0354900660362436)])
def test_epsilon_matches_dp_accounting(q: float, sigma: float, rounds: int, expected: float) -> None:
    assert epsilon(q, sigma, rounds, 1e-5) == pytest.approx(expected, rel=1e-9)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling() -> None:
    assert epsilon(0.5, 1.0, 10, 1e-5) < epsilon(0.5, 1.0, 20, 1e-5)
    assert epsilon(0.5, 2.0, 10, 1e-5) < epsilon(0.5, 1.0, 10, 1e-5)
    assert epsilon(0.1, 1.0, 10, 1e-5) < epsilon(1.0, 1.0, 10, 1e-5)
    assert epsilon(0.5, 0.0, 10, 1e-5) == math.inf and epsilon(0.5, 1.0, 0, 1e-5) == 0.0


def _linear_model(op: str) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((4, 3), np.float32), "W")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "B")
    nodes = [helper.make_node("Relu", ["x"], ["f"])]
    if op == "gemm":
        nodes.append(helper.make_node("Gemm", ["f", "W", "B"], ["logits"]))
    elif op == "matmul":
        nodes += [helper.make_node("MatMul", ["f", "W"], ["m"]), helper.make_node("Add", ["m", "B"], ["logits"])]
    else:
        nodes.append(helper.make_node("MatMul", ["f", "W"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 3])], [w, b])
    return helper.make_model(graph)


def test_the_head_is_found_behind_a_softmax_for_gemm_and_matmul_add() -> None:
    for op in ("gemm", "matmul"):
        head = find_head(_linear_model(op), None, None)
        assert (head.weight, head.bias, head.features, head.transposed, head.inputs, head.classes) == \
            ("W", "B", "f", False, 4, 3)
    with pytest.raises(NoHead, match="bias"):
        find_head(_linear_model("bare"), None, None)
    with pytest.raises(NoHead, match="not the weight"):
        find_head(_linear_model("gemm"), None, ["B", "W"])


def test_the_data_directory_stays_under_the_device_root() -> None:
    for bad in ("/etc", "../secrets", "a/../../b", ""):
        with pytest.raises(ValidationError):
            AdaptSpec(data=bad)
    assert AdaptSpec().data_dir("cam") == "data/cam" and AdaptSpec(data="apps/x/").data_dir("cam") == "apps/x"


def test_a_device_keeps_its_own_head_only_where_its_held_out_samples_say_it_is_better() -> None:
    from edgeops.adapt.aggregate import personal_choices

    chosen = personal_choices({"a": {"samples": 20, "sent_accuracy": 60.0, "trained_accuracy": 90.0},
                               "b": {"samples": 20, "sent_accuracy": 80.0, "trained_accuracy": 80.4},
                               "c": {"samples": 0, "sent_accuracy": None, "trained_accuracy": None},
                               "d": None}, margin=0.5)
    assert list(chosen) == ["a"] and "90.0%" in chosen["a"]
