"""The gate reads only its GateSpec: SLOs, regression tolerances (latency and energy), the device's memory limit."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from edgeops.manifest.models import SLO, DeploymentSpec, QualityGoal, Regression, Verification
from edgeops.types import Decision
from edgeops.verify import GateSpec, decide

GOAL = QualityGoal(metric="accuracy", max_drop=1.0)


def gate(slo: SLO | None = None, memory_limit_mb: float | None = None, **regression: float) -> GateSpec:
    return GateSpec(slo or SLO(), Regression(**regression), GOAL, Verification(block=10), 60, True, memory_limit_mb)


def result(energy_new: float | None, energy_old: float | None, peak_mb: float = 50) -> dict:  # type: ignore[type-arg]
    rng = np.random.default_rng(1)
    same = list(rng.normal(1.0, 0.01, 200))

    def power(mj: float | None) -> dict:  # type: ignore[type-arg]
        if mj is None:
            return {"source": "none"}
        blocks = list(mj * 10 * rng.normal(1.0, 0.02, 20))  # 20 blocks of 10 runs, 2% noise
        return {"energy_per_inference_mj": mj, "block_energy_mj": blocks, "source": "hwmon", "boundary": "board"}

    return {"a": {"latency": {"p95_ms": 1.0}, "samples_ms": same, "power": power(energy_new)},
            "b": {"latency": {"p95_ms": 1.0}, "samples_ms": same, "power": power(energy_old)},
            "peak_rss_mb": peak_mb}


def test_energy_regression_fails_past_the_tolerance_and_is_skipped_without_readings() -> None:
    worse = decide(result(1.25, 1.0), gate(energy_pct=10), None, seed="s")
    assert worse.outcome == Decision.FAILED and "energy new/previous = 1.2" in worse.reason
    assert "[hwmon, board]" in worse.reason
    assert decide(result(1.05, 1.0), gate(energy_pct=10), None, seed="s").outcome == Decision.PASSED
    assert decide(result(1.25, 1.0), gate(energy_pct=30), None, seed="s").outcome == Decision.PASSED
    unread = decide(result(None, None), gate(energy_pct=0), None, seed="s")
    assert unread.outcome == Decision.PASSED and not any(c.name == "energy-regression" for c in unread.checks)


def test_the_device_profile_memory_limit_fails_a_release_above_it() -> None:
    over = decide(result(None, None, peak_mb=80), gate(memory_limit_mb=64), None, seed="s")
    assert over.outcome == Decision.FAILED and "device limit 64 MB" in over.reason
    assert decide(result(None, None, peak_mb=40), gate(memory_limit_mb=64), None, seed="s").outcome == Decision.PASSED


def test_the_gate_spec_takes_what_the_deployment_says() -> None:
    spec = DeploymentSpec.model_validate({
        "model": {"path": "m.onnx", "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
                  "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 2]}]},
        "data": {"calibration": "c.npz", "evaluation": "e.npz"},
        "quality": {"metric": "cosine", "max_drop": 0.01},
        "slo": {"latency_p95_ms": 5},
        "targets": [{"fleet": "lab"}],
        "rollout": {"on_inconclusive": "pause", "timeouts": {"verify_s": 42},
                    "regression": {"energy_pct": 3}, "verification": {"runs": 100, "block": 5}},
    })
    built = GateSpec.of(spec, memory_limit_mb=64)
    assert (built.slo.latency_p95_ms, built.regression.energy_pct, built.verify_timeout_s) == (5, 3, 42)
    assert (built.verification.runs, built.verification.block, built.quality.metric) == (100, 5, "cosine")
    assert built.retry_inconclusive is False and built.memory_limit_mb == 64


def test_a_noisy_energy_reading_never_holds_a_release_as_inconclusive() -> None:
    noisy = result(1.08, 1.0)
    rng = np.random.default_rng(7)
    for side in ("a", "b"):  # a sensor sampled more slowly than the blocks run: whole samples land in one block
        blocks = noisy[side]["power"]["block_energy_mj"]
        noisy[side]["power"]["block_energy_mj"] = [b * rng.choice([0.2, 1.8]) for b in blocks]
    verdict = decide(noisy, gate(energy_pct=10), None, seed="s")
    energy = next(c for c in verdict.checks if c.name == "energy-regression")
    assert energy.outcome == Decision.PASSED and "no regression shown" in energy.detail


def test_a_pull_device_decides_with_the_same_gate_from_the_spec_it_receives_as_json() -> None:
    from edgeops.agent import edgeops_gate

    spec = gate(SLO(latency_p95_ms=0.99, energy_per_inference_mj=2.0), memory_limit_mb=64, energy_pct=10)
    on_device = edgeops_gate.spec_from_json(json.loads(json.dumps(spec.as_json())))  # as published, as received
    for measured in (result(1.25, 1.0), result(1.0, 1.0, peak_mb=80), result(None, None)):
        controller = decide(measured, spec, None, seed="s")
        device = edgeops_gate.decide(measured, on_device, None, seed="s")
        assert device["outcome"] == controller.outcome and device["reason"] == controller.reason
        assert device["checks"] == [c.as_dict() for c in controller.checks]


def test_a_failed_measurement_is_confirmed_with_twice_the_runs_before_it_stands() -> None:
    from edgeops.agent import edgeops_gate

    calls: list[int] = []

    def run(worse: float) -> Callable[[int, int], dict[str, Any]]:
        def measure(runs: int, attempt: int) -> dict[str, Any]:
            calls.append(runs)
            rng = np.random.default_rng(attempt)
            old = list(rng.normal(1.0, 0.01, runs))
            return {"a": {"latency": {"p95_ms": 1.0}, "samples_ms": [v * worse for v in old]},
                    "b": {"latency": {"p95_ms": 1.0}, "samples_ms": old}, "peak_rss_mb": 1}
        return measure

    spec = gate(latency_p95_pct=10, latency_p50_pct=10)
    assert edgeops_gate.measure(run(1.5), spec, None)["outcome"] == "Failed" and calls == [400, 800]
    calls.clear()
    assert edgeops_gate.measure(run(1.0), spec, None)["outcome"] == "Passed" and calls == [400]


class _Device:
    """A device whose A/B runs are noisy around ``worse`` (new/old) and take ``seconds_per_run`` on a fake clock."""

    def __init__(self, worse: float, noise: float, seconds_per_run: float = 0.01) -> None:
        self.worse, self.noise, self.seconds_per_run = worse, noise, seconds_per_run
        self.now, self.calls = 0.0, []  # type: ignore[var-annotated]

    def clock(self) -> float:
        return self.now

    def run(self, runs: int, attempt: int) -> dict[str, Any]:
        self.calls.append(runs)
        self.now += runs * self.seconds_per_run
        rng = np.random.default_rng(attempt)
        old = np.exp(rng.normal(0, self.noise, runs))
        new = np.exp(rng.normal(0, self.noise, runs)) * self.worse
        return {"a": {"latency": {"p95_ms": 1.0}, "samples_ms": list(new)},
                "b": {"latency": {"p95_ms": 1.0}, "samples_ms": list(old)}, "peak_rss_mb": 1}


def adaptive(budget_s: float | None, runs: int = 100, retries: int = 5) -> GateSpec:
    return GateSpec(SLO(), Regression(latency_p95_pct=10, latency_p50_pct=10), GOAL,
                    Verification(runs=runs, block=10, retries=retries, budget_s=budget_s), 60, True, None)


def test_a_decisive_first_look_stops_at_once() -> None:
    from edgeops.agent import edgeops_gate

    device = _Device(1.0, 0.01)
    verdict = edgeops_gate.measure(device.run, adaptive(60), None, clock=device.clock)
    assert verdict["outcome"] == "Passed" and device.calls == [100]
    assert verdict["measurements"]["looks"] == [{"runs": 100, "seconds": 1.0}]


def test_an_inconclusive_look_is_extended_by_what_its_interval_needs_within_the_budget() -> None:
    from edgeops.agent import edgeops_gate

    device = _Device(1.0, 0.5)  # A/A on a noisy device: the first 100 runs straddle the limit
    verdict = edgeops_gate.measure(device.run, adaptive(120), None, clock=device.clock)
    assert len(device.calls) >= 2 and device.calls[1] != 200  # sized by the interval, not doubled
    assert all(c % 10 == 0 for c in device.calls)  # whole blocks
    assert device.now <= 120 + 1.0  # the budget, beyond the first look
    assert verdict["outcome"] in ("Passed", "Inconclusive")


def test_an_inconclusive_verdict_says_what_would_decide_it_when_the_budget_is_spent() -> None:
    from edgeops.agent import edgeops_gate

    device = _Device(1.0, 0.5)
    verdict = edgeops_gate.measure(device.run, adaptive(2), None, clock=device.clock)  # 2 s: 200 runs at most
    assert verdict["outcome"] == "Inconclusive", verdict["reason"]
    assert sum(device.calls) <= 100 + 200
    decide_with = verdict["measurements"]["decide_with"]
    assert decide_with["runs"] > 0 and decide_with["seconds"] == round(decide_with["runs"] * 0.01, 1)
    assert "more A/B runs" in verdict["reason"] and "would decide it" in verdict["reason"]


def test_a_release_exactly_at_the_limit_is_not_measured_forever() -> None:
    from edgeops.agent import edgeops_gate

    device = _Device(1.10, 0.05)  # p95 ratio right at the 10% limit
    verdict = edgeops_gate.measure(device.run, adaptive(30, retries=5), None, clock=device.clock)
    assert len(device.calls) <= 7 and device.now <= 30 + 2.0 + 2.0  # budget + first look + a confirmation
    if verdict["outcome"] == "Inconclusive":
        assert "would decide it" in verdict["reason"] or "no number of runs" in verdict["reason"]


def test_without_a_budget_each_new_look_doubles_the_runs() -> None:
    from edgeops.agent import edgeops_gate

    device = _Device(1.0, 0.5)
    edgeops_gate.measure(device.run, adaptive(None, retries=2), None, clock=device.clock)
    assert device.calls[:2] == [100, 200]


def test_measuring_again_never_spends_more_than_the_budget() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from edgeops.agent import edgeops_gate

    @settings(max_examples=25, deadline=None)
    @given(worse=st.floats(0.8, 1.4), noise=st.floats(0.01, 1.0), budget=st.floats(0.5, 60),
           seconds_per_run=st.floats(0.001, 0.05))
    def spends_within(worse: float, noise: float, budget: float, seconds_per_run: float) -> None:
        device = _Device(worse, noise, seconds_per_run)
        verdict = edgeops_gate.measure(device.run, adaptive(budget), None, clock=device.clock)
        first = device.calls[0] * seconds_per_run
        confirmation = max(device.calls) * seconds_per_run  # a Failed is confirmed, whatever the budget says
        # whole blocks round each look up by at most one block
        assert device.now <= first + confirmation + budget + len(device.calls) * 10 * seconds_per_run + 1e-9
        if verdict["outcome"] == "Inconclusive" and "decide_with" in verdict["measurements"]:
            assert "would decide it" in verdict["reason"] or "no number of runs" in verdict["reason"]

    spends_within()


def test_measuring_again_fits_in_what_the_controller_waits_for() -> None:
    from edgeops.manifest.workspace import load_workspace
    from labkit.repo import REPO

    spec = load_workspace(REPO).deployments["wearable-activity"].obj.spec
    assert spec.rollout.verification.budget_s == 60 and spec.rollout.timeouts.verify_s >= 120
    assert GateSpec.of(spec).verification.budget_s == 60
    assert GateSpec.of(spec, wait_s=10).verification.budget_s == 5  # a pull fleet's report deadline of 10 s
    assert GateSpec.of(spec, wait_s=10).as_json()["verification"]["budget_s"] == 5
    assert GateSpec.of(spec, trial_window_s=6).verification.budget_s == 3  # never past the device's own trial window
