"""The pure core, without devices: waves, the gate, plan decisions, health, saved plans, ledger locks."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgeops.errors import ExitCode
from edgeops.facts import DeviceFacts
from edgeops.health import health_of, sync_of
from edgeops.hints import closest, did_you_mean
from edgeops.manifest.models import SLO, QualityGoal, Regression, RolloutPolicy, Verification, WaveSelector
from edgeops.operations import plan_differences
from edgeops.plan import DesiredDevice, ObservedDevice, assign_waves, make_plan, waves_of
from edgeops.state import LockHeld
from edgeops.state.sqlite import SqliteLedger as Ledger
from edgeops.types import Action, Decision, DeviceStatus, Health, Sync
from edgeops.verify import GateSpec, decide

POLICY = RolloutPolicy(waves=[1, "50%", "100%"])


def desired(n: int, classes: tuple[str, ...] = ("x86",), canary: int | None = None) -> list[DesiredDevice]:
    return [DesiredDevice(f"f/d{i}", "f", f"d{i}", "p", classes[i % len(classes)],
                          (("ring", "canary" if i == canary else "main"),), f"r-{i}", (("model.onnx", "s", 100),))
            for i in range(n)]


def test_waves_grow_to_their_cumulative_targets_rounding_up() -> None:
    waves = assign_waves(desired(10), RolloutPolicy(waves=[1, "25%", "100%"]))
    sizes = [sum(1 for w in waves.values() if w == n) for n in (1, 2, 3)]
    assert sizes == [1, 2, 7]


def test_the_canary_has_one_device_of_every_hardware_class_and_prefers_the_canary_ring() -> None:
    waves = assign_waves(desired(6, ("x86", "arm"), canary=4), POLICY)
    first = {k for k, w in waves.items() if w == 1}
    assert first == {"f/d4", "f/d1"}  # d4 is ring: canary (x86); d1 is the first arm device


def test_every_device_labelled_a_canary_is_in_the_first_wave_by_default() -> None:
    devices = [replace(d, labels=(("ring", "canary" if i in (7, 19) else "main"),)) for i, d in enumerate(desired(24))]
    waves, empty = waves_of(devices, POLICY)
    assert {k for k, w in waves.items() if w == 1} == {"f/d7", "f/d19"} and not empty
    two_classes = [replace(d, hardware_class="arm" if i == 3 else "x86") for i, d in enumerate(devices)]
    first = {k for k, w in assign_waves(two_classes, POLICY).items() if w == 1}
    assert first == {"f/d7", "f/d19", "f/d3"}   # and one of the class without a labelled canary


def test_waves_that_take_no_device_are_named_but_a_last_100_percent_is_the_rest() -> None:
    devices = desired(4, canary=0)
    assert waves_of(devices, RolloutPolicy(waves=[4, "50%", "100%"]))[1] == [1]
    assert waves_of(devices, RolloutPolicy(waves=[1, 3, "100%"]))[1] == []
    assert waves_of(devices, RolloutPolicy(waves=[WaveSelector(selector="ring=canry"), "100%"]))[1] == [0]


def test_hints_only_for_near_misses() -> None:
    assert closest("automatic", ["static", "dynamic", "auto"]) is None        # 5 edits: no hint beats a wrong one
    assert closest("XNNPACKExecutionProvider", ["QNNExecutionProvider", "XnnpackExecutionProvider"]) == \
        "XnnpackExecutionProvider"
    assert closest("latnecy_p95_ms", ["latency_p95_ms", "peak_memory_mb"]) == "latency_p95_ms"  # a swap is one edit
    assert closest("labb", ["lab", "lab-pull"]) == "lab" and closest("x", ["lab"]) is None
    assert did_you_mean("nope", ["lab"], "; known: lab") == "; known: lab"


def test_a_wave_always_adds_a_device_and_never_exceeds_what_is_left() -> None:
    waves = assign_waves(desired(3), RolloutPolicy(waves=[1, 2, 3, 10]))
    assert sorted(waves.values()) == [1, 2, 3]


def _result(new: list[float], old: list[float] | None = None, p95: float = 1.0) -> dict:
    out = {"a": {"latency": {"p95_ms": p95}, "samples_ms": new, "power": {}}, "peak_rss_mb": 50}
    if old is not None:
        out["b"] = {"latency": {"p95_ms": float(np.percentile(old, 95))}, "samples_ms": old}
    return out


GOAL = QualityGoal(metric="accuracy", max_drop=1.0)


def gate(slo: SLO | None = None, memory_limit_mb: float | None = None, **regression: float) -> GateSpec:
    return GateSpec(slo or SLO(), Regression(**regression), GOAL, Verification(block=10), 60, True, memory_limit_mb)


def test_gate_passes_an_equal_release_and_fails_a_much_slower_one() -> None:
    rng = np.random.default_rng(0)
    base = list(rng.normal(1.0, 0.02, 400))
    same = decide(_result(list(rng.normal(1.0, 0.02, 400)), base), gate(), None, seed="s")
    assert same.outcome == Decision.PASSED
    slower = decide(_result([x * 1.4 for x in base], base), gate(), None, seed="s")
    assert slower.outcome == Decision.FAILED and "p50 latency new/previous" in slower.reason


def test_gate_checks_absolute_slos_and_says_inconclusive_without_a_power_reading() -> None:
    over = decide(_result([1.0] * 40, p95=30.0), gate(SLO(latency_p95_ms=25)), None)
    assert over.outcome == Decision.FAILED and "p95 30.000 ms (SLO 25 ms)" in over.reason
    blind = decide(_result([1.0] * 40), gate(SLO(energy_per_inference_mj=5)), None)
    assert blind.outcome == Decision.INCONCLUSIVE and "no power reading" in blind.reason


def observed(key: str = "f/d0", **fields) -> ObservedDevice:  # type: ignore[no-untyped-def]
    base = dict(reachable=True, current="r-0", previous=None, status=DeviceStatus.COMMITTED, blobs=frozenset({"s"}),
                facts=DeviceFacts(python_version="3.11.2", numpy_version="1", onnxruntime_version="1.20",
                                  free_bytes=10**9))
    return ObservedDevice(key, **{**base, **fields})


def test_plan_actions_from_what_the_device_reports() -> None:
    want = desired(1)[0]
    cases = {
        Action.NO_CHANGE: observed(),
        Action.UPDATE: observed(current="r-old"),
        Action.INSTALL: observed(current=None),
        Action.REPAIR: observed(damaged=("model.onnx is missing",)),
        Action.REVERIFY: observed(status=DeviceStatus.VERIFYING),
        Action.REFUSED: observed(current="r-old", rejected=frozenset({"r-0"})),
        Action.UNREACHABLE: observed(reachable=False, error="no route"),
    }
    for action, seen in cases.items():
        plan = make_plan("dep", POLICY, {}, {}, None, [want], {want.key: seen})
        assert plan.devices[0].action == action, (action, plan.devices[0])
    untrusted = make_plan("dep", POLICY, {}, {}, None, [want],
                          {want.key: observed(reachable=False, error="host key changed", untrusted=True)})
    assert untrusted.devices[0].action == Action.REFUSED and not untrusted.is_noop


def test_a_changed_slo_plans_a_reverification_naming_devices_over_it() -> None:
    want = replace(desired(1)[0], slo={"latency_p95_ms": 0.01})
    seen = observed(verification={"slo": {"latency_p95_ms": 25}, "latency": {"p95_ms": 0.02}})
    plan = make_plan("dep", POLICY, {}, {}, None, [want], {want.key: seen})
    device = plan.devices[0]
    assert device.action == Action.REVERIFY and device.bytes_to_move == 0
    assert "is over the new SLO of 0.01 ms" in device.warnings[0]
    updating = replace(want, release_id="r-new")  # a new release and a tighter SLO in one change
    device = make_plan("dep", POLICY, {}, {}, None, [updating], {want.key: seen}).devices[0]
    assert device.action == Action.UPDATE and "tightened to 0.01 ms, below the p95 of 0.020 ms" in device.warnings[0]
    unchanged_slo = observed(verification={"slo": {"latency_p95_ms": 0.01}, "latency": {"p95_ms": 0.02}})
    assert make_plan("dep", POLICY, {}, {}, None, [updating], {want.key: unchanged_slo}).devices[0].warnings == ()


def test_health_is_judged_worst_first() -> None:
    slo = SLO(latency_p95_ms=1.0)
    assert health_of(observed(reachable=False, error="x"), None, slo)[0] == Health.UNREACHABLE
    assert health_of(observed(damaged=("x",)), None, slo)[0] == Health.DAMAGED
    assert health_of(observed(verification={"latency": {"p95_ms": 2.0}}), None, slo)[0] == Health.DEGRADED
    assert health_of(observed(verification={"latency": {"p95_ms": 0.5}}), None, slo)[0] == Health.HEALTHY
    assert health_of(observed(status=DeviceStatus.PAUSED), None, slo)[0] == Health.DEGRADED
    assert sync_of(observed(), "r-0") == Sync.SYNCED and sync_of(observed(), "r-9") == Sync.OUT_OF_SYNC


def test_a_saved_plan_must_be_the_plan_made_now() -> None:
    want = desired(3)
    seen = {d.key: observed(d.key, current="r-old") for d in want}
    plan = make_plan("dep", POLICY, {}, {}, None, want, seen)
    assert plan_differences(plan, plan) == []
    squashed = replace(plan, waves=1, devices=tuple(replace(d, wave=1) for d in plan.devices))
    assert any("saved update r-1 in wave 1, now update r-1 in wave 2" in d for d in plan_differences(squashed, plan))


def test_lock_refuses_waits_and_takes_over_a_dead_holder(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with ledger.lock(["lab"], holder="first"):
        with pytest.raises(LockHeld, match="locked by first") as refused:
            with ledger.lock(["lab"], holder="second"):
                pass
        assert refused.value.exit_code == ExitCode.LOCKED
    released = threading.Event()

    def hold() -> None:
        with ledger.lock(["lab"], holder="holder"):
            released.wait(5)
            time.sleep(0.3)

    thread = threading.Thread(target=hold)
    thread.start()
    time.sleep(0.1)
    released.set()
    with ledger.lock(["lab"], holder="waiter", wait_s=10):  # waits for the holder instead of failing
        pass
    thread.join()
    with ledger._connect() as db:  # a holder whose process is gone (a killed apply)
        db.execute("INSERT INTO locks (fleet, holder, pid, host, acquired_at) VALUES ('lab', 'dead', 999999999, ?, 'x')",
                   (__import__("socket").gethostname(),))
    with ledger.lock(["lab"], holder="next"):
        pass


def test_history_numbers_rollouts_per_deployment_and_the_recipe_baseline_skips_rollbacks(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    git = {"commit": "abc", "author": "Ada"}
    first = ledger.start_rollout("a", "apply", "ci", git, {})
    ledger.finish_rollout(first, "succeeded", {"recipe": {"cpu": [{"quantize": {"mode": "static"}}]}})
    other = ledger.start_rollout("b", "apply", "ci", git, {})
    ledger.finish_rollout(other, "succeeded", {"recipe": {}})
    back = ledger.start_rollout("a", "rollback", "ada", git, {})
    ledger.finish_rollout(back, "succeeded", {})
    assert [(r["number"], r["kind"], r["actor"]) for r in ledger.history("a")] == [(2, "rollback", "ada"),
                                                                                (1, "apply", "ci")]
    assert ledger.last_successful_summary("a") == {"recipe": {"cpu": [{"quantize": {"mode": "static"}}]}}


def test_a_new_artifact_is_compared_with_what_the_fleet_runs_and_warned_when_worse() -> None:
    from edgeops.review import compare_reports

    def report(size: int, p50: float, accuracy: float) -> dict:  # type: ignore[type-arg]
        return {"stages": [{"size_bytes": size, "latency_ms": {"p50": p50, "p95": p50 * 3},
                            "quality": {"metric": "accuracy", "value": accuracy}}]}

    line, worse = compare_reports(report(1_900_000, 0.4, 93.7), report(23_700_000, 1.6, 91.1))
    assert line.startswith("size 1900.0 → 23700.0 kB (12.47x larger); accuracy 93.7 → 91.1; host p50 0.400 → 1.600 ms "
                           "(0.25x the speed")
    assert worse == ["4.00x slower on the host (p50)", "lower in accuracy (93.7 → 91.1)"]
    assert compare_reports(report(1_000, 1.0, 90.0), report(900, 1.05, 90.0))[1] == []  # within noise: no warning


def test_the_recipe_diff_names_the_fields_that_changed() -> None:
    from edgeops.plan import recipe_diff

    before = {"cpu": [{"quantize": {"mode": "static", "per_channel": True, "calibration_method": "minmax"}}]}
    after = {"cpu": [{"quantize": {"mode": "dynamic", "per_channel": True, "calibration_method": "minmax"}},
                     {"prune": {"method": "structured", "sparsity": 0.25}}]}
    assert recipe_diff(before, after) == ["cpu step 1: quantize.mode static → dynamic",
                                          "cpu step 2: added: prune.method structured, prune.sparsity 0.25"]
    assert recipe_diff(after, after) == []
    assert recipe_diff(None, after) == ["no earlier successful rollout in the ledger"]
    from edgeops.manifest.models import RecipeStep

    stored = RecipeStep.model_validate({"quantize": {"mode": "static"}}).model_dump(mode="json", exclude_none=True)
    assert len(stored["quantize"]) > 5  # the ledger keeps every option, defaults included
    assert recipe_diff({"cpu": [stored]}, {"cpu": []}) == ["cpu step 1: removed: quantize.mode static"]
    older = {"quantize": {k: v for k, v in stored["quantize"].items() if k != "search"}}  # before the option existed
    assert recipe_diff({"cpu": [older]}, {"cpu": [stored]}) == []


def test_field_changes_name_each_field_and_list_item_that_differs() -> None:
    from edgeops.plan import field_changes

    old = {"spec": {"slo": {"latency_p95_ms": 25}, "devices": [{"name": "a", "host": "10.0.0.1"}], "x": 1}}
    new = {"spec": {"slo": {"latency_p95_ms": 20}, "devices": [{"name": "a", "host": "10.0.0.2"}, {"name": "b"}]}}
    assert field_changes(old, new) == ["spec.devices[0].host: 10.0.0.1 → 10.0.0.2",
                                       "spec.devices[1].name: (absent) → b",
                                       "spec.slo.latency_p95_ms: 25 → 20", "spec.x: 1 → (absent)"]
    assert field_changes(old, old) == [] and len(field_changes({}, {"k": list(range(30))}, limit=5)) == 6


V1_SCHEMA = """
CREATE TABLE rollouts (id INTEGER PRIMARY KEY AUTOINCREMENT, deployment TEXT NOT NULL, kind TEXT NOT NULL,
    started_at TEXT NOT NULL, finished_at TEXT, outcome TEXT, actor TEXT, git_commit TEXT, git_author TEXT,
    artifacts TEXT, summary TEXT);
