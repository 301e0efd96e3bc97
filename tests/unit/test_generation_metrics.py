"""Generation quality metrics by hand, the agent's copies held to them, and the gate's generation checks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from edgeops.agent import edgeops_agent as agent
from edgeops.agent import edgeops_gate as gate
from edgeops.metrics import metric_value, perplexity, token_agreement
from edgeops.verify import quality_drop


def test_agreement_counts_the_reference_tokens_only() -> None:
    reference = np.array([[5, 6, 7, -1], [1, 2, -1, -1]])
    predicted = np.array([[5, 0, 7, 9], [1, 2, 3, 4]])  # 4 of the 5 reference tokens; padding is never scored
    assert token_agreement(predicted, reference) == pytest.approx(80.0)
    assert metric_value("agreement", predicted, reference) == pytest.approx(80.0)


def test_perplexity_is_exp_of_the_mean_nll_over_all_tokens() -> None:
    rows = np.array([[math.log(4) * 2, 2], [math.log(2) * 3, 3]])  # nll sums and token counts
    expected = math.exp((2 * math.log(4) + 3 * math.log(2)) / 5)
    assert perplexity(rows) == pytest.approx(expected)
    assert perplexity(np.array([[0.0, 7]])) == 1.0  # a model certain of every token


@pytest.mark.parametrize("metric,outputs,reference", [
    ("agreement", np.array([[3, 4, 5], [6, 7, 0]]), np.array([[3, 4, 9], [6, -1, -1]])),
    ("perplexity", np.array([[12.5, 10], [3.1, 4]]), None),
])
def test_the_agent_scores_generation_like_the_controller(metric, outputs, reference) -> None:
    assert agent.metric_value(metric, outputs, reference) == metric_value(metric, outputs, reference)


def test_perplexity_is_lower_is_better_in_drops_and_golden_checks() -> None:
    assert quality_drop("perplexity", 2.0, 2.2, relative=True) == pytest.approx(10.0)
    goal = SimpleNamespace(metric="perplexity", max_drop=5, drop="relative")
    assert gate.quality_check(goal, 2.05, 2.0)["outcome"] == gate.PASSED   # 2.5% higher
    assert gate.quality_check(goal, 2.2, 2.0)["outcome"] == gate.FAILED    # 10% higher
    assert gate.quality_check(goal, 1.9, 2.0)["outcome"] == gate.PASSED    # better


def _side(per_token_ms: float, ttft_ms: float, generations: int = 12, tokens: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    samples = list(per_token_ms * (1 + 0.02 * rng.standard_normal(generations * tokens)))
    ttft = list(ttft_ms * (1 + 0.02 * rng.standard_normal(generations)))
    return {"latency": {"p50_ms": float(np.median(samples)), "p95_ms": float(np.percentile(samples, 95))},
            "samples_ms": samples, "generation": {"runtime": "onnxruntime", "prompt_tokens": 64,
                                                  "ttft": {"p50_ms": float(np.median(ttft))},
                                                  "ttft_samples_ms": ttft}}


def _spec(**slo) -> SimpleNamespace:
    base = {"latency_p95_ms": None, "energy_per_inference_mj": None, "average_power_mw": None,
            "peak_memory_mb": None, "ttft_ms": None, "tokens_per_s": None}
    return SimpleNamespace(slo=SimpleNamespace(**{**base, **slo}),
                           regression=SimpleNamespace(latency_p50_pct=10, latency_p95_pct=10, energy_pct=10,
                                                      tokens_per_s_pct=10, ttft_pct=15, confidence=0.95),
                           quality=SimpleNamespace(metric="agreement", max_drop=5, drop="absolute"),
                           verification=SimpleNamespace(block=16), memory_limit_mb=None)


def test_the_gate_judges_a_decoder_by_tokens_per_second_and_time_to_first_token() -> None:
    same = gate.decide({"block": 16, "a": _side(2.0, 20.0, seed=1), "b": _side(2.0, 20.0, seed=2)}, _spec(), None)
    slower = gate.decide({"block": 16, "a": _side(3.0, 30.0, seed=1), "b": _side(2.0, 20.0, seed=2)}, _spec(), None)
    names = [c["name"] for c in same["checks"]]
    assert names == ["tokens-per-s-regression", "ttft-regression"]  # not the per-inference latency checks
    assert same["outcome"] == gate.PASSED
    assert slower["outcome"] == gate.FAILED
    assert all(c["outcome"] == gate.FAILED for c in slower["checks"])
    assert "decode tokens/s new/previous = 0.6" in slower["checks"][0]["detail"]
    assert slower["measurements"]["generation"]["tokens_per_s"] == pytest.approx(1000 / 3.0, rel=0.05)


def test_generation_slos() -> None:
    result = gate.decide({"block": 16, "a": _side(10.0, 50.0)}, _spec(tokens_per_s=50, ttft_ms=100), None)
    by_name = {c["name"]: c["outcome"] for c in result["checks"]}
    assert by_name == {"ttft-slo": gate.PASSED, "tokens-per-s-slo": gate.PASSED}   # 100 tok/s, 50 ms
    result = gate.decide({"block": 16, "a": _side(10.0, 50.0)}, _spec(tokens_per_s=150, ttft_ms=40), None)
    assert {c["name"]: c["outcome"] for c in result["checks"]} == {"ttft-slo": gate.FAILED,
                                                                  "tokens-per-s-slo": gate.FAILED}
