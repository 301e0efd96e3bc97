"""Combining the devices' updates into one: clipping, exclusion of outlying updates, the aggregation rule and
the noise of DP-FedAvg. Pure functions over numpy arrays (the round's I/O is in ``rounds``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Method = Literal["fedavg", "fedprox", "trimmed_mean", "median"]


@dataclass(frozen=True)
class Update:
    """One device's clipped difference of the trained tensors, flattened in a fixed tensor order."""

    device: str
    vector: np.ndarray
    samples: int


@dataclass(frozen=True)
class Aggregate:
    vector: np.ndarray
    used: tuple[str, ...]
    excluded: dict[str, str]                            # device -> why its update was left out
    clipped: tuple[str, ...]                            # clipped again here (a device that did not clip)
    noise_std: float = 0.0
    trimmed_share: dict[str, float] = field(default_factory=dict)  # trimmed_mean/median: how often each was cut


def clip(vector: np.ndarray, norm: float) -> tuple[np.ndarray, bool]:
    length = float(np.linalg.norm(vector))
    return (vector * (norm / length), True) if norm and length > norm * (1 + 1e-6) else (vector, False)


def outliers(updates: Sequence[Update], max_norm_ratio: float, min_cosine: float) -> dict[str, str]:
    """Updates far from the others: longer than ``max_norm_ratio`` times the median length, or pointing away
    from the coordinate-wise median of the other updates (cosine below ``min_cosine``). Needs three updates:
    with fewer there is no majority to say what is usual."""
    if len(updates) < 3:
        return {}
    norms = np.array([float(np.linalg.norm(u.vector)) for u in updates])
    median_norm = float(np.median(norms))
    found: dict[str, str] = {}
    for i, update in enumerate(updates):
        if median_norm > 0 and norms[i] > max_norm_ratio * median_norm:
            found[update.device] = (f"update length {norms[i]:.3g} is {norms[i] / median_norm:.1f}x the round's "
                                    f"median ({median_norm:.3g})")
            continue
        others = np.median(np.stack([u.vector for j, u in enumerate(updates) if j != i]), axis=0)
        denominator = norms[i] * float(np.linalg.norm(others))
        cosine = float(update.vector @ others) / denominator if denominator > 0 else 1.0
        if cosine < min_cosine:
            found[update.device] = f"update points away from the others (cosine {cosine:.2f} to their median)"
    return found


def combine(updates: Sequence[Update], method: Method, trim_fraction: float = 0.2,
            weighted: bool = True) -> tuple[np.ndarray, dict[str, float]]:
    """The aggregate and, for the robust rules, each device's share of coordinates that were cut."""
    stack = np.stack([u.vector for u in updates]).astype(np.float64)
    devices = [u.device for u in updates]
    if method in ("fedavg", "fedprox"):
        weights = np.array([u.samples for u in updates], dtype=np.float64) if weighted else np.ones(len(updates))
        return (weights @ stack) / weights.sum(), {}
    order = np.argsort(stack, axis=0)
    n = len(updates)
    if method == "median":
        kept_low, kept_high = (n - 1) // 2, n // 2
        result = np.median(stack, axis=0)
    else:
        cut = int(np.floor(trim_fraction * n))
        kept_low, kept_high = cut, n - cut - 1
        result = np.sort(stack, axis=0)[cut:n - cut].mean(axis=0)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(n)[:, None].repeat(stack.shape[1], axis=1), axis=0)
    cut_share = ((ranks < kept_low) | (ranks > kept_high)).mean(axis=1)
    return result, {d: round(float(s), 4) for d, s in zip(devices, cut_share)}


def aggregate(updates: Sequence[Update], method: Method, clip_norm: float, *, trim_fraction: float = 0.2,
              max_norm_ratio: float = 6.0, min_cosine: float = -0.8, noise_multiplier: float = 0.0,
              rng: np.random.Generator | None = None) -> Aggregate:
    """Clip every update again (a device is not trusted to), leave out the outlying ones, combine the rest.

    With ``noise_multiplier`` > 0 (DP-FedAvg, McMahan et al. 2018) every used device weighs the same (a
    device's influence is then bounded by ``clip_norm``) and Gaussian noise of ``noise_multiplier *
    clip_norm`` is added to the sum before it is divided by the number of devices."""
    clipped_again, safe = [], []
    for update in updates:
        vector, was_clipped = clip(update.vector, clip_norm)
        if was_clipped:
            clipped_again.append(update.device)
        safe.append(Update(update.device, vector, update.samples))
    excluded = outliers(safe, max_norm_ratio, min_cosine)
    used = [u for u in safe if u.device not in excluded]
    if not used:
        return Aggregate(np.zeros_like(safe[0].vector) if safe else np.zeros(0), (), excluded, tuple(clipped_again))
    vector, trimmed = combine(used, method, trim_fraction, weighted=noise_multiplier == 0)
    # a mean of clipped updates stays within the clip; a coordinate-wise median or trimmed mean need not
    # (medians of [1, 0] and [0, 1] and [1, 1] per coordinate make [1, 1]): project it back
    vector, _ = clip(vector, clip_norm)
    std = 0.0
    if noise_multiplier > 0:
        std = noise_multiplier * clip_norm / len(used)
        vector = vector + (rng or np.random.default_rng()).normal(0.0, std, size=vector.shape)
    return Aggregate(vector.astype(np.float32), tuple(u.device for u in used), excluded, tuple(clipped_again), std,
                     trimmed)


def sample_devices(eligible: Sequence[str], fraction: float, minimum: int, rng: np.random.Generator) -> list[str]:
    """The devices asked this round: ``fraction`` of the eligible ones, at least ``minimum`` (all when fewer)."""
    count = min(len(eligible), max(minimum, int(np.ceil(fraction * len(eligible)))))
    return sorted(rng.choice(sorted(eligible), size=count, replace=False).tolist()) if count else []


def personal_choices(validations: dict[str, dict[str, Any] | None], margin: float) -> dict[str, str]:
    """Devices whose own trained head beat the head they were sent on their held-out samples by ``margin``
    points (their numbers: the controller never sees their data), with why."""
    chosen = {}
    for device, v in sorted(validations.items()):
        if not v or not v.get("samples") or v.get("trained_accuracy") is None or v.get("sent_accuracy") is None:
            continue
        if float(v["trained_accuracy"]) >= float(v["sent_accuracy"]) + margin:
            chosen[device] = (f"its own head {v['trained_accuracy']:.1f}% vs the fleet's {v['sent_accuracy']:.1f}% on "
                              f"its {v['samples']} held-out samples")
    return chosen
