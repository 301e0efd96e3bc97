"""One definition of each quality metric; the agent's copy (devices run without edgeops) gives the same numbers."""

from __future__ import annotations

import numpy as np
import pytest

from edgeops.metrics import Metric, metric_value, score
from labkit.artifacts import agent_module


def _case(seed: int, rows: int = 64, classes: int = 5):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=(rows, classes)).astype(np.float32)
    outputs = (reference + rng.normal(scale=0.6, size=reference.shape)).astype(np.float32)
    labels = rng.integers(0, classes, rows)
    return outputs, reference, labels


@pytest.mark.parametrize("metric", list(Metric))
@pytest.mark.parametrize("seed", range(5))
def test_the_agent_scores_like_the_build(metric: Metric, seed: int) -> None:
    outputs, reference, labels = _case(seed)
    rng = np.random.default_rng(seed)
    if metric == Metric.AGREEMENT:  # greedy tokens against the original's, rows padded with -1
        reference = np.where(rng.random((8, 12)) < 0.8, rng.integers(0, 259, (8, 12)), -1)
        outputs = np.where(rng.random(reference.shape) < 0.7, reference, rng.integers(0, 259, reference.shape))
    elif metric == Metric.PERPLEXITY:  # (nll sum, tokens) per text
        outputs = np.stack([rng.uniform(1, 40, 8), rng.integers(5, 30, 8)], axis=1)
    agent = agent_module()
    for given in (labels, None):
        assert agent.metric_value(str(metric), outputs, reference, given) == metric_value(metric, outputs, reference,
                                                                                          given)


def test_known_values() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    outputs = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.0, 1.5]])
    labels = np.array([0, 1, 1, 1])
    assert metric_value("accuracy", outputs, reference, labels) == 100.0
    assert metric_value("accuracy", outputs, reference) == 75.0  # no labels: agreement with the reference
    assert metric_value("top1_agreement", outputs, reference, labels) == 75.0
    assert metric_value("max_abs_error", outputs, reference) == pytest.approx(0.9)
    assert metric_value("cosine", reference, reference) == pytest.approx(1.0)
    assert score("max_abs_error", 0.5) < score("max_abs_error", 0.1) and score("cosine", 0.9) > score("cosine", 0.8)


def test_an_unknown_metric_is_an_error_not_a_silent_max_abs_error() -> None:
    outputs, reference, _ = _case(0)
    with pytest.raises(ValueError, match="unknown quality metric"):
        metric_value("f1", outputs, reference)
    with pytest.raises(agent_module().AgentError):
        agent_module().metric_value("f1", outputs, reference)


def test_the_golden_set_is_large_enough_that_one_flip_is_at_most_half_the_allowed_drop() -> None:
    from edgeops.metrics import golden_size, one_sample_points

    assert golden_size("accuracy", 1.0, False, 93.0, 5000) == 200        # 0.5 points per sample
    assert golden_size("accuracy", 1.0, False, 93.0, 120) == 120         # no more than the evaluation set
    assert golden_size("top1_agreement", 5.0, False, 100.0, 5000) == 40
    assert golden_size("accuracy", 0.1, False, 90.0, 5000) == 1000       # capped
    assert golden_size("accuracy", 1.0, True, 50.0, 5000) == 400         # 1 % of 50 = 0.5 points
    assert golden_size("cosine", 0.01, False, 1.0, 5000) == 32
    assert one_sample_points("accuracy", 200) == 0.5 and one_sample_points("cosine", 200) == 0.0


def test_one_differing_golden_sample_never_fails_a_release_by_itself() -> None:
    from edgeops.manifest.models import QualityGoal
    from edgeops.types import Decision
    from edgeops.verify import quality_check

    goal = QualityGoal(metric="accuracy", max_drop=1.0)
    one_flip = quality_check(goal, device_value=90.625, host_value=93.75, samples=32)  # 1 of 32 = 3.125 points
    assert one_flip.outcome == Decision.PASSED and "one of 32 samples" in one_flip.detail
    two_flips = quality_check(goal, device_value=87.5, host_value=93.75, samples=32)
    assert two_flips.outcome == Decision.FAILED
    assert quality_check(goal, 92.0, 93.0, samples=200).outcome == Decision.PASSED      # 1 point: the goal itself
    assert quality_check(goal, 91.5, 93.0, samples=200).outcome == Decision.FAILED      # 3 flips of 200


