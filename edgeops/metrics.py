"""The quality metrics, one definition used by build, distillation and verification.

The agent runs on devices without edgeops installed and keeps its own copy of
``metric_value``; a test holds the two to the same numbers.
"""

from __future__ import annotations

import math
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from edgeops.agent import edgeops_gate


class Metric(StrEnum):
    ACCURACY = "accuracy"              # % of samples whose argmax matches the label
    TOP1_AGREEMENT = "top1_agreement"  # % of samples whose argmax matches the original model's
    COSINE = "cosine"                  # mean cosine similarity to the original model's outputs
    MAX_ABS_ERROR = "max_abs_error"    # largest absolute difference from the original model's outputs
    AGREEMENT = "agreement"            # text-generation: % of golden tokens the model predicts as the original did
    PERPLEXITY = "perplexity"          # text-generation: exp(mean next-token negative log-likelihood)


CLASSIFICATION = (Metric.ACCURACY, Metric.TOP1_AGREEMENT)
HIGHER_IS_BETTER = (Metric.ACCURACY, Metric.TOP1_AGREEMENT, Metric.COSINE, Metric.AGREEMENT)
LOWER_IS_BETTER = (Metric.MAX_ABS_ERROR, Metric.PERPLEXITY)
PERCENT_POINTS = (Metric.ACCURACY, Metric.TOP1_AGREEMENT, Metric.AGREEMENT)  # scored in % (drops in points)


def token_agreement(predicted: npt.NDArray[np.generic], reference: npt.NDArray[np.generic]) -> float:
    """% of the reference's tokens (rows padded with -1) that ``predicted`` has at the same place.

    Teacher-forced: row i, place j of ``predicted`` is the model's greedy choice after the prompt and the
    reference's first j tokens, so one early difference does not make every later token differ.
    """
    ref = np.asarray(reference, dtype=np.int64)
    pred = np.asarray(predicted, dtype=np.int64)[:, :ref.shape[1]]
    valid = ref >= 0
    if not valid.any():
        raise ValueError("the reference has no tokens")
    return float((pred[valid] == ref[valid]).mean() * 100)


def perplexity(nll: npt.NDArray[np.generic]) -> float:
    """exp of the mean next-token negative log-likelihood; ``nll`` has one row per text: (sum of nll, tokens)."""
    rows = np.asarray(nll, dtype=np.float64).reshape(-1, 2)
    count = rows[:, 1].sum()
    if count <= 0:
        raise ValueError("no tokens to score")
    return float(math.exp(rows[:, 0].sum() / count))


def metric_value(metric: str, outputs: npt.NDArray[np.generic], reference: npt.NDArray[np.generic],
                 labels: npt.NDArray[np.generic] | None = None) -> float:
    """``metric`` for ``outputs`` against the original model's ``reference`` outputs (one row per sample).

    Accuracy without labels falls back to agreement with the reference. Text generation: ``agreement`` takes
    the teacher-forced greedy tokens and the reference's tokens; ``perplexity`` the (nll sum, tokens) rows.
    """
    if metric == Metric.AGREEMENT:
        return token_agreement(outputs, reference)
    if metric == Metric.PERPLEXITY:
        return perplexity(outputs)
    out, ref = _rows(outputs, reference)
    if metric in CLASSIFICATION:
        return float(_hits(metric, out, ref, labels).mean() * 100)
    if metric == Metric.COSINE:
        return float(np.mean(_cosines(out, ref)))
    if metric == Metric.MAX_ABS_ERROR:
        return float(np.max(np.abs(out - ref)))
    raise ValueError(f"unknown quality metric {metric!r}; one of: {', '.join(Metric)}")


def sample_scores(metric: str, outputs: npt.NDArray[np.generic], reference: npt.NDArray[np.generic],
                  labels: npt.NDArray[np.generic] | None = None) -> npt.NDArray[np.float64] | None:
    """Each sample's score, for the metrics that are a mean of them (``metric_value`` is their mean); None for
    the others (the largest error, token-level metrics)."""
    if metric not in (*CLASSIFICATION, Metric.COSINE):
        return None
    out, ref = _rows(outputs, reference)
    if metric == Metric.COSINE:
        return _cosines(out, ref)
    return np.asarray(_hits(metric, out, ref, labels) * 100.0)


def _rows(outputs: npt.NDArray[np.generic], reference: npt.NDArray[np.generic]) -> tuple[
        npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Both as one float64 row per sample, cut to the shorter."""
    n = min(len(outputs), len(reference))
    return (np.asarray(outputs[:n]).reshape(n, -1).astype(np.float64),
            np.asarray(reference[:n]).reshape(n, -1).astype(np.float64))


def _hits(metric: str, out: npt.NDArray[np.float64], ref: npt.NDArray[np.float64],
          labels: npt.NDArray[np.generic] | None) -> npt.NDArray[np.bool_]:
    """Whether each sample's argmax is right: against the labels (accuracy with labels), else the reference's."""
    truth = np.asarray(labels)[:len(out)] if metric == Metric.ACCURACY and labels is not None else ref.argmax(1)
    return np.asarray(out.argmax(1) == truth)


def _cosines(out: npt.NDArray[np.float64], ref: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    norms = np.maximum(np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
    return np.asarray(np.sum(out * ref, axis=1) / norms)


def embedding_fidelity(outputs: npt.NDArray[np.generic], reference: npt.NDArray[np.generic]) -> dict[str, float]:
    """What a mean cosine hides: the worst sample's cosine, and the share of samples (%) whose nearest
    neighbour among the others is the same as in the original model's embedding space (retrieval keeps
    working only if neighbours stay neighbours)."""
    out, ref = _rows(outputs, reference)
    n = len(out)
    out_unit = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    ref_unit = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    fidelity = {"cosine_min": float(np.min(np.sum(out_unit * ref_unit, axis=1)))}
    if n > 2:
        def neighbours(unit: npt.NDArray[np.float64]) -> npt.NDArray[np.intp]:
            similarity = unit @ unit.T
            np.fill_diagonal(similarity, -np.inf)
            return np.asarray(similarity.argmax(axis=1))

        fidelity["neighbour_agreement"] = float((neighbours(out_unit) == neighbours(ref_unit)).mean() * 100)
    return fidelity


GOLDEN_MIN, GOLDEN_MAX = 32, 1000


one_sample_points = edgeops_gate.one_sample_points  # the device's gate uses the same rule


def golden_size(metric: str, max_drop: float, relative: bool, baseline: float, available: int) -> int:
    """How many evaluation samples a release ships for the on-device check.

    For accuracy and top-1 agreement one differing sample moves the score by 100/n points; n is chosen so
    that one sample is at most half the allowed drop (so a single flip, e.g. from int8 kernels that round
    differently on the device, never fails a release by itself); other metrics ship 32 samples.
    """
    wanted = GOLDEN_MIN
    if metric in CLASSIFICATION and max_drop > 0:
        allowed_points = max_drop * baseline / 100 if relative else max_drop
        wanted = math.ceil(2 * 100 / allowed_points) if allowed_points > 0 else GOLDEN_MAX
    return max(1, min(max(wanted, GOLDEN_MIN), GOLDEN_MAX, available))


def score(metric: str, value: float) -> float:
    """``value`` on a higher-is-better scale, for choosing between candidates."""
    return value if metric in HIGHER_IS_BETTER else -value