CREATE TABLE device_events (id INTEGER PRIMARY KEY AUTOINCREMENT, rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
    deployment TEXT NOT NULL, device TEXT NOT NULL, wave INTEGER, release_id TEXT, from_release TEXT,
    action TEXT NOT NULL, decision TEXT NOT NULL, reason TEXT, bytes_moved INTEGER, measurements TEXT, at TEXT NOT NULL);
CREATE TABLE locks (fleet TEXT PRIMARY KEY, holder TEXT NOT NULL, pid INTEGER NOT NULL, host TEXT NOT NULL,
    acquired_at TEXT NOT NULL);
INSERT INTO rollouts (deployment, kind, started_at, outcome, actor, artifacts, summary)
    VALUES ('a', 'apply', '2026-01-01T00:00:00Z', 'succeeded', 'ci', '{"cpu": "abc"}', '{}');
PRAGMA user_version = 1;
"""


def test_a_ledger_from_the_first_schema_is_migrated_in_place_and_keeps_its_history(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "ledger.sqlite"
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.close()
    ledger = Ledger(path)
    assert [(r["kind"], r["artifacts"], r["release"]) for r in ledger.history("a")] == [("apply", {"cpu": "abc"}, None)]
    ledger.record_release("a", "rel-1234", {"cpu": "abc"}, {"x86": ["{}"]}, {"f/d1": "r-1", "f/d2": "r-2"})
    ledger.record_release("a", "rel-1234", {"cpu": "abc"}, {"arm": ["{}"]}, {"f/d3": "r-3"})  # merged, not replaced
    found = ledger.release("a", "rel-12")
    assert found is not None and found["members"] == {"f/d1": "r-1", "f/d2": "r-2", "f/d3": "r-3"}
    assert sorted(found["configs"]) == ["arm", "x86"]
    assert ledger.release("a", "rel-9") is None and ledger.release("b", "rel-12") is None
    assert ledger.release_names("a")[("f/d2", "r-2")] == "rel-1234"
    ledger.keep_learned("ab" * 32, b"an npz")  # the table of learned heads came with the migration
    assert ledger.learned("ab" * 32) == b"an npz" and ledger.learned("cd" * 32) is None
    Ledger(path)  # opening a current ledger again changes nothing
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 4


def test_the_fleet_wide_release_id_ignores_device_values_but_not_what_the_devices_run() -> None:
    from edgeops.release import Release, ReleaseFile, fleet_release_id

    def release(device: str, config: str = '{"threads": 1}', model: str = "m") -> Release:
        files = (ReleaseFile("model.onnx", model, 1), ReleaseFile("golden.npz", "g", 1))
        return Release(f"r-{device}", "dep", model, f"{device}{config}", files, config)

    two = fleet_release_id("dep", [release("d1"), release("d2")])
    assert two == fleet_release_id("dep", [release("d1"), release("d2"), release("d3")])  # one more of a known class
    assert two != fleet_release_id("dep", [release("d1"), release("d2", '{"threads": 2}')])
    assert two != fleet_release_id("dep", [release("d1", model="n"), release("d2", model="n")])
    assert two != fleet_release_id("other", [release("d1"), release("d2")])


def test_the_actor_is_the_os_account_without_edgeops_actor_or_user() -> None:
    import pwd

    from edgeops.settings import Settings

    assert Settings.from_environment({}).actor == pwd.getpwuid(os.getuid()).pw_name
    assert Settings.from_environment({"USER": "ana"}).actor == "ana"
    assert Settings.from_environment({"USER": "ana", "EDGEOPS_ACTOR": "ci-bot"}).actor == "ci-bot"