def test_embedding_fidelity_shows_what_a_mean_cosine_hides() -> None:
    from edgeops.metrics import embedding_fidelity

    rng = np.random.default_rng(3)
    reference = rng.normal(size=(50, 16))
    same = embedding_fidelity(reference * 2.0, reference)  # scaling keeps directions and neighbours
    assert same["cosine_min"] == pytest.approx(1.0) and same["neighbour_agreement"] == 100.0
    one_broken = reference.copy()
    one_broken[7] = -reference[7]                          # the mean barely moves, the worst sample does
    broken = embedding_fidelity(one_broken, reference)
    assert broken["cosine_min"] == pytest.approx(-1.0)
    assert metric_value("cosine", one_broken, reference) > 0.95
    noisy = embedding_fidelity(reference + rng.normal(scale=3.0, size=reference.shape), reference)
    assert noisy["neighbour_agreement"] < 60


@pytest.mark.parametrize("metric,max_drop,drop,missed", [
    ("accuracy", 1.0, 3.5, False),    # 2 x 1.0 + one of 64 samples (1.56 points) is 3.56: the whole set could differ
    ("accuracy", 1.0, 3.6, True),
    ("cosine", 0.005, 0.009, False),  # no sample granularity for a mean cosine: twice the allowed drop
    ("cosine", 0.005, 0.011, True),
])
def test_a_screened_candidate_is_dropped_only_when_it_misses_the_goal_clearly(metric: str, max_drop: float,
                                                                              drop: float, missed: bool) -> None:
    from edgeops.compress.data import Dataset
    from edgeops.compress.evaluate import Evaluator, Quality
    from edgeops.manifest.models import QualityGoal

    evaluator = Evaluator(QualityGoal(metric=metric, max_drop=max_drop), Dataset({"x": np.zeros((300, 2))}, None, ""))
    screened = Quality(metric, 100 - drop, 100.0, drop, drop <= max_drop, {"screened_samples": 64.0})
    assert evaluator.clearly_missed(screened) is missed


@pytest.mark.parametrize("metric", [Metric.ACCURACY, Metric.TOP1_AGREEMENT, Metric.COSINE])
@pytest.mark.parametrize("seed", range(3))
def test_per_sample_scores_average_to_the_metric(metric: Metric, seed: int) -> None:
    from edgeops.metrics import sample_scores

    outputs, reference, labels = _case(seed)
    scores = sample_scores(metric, outputs, reference, labels)
    assert scores is not None and scores.shape == (len(outputs),)
    assert scores.mean() == pytest.approx(metric_value(metric, outputs, reference, labels))
    assert sample_scores(Metric.MAX_ABS_ERROR, outputs, reference) is None  # a largest error is not a mean


@pytest.mark.parametrize("drop,error,missed", [
    (0.007, 0.0005, True),    # 0.007 - 3 x 0.0005 = 0.0055 > 0.005: even a lucky whole set would miss
    (0.007, 0.001, False),    # 0.007 - 3 x 0.001 = 0.004: the whole set may still meet it
    (0.0049, 0.00001, False),  # a pass is never a clear miss
])
def test_a_near_miss_with_a_small_standard_error_stops_on_the_sample(drop: float, error: float,
                                                                     missed: bool) -> None:
    from edgeops.compress.data import Dataset
    from edgeops.compress.evaluate import Evaluator, Quality
    from edgeops.manifest.models import QualityGoal

    evaluator = Evaluator(QualityGoal(metric="cosine", max_drop=0.005), Dataset({"x": np.zeros((300, 2))}, None, ""))
    screened = Quality("cosine", 1 - drop, 1.0, drop, drop <= 0.005,
                       {"screened_samples": 64.0, "drop_standard_error": error})
    assert evaluator.clearly_missed(screened) is missed


def test_the_drop_standard_error_is_that_of_the_paired_per_sample_differences() -> None:
    from edgeops.compress.evaluate import drop_standard_error
    from edgeops.manifest.models import QualityGoal

    reference = np.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]]          # the original is right on every sample
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    outputs = reference.copy()
    outputs[[1, 5]] = np.eye(4)[[0, 0]]                    # two of eight samples now wrong
    differences = np.array([0, 100, 0, 0, 0, 100, 0, 0], dtype=float)
    expected = differences.std(ddof=1) / np.sqrt(8)
    goal = QualityGoal(metric="accuracy", max_drop=1.0)
    assert drop_standard_error(goal, outputs, reference, labels, 100.0) == pytest.approx(expected)
    relative = QualityGoal(metric="accuracy", max_drop=1.0, drop="relative")
    assert drop_standard_error(relative, outputs, reference, labels, 50.0) == pytest.approx(expected * 2)
    assert drop_standard_error(QualityGoal(metric="max_abs_error", max_drop=1.0), outputs, reference, labels,
                               0.0) is None
