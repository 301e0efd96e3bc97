"""The verification gate, typed: ``edgeops/agent/edgeops_gate.py`` decides, this module gives its verdict types.

The gate itself lives beside the agent because pull-mode devices run it too (see that file for
the statistics: absolute SLOs plus a paired block-bootstrap regression check, Passed | Failed |
Inconclusive). Here: what verifying needs of a manifest (``GateSpec``), and ``Check``/``Verdict``
with ``Decision`` enums for the controller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeops.agent import edgeops_gate as gate_core
from edgeops.manifest.models import SLO, DeploymentSpec, QualityGoal, Regression, Verification
from edgeops.metrics import metric_value
from edgeops.types import Decision

PASSED, FAILED, INCONCLUSIVE = Decision.PASSED, Decision.FAILED, Decision.INCONCLUSIVE
kept_samples = gate_core.kept_samples
ratio_interval = gate_core.ratio_interval


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
    def of(cls, spec: DeploymentSpec, memory_limit_mb: float | None = None, wait_s: float | None = None,
           trial_window_s: float | None = None) -> GateSpec:
        """``wait_s``: how long the controller waits for a device's whole verification (a pull fleet's report
        deadline); ``trial_window_s``: how long the device keeps a trial before it reverts by itself (its
        profile's). Measuring again never spends more than half of the shortest of these and
        ``timeouts.verify_s``: a verification still running when the trial window ends is undone by the device."""
        policy = spec.rollout
        verification = policy.verification
        waited = min(policy.timeouts.verify_s, wait_s if wait_s is not None else policy.timeouts.verify_s,
                     trial_window_s if trial_window_s is not None else policy.timeouts.verify_s)
        if verification.budget_s is not None and verification.budget_s > waited / 2:
            verification = verification.model_copy(update={"budget_s": waited / 2})
        return cls(spec.slo, policy.regression, spec.quality, verification, policy.timeouts.verify_s,
                   policy.on_inconclusive == "retry", memory_limit_mb)

    def as_json(self) -> dict[str, Any]:
        """The spec as a pull-mode device receives it (``edgeops_gate.spec_from_json`` reads it back)."""
        return {"slo": self.slo.model_dump(mode="json"), "regression": self.regression.model_dump(mode="json"),
                "quality": self.quality.model_dump(mode="json"),
                "verification": self.verification.model_dump(mode="json"),
                "verify_timeout_s": self.verify_timeout_s, "retry_inconclusive": self.retry_inconclusive,
                "memory_limit_mb": self.memory_limit_mb}


@dataclass(frozen=True)
class Check:
    name: str
    outcome: Decision
    detail: str
    interval: tuple[float, float, float, float] | None = None   # regressions: (point, low, high, limit) of new/previous

    def as_dict(self) -> dict[str, Any]:
        return gate_core.check(self.name, self.outcome, self.detail, self.interval)

    @classmethod
    def of(cls, found: dict[str, Any]) -> Check:
        interval = tuple(found[k] for k in ("point", "low", "high", "limit")) if "limit" in found else None
        return cls(found["name"], Decision(found["outcome"]), found["detail"], interval)


@dataclass(frozen=True)
class Verdict:
    outcome: Decision
    checks: tuple[Check, ...]
    measurements: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, found: dict[str, Any]) -> Verdict:
        """A verdict in its wire form (the gate's dict, or what a pull device published)."""
        return cls(Decision(found["outcome"]), tuple(Check.of(c) for c in found["checks"]),
                   found.get("measurements") or {})

    @property
    def on_device(self) -> dict[str, Any]:
        """The measurements a device keeps beside its release (the raw samples stay in the ledger)."""
        return {k: v for k, v in self.measurements.items() if k != "samples_ms"}

    @property
    def reason(self) -> str:
        """The checks that decided the outcome (all of them, briefly, when everything passed)."""
        return gate_core.reason(self.outcome, [c.as_dict() for c in self.checks])


def quality_check(goal: QualityGoal, device_value: float, host_value: float, samples: int = 0) -> Check:
    """The golden set on the device against the same samples scored on the build host (see edgeops_gate)."""
    return Check.of(gate_core.quality_check(goal, device_value, host_value, samples))


def decide(result: dict[str, Any], gate: GateSpec, host_golden: float | None, seed: str = "") -> Verdict:
    """Passed, Failed or Inconclusive for the agent's ``result`` (``a`` = new, optional ``b`` = previous)."""
    return Verdict.of(gate_core.decide(result, gate, host_golden, seed))


def measure(run: Callable[[int, int], dict[str, Any]], gate: GateSpec, host_golden: float | None, seed: str = "",
            on_retry: Callable[[int, str], None] = lambda runs, why: None) -> Verdict:
    """Measure with ``run(runs, attempt)`` until the verdict stands (a Failed is confirmed; see edgeops_gate)."""
    return Verdict.of(gate_core.measure(run, gate, host_golden, seed, on_retry))


def out_of_memory(detail: str) -> Verdict:
    """Failed on ``memory-limit``: the device's kernel killed the measurement for memory (see edgeops_gate)."""
    return Verdict.of(gate_core.out_of_memory(detail))


def host_golden_value(golden: dict[str, np.ndarray], goal: QualityGoal) -> float:
    """The goal's metric for the build host's outputs on the golden samples (what the device must match)."""
    return metric_value(goal.metric, golden["expected"], golden["reference"], golden.get("labels"))


def quality_drop(metric: str, running: float, new: float, relative: bool) -> float:
    """How much lower the new release's quality is than what runs, in the goal's unit (points, percent of what
    runs, or the error's increase for max_abs_error, perplexity's increase); negative when it is better."""
    if metric == "max_abs_error":
        return new - running
    drop = new - running if metric in gate_core.LOWER_IS_BETTER else running - new
    return drop / running * 100 if relative and running else drop
