"""The verification gate: absolute SLOs plus a statistical regression check. Pure functions.

Regression: the agent measures the new release (A) and the previous one (B)
interleaved in blocks, in one process. The gate bootstraps confidence
intervals for the ratios p50(A)/p50(B) and p95(A)/p95(B) (resampling whole
blocks, so drift within a block stays together) and decides each:

* Failed       - the whole interval is above 1 + tolerance: slower for sure;
* Passed       - the whole interval is at or below 1 + tolerance;
* Inconclusive - the interval straddles the tolerance: noise, measure again.

With a 95% interval, noise makes a release look Failed in about 2.5% of A/A
measurements; the caller confirms a Failed with a second measurement before rolling
back (edgeops.rollout.measure_release), and bench/gate.py measures the resulting rates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeops.manifest.models import SLO, DeploymentSpec, QualityGoal, Regression, Verification
from edgeops.metrics import metric_value, one_sample_points
from edgeops.types import Decision

PASSED, FAILED, INCONCLUSIVE = Decision.PASSED, Decision.FAILED, Decision.INCONCLUSIVE
BOOTSTRAP_ROUNDS = 2000


@dataclass(frozen=True)
class GateSpec:
    """What verifying a release on a device needs, and nothing else of the manifest."""

    slo: SLO
    regression: Regression
    quality: QualityGoal
    verification: Verification
    verify_timeout_s: float
    retry_inconclusive: bool           # on_inconclusive: retry
    memory_limit_mb: float | None = None  # the device profile's limits.max_memory_mb

    @classmethod
    def of(cls, spec: DeploymentSpec, memory_limit_mb: float | None = None) -> GateSpec:
        policy = spec.rollout
        return cls(spec.slo, policy.regression, spec.quality, policy.verification, policy.timeouts.verify_s,
                   policy.on_inconclusive == "retry", memory_limit_mb)


@dataclass(frozen=True)
class Check:
    name: str
    outcome: Decision
    detail: str
    interval: tuple[float, float, float, float] | None = None   # regressions: (point, low, high, limit) of new/previous

    def as_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {"name": self.name, "outcome": self.outcome, "detail": self.detail}
        if self.interval is not None:
            found.update(zip(("point", "low", "high", "limit"), (round(v, 5) for v in self.interval)))
        return found


MAX_KEPT_SAMPLES = 2000  # per side: what the ledger keeps of a measurement for reports (evenly thinned)


def kept_samples(samples: list[float]) -> list[float]:
    step = max(1, -(-len(samples) // MAX_KEPT_SAMPLES))
    return [round(float(v), 4) for v in samples[::step]]


@dataclass(frozen=True)
class Verdict:
    outcome: Decision
    checks: tuple[Check, ...]
    measurements: dict[str, Any] = field(default_factory=dict)

    @property
    def on_device(self) -> dict[str, Any]:
        """The measurements a device keeps beside its release (the raw samples stay in the ledger)."""
        return {k: v for k, v in self.measurements.items() if k != "samples_ms"}

    @property
    def reason(self) -> str:
        """The checks that decided the outcome (all of them, briefly, when everything passed)."""
        if self.outcome == PASSED:
            return f"all {len(self.checks)} checks passed" + (
                f" ({next(c.detail for c in self.checks if c.name.endswith('regression'))})"
                if any(c.name.endswith("regression") for c in self.checks) else "")
        return "; ".join(c.detail for c in self.checks if c.outcome == self.outcome)


def _blocks(samples: list[float], block: int) -> np.ndarray:
    usable = len(samples) - len(samples) % block
    return np.asarray(samples[:usable], dtype=float).reshape(-1, block)


def ratio_interval(new: list[float], old: list[float], block: int, confidence: float, statistic: str = "p95",
                   seed: str = "") -> tuple[float, float, float]:
    """(point, low, high) of statistic(new)/statistic(old) by a paired block bootstrap."""
    a, b = _blocks(new, block), _blocks(old, block)
    count = min(len(a), len(b))
    a, b = a[:count], b[:count]

    def stat(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(np.percentile(x, 95 if statistic == "p95" else 50, axis=-1), dtype=np.float64)

    point = float(stat(a.reshape(-1)) / stat(b.reshape(-1)))
    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
    picks = rng.integers(0, count, size=(BOOTSTRAP_ROUNDS, count))  # the same blocks for both: they ran together
    ratios = stat(a[picks].reshape(BOOTSTRAP_ROUNDS, -1)) / stat(b[picks].reshape(BOOTSTRAP_ROUNDS, -1))
    tail = (1 - confidence) / 2 * 100
    return point, float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))


def _regression(name: str, point: float, low: float, high: float, tolerance_pct: float, confidence: float) -> Check:
    limit = 1 + tolerance_pct / 100
    detail = (f"{name} new/previous = {point:.3f} ({confidence:.0%} CI {low:.3f}–{high:.3f}; "
              f"limit {limit:.2f})")
    interval = (point, low, high, limit)
    if low > limit:
        return Check(f"{name}-regression", FAILED, detail, interval)
    if high <= limit:
        return Check(f"{name}-regression", PASSED, detail, interval)
    return Check(f"{name}-regression", INCONCLUSIVE, detail + ": the interval straddles the limit", interval)


def quality_check(goal: QualityGoal, device_value: float, host_value: float, samples: int = 0) -> Check:
    """The golden set on the device against the same samples scored on the build host.

    For accuracy and top-1 agreement the allowed drop is at least one sample's worth: a single sample that the
    device's kernels round the other way is not a regression.
    """
    if goal.metric == "max_abs_error":
        ok = device_value <= goal.max_drop
        return Check("golden", PASSED if ok else FAILED,
                     f"golden max abs error {device_value:.4g} (allowed {goal.max_drop:g})")
    drop = host_value - device_value
    one = one_sample_points(goal.metric, samples)
    if goal.drop == "relative" and host_value:
        drop, one = drop / host_value * 100, one / host_value * 100
    allowed = max(goal.max_drop, one)
    why = f", one of {samples} samples" if allowed > goal.max_drop else ""
    return Check("golden", PASSED if drop <= allowed + 1e-9 else FAILED,
                 f"golden {goal.metric} {device_value:.4g} on the device vs {host_value:.4g} on the build host "
                 f"(drop {drop:.3g}, allowed {allowed:.3g}{why})")


def decide(result: dict[str, Any], gate: GateSpec, host_golden: float | None, seed: str = "") -> Verdict:
    """Passed, Failed or Inconclusive for the agent's ``result`` (``a`` = new, optional ``b`` = previous)."""
    slo, regression, goal, block = gate.slo, gate.regression, gate.quality, gate.verification.block
    a, b = result["a"], result.get("b")
    checks: list[Check] = []
    p95 = a["latency"]["p95_ms"]
    if slo.latency_p95_ms is not None:
        checks.append(Check("latency-slo", PASSED if p95 <= slo.latency_p95_ms else FAILED,
                            f"p95 {p95:.3f} ms (SLO {slo.latency_p95_ms:g} ms)"))
    power = a.get("power", {})
    if slo.energy_per_inference_mj is not None or slo.average_power_mw is not None:
        if power.get("energy_per_inference_mj") is None:
            checks.append(Check("power-slo", INCONCLUSIVE, f"no power reading ({power.get('error') or 'source none'})"))
        else:
            label = f"[{power['source']}, {power['boundary']}]"
            if slo.energy_per_inference_mj is not None:
                value = power["energy_per_inference_mj"]
                checks.append(Check("energy-slo", PASSED if value <= slo.energy_per_inference_mj else FAILED,
                                    f"energy {value:.4g} mJ/inference {label} (SLO {slo.energy_per_inference_mj:g})"))
            if slo.average_power_mw is not None:
                value = power["average_power_mw"]
                checks.append(Check("power-slo", PASSED if value <= slo.average_power_mw else FAILED,
                                    f"average power {value:.4g} mW {label} (SLO {slo.average_power_mw:g})"))
    peak = result.get("peak_rss_mb", 0)
    if slo.peak_memory_mb is not None:
        checks.append(Check("memory-slo", PASSED if peak <= slo.peak_memory_mb else FAILED,
                            f"peak RSS {peak:.1f} MB (SLO {slo.peak_memory_mb:g} MB)"))
    if gate.memory_limit_mb is not None:
        checks.append(Check("memory-limit", PASSED if peak <= gate.memory_limit_mb else FAILED,
                            f"peak RSS {peak:.1f} MB (device limit {gate.memory_limit_mb:g} MB)"))
    if a.get("golden") and host_golden is not None:
        checks.append(quality_check(goal, a["golden"]["value"], host_golden, int(a["golden"].get("samples") or 0)))
    if b is not None:
        for statistic, tolerance in (("p50", regression.latency_p50_pct), ("p95", regression.latency_p95_pct)):
            point, low, high = ratio_interval(a["samples_ms"], b["samples_ms"], block, regression.confidence,
                                              statistic, seed)
            checks.append(_regression(f"{statistic} latency", point, low, high, tolerance, regression.confidence))
        if (energy := _energy_regression(power, b.get("power") or {}, regression, seed)) is not None:
            checks.append(energy)
    outcomes = {c.outcome for c in checks}
    outcome = FAILED if FAILED in outcomes else INCONCLUSIVE if INCONCLUSIVE in outcomes else PASSED
    measurements = {"latency": a["latency"], "power": power, "golden": a.get("golden"),
                    "peak_rss_mb": result.get("peak_rss_mb"), "providers": a.get("providers"),
                    "previous_latency": b["latency"] if b else None,
                    "where": "device (agent), single stream, batch 1",
                    "checks": [c.as_dict() for c in checks],
                    "samples_ms": {"new": kept_samples(a.get("samples_ms") or []),
                                   **({"previous": kept_samples(b.get("samples_ms") or [])} if b else {})}}
    return Verdict(outcome, tuple(checks), measurements)


def _energy_regression(new: dict[str, Any], old: dict[str, Any], regression: Regression, seed: str) -> Check | None:
    """Energy of the new release over the previous one's, from the same interleaved blocks; None without readings.

    Like latency: the blocks are resampled in pairs (they ran back to back), and only an interval wholly
    above the tolerance fails. Unlike latency, an interval that straddles the limit does not make the
    verdict Inconclusive: power sensors are sampled every tens of milliseconds, so per-block energy is
    coarse (bench/gate.py measured 49 of 60 A/A releases Inconclusive when it did), and latency already
    holds a slower release back.
    """
    a, b = new.get("block_energy_mj") or [], old.get("block_energy_mj") or []
    count = min(len(a), len(b))
    if count < 2 or sum(b[:count]) <= 0:
        return None
    pairs = np.array([a[:count], b[:count]], dtype=float)
    rng = np.random.default_rng(int(hashlib.sha256(f"energy:{seed}".encode()).hexdigest()[:8], 16))
    picks = rng.integers(0, count, size=(BOOTSTRAP_ROUNDS, count))
    ratios = pairs[0][picks].sum(axis=1) / np.maximum(pairs[1][picks].sum(axis=1), 1e-12)
    tail = (1 - regression.confidence) / 2 * 100
    point = float(pairs[0].sum() / pairs[1].sum())
    low, high = float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))
    check = _regression("energy", point, low, high, regression.energy_pct, regression.confidence)
    outcome = FAILED if check.outcome == FAILED else PASSED
    detail = check.detail.replace(": the interval straddles the limit", ": no regression shown")
    return Check(check.name, outcome, f"{detail} [{new.get('source')}, {new.get('boundary')}]", check.interval)


def host_golden_value(golden: dict[str, np.ndarray], goal: QualityGoal) -> float:
    """The goal's metric for the build host's outputs on the golden samples (what the device must match)."""
    return metric_value(goal.metric, golden["expected"], golden["reference"], golden.get("labels"))
