"""Rollback, promote and abort as plans: decided by pure functions, run by the one executor (through its seam,
with scripted device work and a real SQLite ledger), recorded only by it."""

from __future__ import annotations

import ast
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgeops.manifest.workspace import load_workspace
from edgeops.plan import ObservedDevice, PlannedDevice
from edgeops.plan_operations import rollback_landing, rollback_plan, settle_plan
from edgeops.rollout import ApplyContext, DeviceOutcome, execute
from edgeops.state.sqlite import SqliteLedger
from edgeops.targets import TargetDevice, target_devices
from edgeops.types import Action, Decision, DeviceStatus, Outcome

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = "wearable-activity"


@pytest.fixture(scope="module")
def targets() -> list[TargetDevice]:
    return target_devices(load_workspace(ROOT), DEPLOYMENT)


def committed(key: str, current: str | None, previous: str | None = None, **kw: object) -> ObservedDevice:
    return ObservedDevice(key, True, current=current, previous=previous, committed=current,
                          status=DeviceStatus.COMMITTED, **kw)  # type: ignore[arg-type]


def last_apply(events: dict[str, tuple[str, str]]) -> dict[str, object]:
    return {"number": 7, "outcome": "succeeded",
            "devices": [{"device": k, "decision": d, "release_id": r} for k, (d, r) in events.items()]}


# ------------------------------------------------------------------ planning (pure)


def test_a_plain_rollback_undoes_only_what_the_last_apply_left(targets: list[TargetDevice]) -> None:
    a, b, c, d = (t.key for t in targets)
    observed = {a: committed(a, "r-new", "r-old"), b: committed(b, "r-old", "r-older"),
                c: committed(c, "r-new", None), d: ObservedDevice(d, False, error="timed out")}
    last = last_apply({a: ("Passed", "r-new"), b: ("Failed", "r-new"), c: ("Passed", "r-new")})
    plan = rollback_plan(DEPLOYMENT, targets, observed, last=last)
    by = {p.key: p for p in plan.devices}
    assert (by[a].action, by[a].release_id, by[a].wave) == (Action.ROLLBACK, "r-old", 1)
    assert by[b].action == Action.NO_CHANGE and "nothing to undo" in by[b].reason
    assert by[c].action == Action.NO_CHANGE and "no earlier committed release" in by[c].reason
    assert by[d].action == Action.UNREACHABLE and by[d].reason == "timed out"
    assert plan.kind == "rollback" and plan.waves == 1 and all(p.bytes_to_move == 0 for p in plan.devices)


def test_a_trial_goes_back_to_the_committed_release_and_a_first_install_to_none(targets: list[TargetDevice]) -> None:
    a, b = targets[0].key, targets[1].key
    observed = {a: ObservedDevice(a, True, current="r-try", committed="r-old", previous="r-old", status="verifying"),
                b: ObservedDevice(b, True, current="r-try", committed=None, status="verifying")}
    assert rollback_landing(observed[a], a, None, None)[0] == "r-old"
    assert rollback_landing(observed[b], b, None, None)[0] == "none"


def test_a_release_the_device_rejected_is_refused_unless_allowed(targets: list[TargetDevice]) -> None:
    a = targets[0].key
    observed = {t.key: committed(t.key, "r-new", "r-old") for t in targets}
    observed[a] = committed(a, "r-new", "r-old", rejected=frozenset({"r-bad"}))
    refused = {p.key: p for p in rollback_plan(DEPLOYMENT, targets, observed, to="r-bad").devices}
    assert refused[a].action == Action.REFUSED and "--allow-rejected" in refused[a].reason
    assert refused[targets[1].key].action == Action.ROLLBACK  # never rejected there: named by --to
    allowed = {p.key: p for p in rollback_plan(DEPLOYMENT, targets, observed, to="r-bad", allow_rejected=True).devices}
    assert allowed[a].action == Action.ROLLBACK


def test_a_fleet_release_lands_each_device_on_its_own_materialisation(targets: list[TargetDevice]) -> None:
    a, b = targets[0].key, targets[1].key
    observed = {t.key: committed(t.key, "r-new", "r-old") for t in targets}
    observed[b] = committed(b, "r-b-old", "r-x")
    release = {"id": "rel-1", "members": {a: "r-a-old", b: "r-b-old"}}
    by = {p.key: p for p in rollback_plan(DEPLOYMENT, targets, observed, to="rel-1", fleet_release=release).devices}
    assert (by[a].action, by[a].release_id) == (Action.ROLLBACK, "r-a-old")
    assert by[b].action == Action.NO_CHANGE and "already runs rel-1" in by[b].reason
    assert by[targets[2].key].action == Action.NO_CHANGE and "not a device of rel-1" in by[targets[2].key].reason


def test_settling_touches_only_paused_devices_and_never_a_pull_device(targets: list[TargetDevice]) -> None:
    a, b, c, d = (t.key for t in targets)
    observed = {a: ObservedDevice(a, True, current="r-new", committed="r-old", status=DeviceStatus.PAUSED),
                b: committed(b, "r-old"), c: ObservedDevice(c, True, current="r-new", status=DeviceStatus.PAUSED),
                d: ObservedDevice(d, False, error="refused", untrusted=True)}
    plan = settle_plan(DEPLOYMENT, targets, observed, accept=True, pulled=frozenset({c}))
    by = {p.key: p for p in plan.devices}
    assert (plan.kind, by[a].action, by[a].release_id) == ("promote", Action.PROMOTE, "r-new")
    assert by[b].action == Action.NO_CHANGE and by[c].action == Action.NO_CHANGE
    assert by[d].action == Action.REFUSED
    assert settle_plan(DEPLOYMENT, targets, observed, accept=False).kind == "abort"


# ------------------------------------------------------------------ executing (through the executor's seam)


@dataclass
class ScriptedWork:
    """Device work that answers each planned action from a script (key -> decision)."""

    script: dict[str, Decision] = field(default_factory=dict)
    rolled: list[tuple[str, str]] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)

    def roll(self, planned: PlannedDevice) -> DeviceOutcome:
        self.rolled.append((planned.key, planned.action))
        done = {Action.ROLLBACK: Decision.ROLLED_BACK, Action.ABORT: Decision.ROLLED_BACK,
                Action.PROMOTE: Decision.PASSED}[planned.action]
        decision = self.script.get(planned.key, done)
        return DeviceOutcome(planned.key, planned.action, decision, f"scripted {decision}", planned.release_id,
                             planned.current, wave=planned.wave, committed=decision == Decision.PASSED)

    def undo(self, key: str, why: str, back: str | None) -> tuple[bool, str]:
        self.undone.append(key)
        return True, "undone"


def context(tmp_path: Path, targets: list[TargetDevice], stop: threading.Event | None = None) -> ApplyContext:
    ctx = ApplyContext(None, None, SqliteLedger(tmp_path / "ledger.sqlite"), "tester", {"sha": "abc"},  # type: ignore[arg-type]
                       doc=load_workspace(ROOT).deployments[DEPLOYMENT], members={t.key: t for t in targets})
    if stop is not None:
        ctx.stop = stop
    return ctx


def test_a_rollback_is_executed_and_recorded_by_the_executor(tmp_path: Path, targets: list[TargetDevice]) -> None:
    a, b, c, d = (t.key for t in targets)
    observed = {a: committed(a, "r-new", "r-old"), b: committed(b, "r-new", "r-old"), c: committed(c, "r-old"),
                d: committed(d, "r-new", "r-old")}
    last = last_apply({a: ("Passed", "r-new"), b: ("Passed", "r-new"), d: ("Passed", "r-new")})
    plan = rollback_plan(DEPLOYMENT, targets, observed, last=last)
    ctx = context(tmp_path, targets)
    work = ScriptedWork({b: Decision.FAILED})
    result = execute(plan, ctx, work)
    assert sorted(work.rolled) == [(a, "rollback"), (b, "rollback"), (d, "rollback")]
    assert not work.undone  # a failed rollback is reported, never "undone" by the halt rule
    assert result.outcome == Outcome.HALTED and result.message == "2 device(s) rolled back, 1 failed, 1 unchanged"
    [rollout] = ctx.ledger.history(DEPLOYMENT)
    assert rollout["kind"] == "rollback" and rollout["outcome"] == Outcome.HALTED
    assert {e["device"]: e["decision"] for e in rollout["devices"]} == {a: "RolledBack", b: "Failed", d: "RolledBack"}


def test_a_rollback_with_nothing_to_do_records_nothing(tmp_path: Path, targets: list[TargetDevice]) -> None:
    observed = {t.key: committed(t.key, "r-old") for t in targets}
    ctx = context(tmp_path, targets)
    result = execute(rollback_plan(DEPLOYMENT, targets, observed, last=last_apply({})), ctx, ScriptedWork())
    assert result.outcome == Outcome.NO_OP and result.message.startswith("nothing to roll back: ")
    assert "nothing to undo" in result.message  # each device's reason, as the plan gave it
    assert ctx.ledger.history(DEPLOYMENT) == []


def test_an_unreachable_device_does_not_stop_the_rollback_of_the_others(tmp_path: Path,
                                                                        targets: list[TargetDevice]) -> None:
    a, b, c, d = (t.key for t in targets)
    observed = {a: ObservedDevice(a, False, error="no route"), b: committed(b, "r-new", "r-old"),
                c: committed(c, "r-new", "r-old"), d: committed(d, "r-new", "r-old")}
    work = ScriptedWork()
    result = execute(rollback_plan(DEPLOYMENT, targets, observed), context(tmp_path, targets), work)
    assert sorted(k for k, _ in work.rolled) == [b, c, d]  # budgets never stop a rollback half way
    assert result.outcome == Outcome.HALTED and "1 unreachable" in result.message


def test_promote_and_abort_run_through_the_executor(tmp_path: Path, targets: list[TargetDevice]) -> None:
    a, b = targets[0].key, targets[1].key
    observed = {t.key: committed(t.key, "r-old") for t in targets}
    observed[a] = ObservedDevice(a, True, current="r-new", committed="r-old", status=DeviceStatus.PAUSED)
    for accept, kind, message in ((True, "promote", "1 device(s) promoted"), (False, "abort", "1 device(s) aborted")):
        ctx, work = context(tmp_path / kind, targets), ScriptedWork()
        result = execute(settle_plan(DEPLOYMENT, targets, observed, accept), ctx, work)
        assert work.rolled == [(a, kind)] and result.outcome == Outcome.SUCCEEDED
        assert result.message.startswith(message)
        assert ctx.ledger.history(DEPLOYMENT)[0]["kind"] == kind
    failing = ScriptedWork({a: Decision.FAILED})
    result = execute(settle_plan(DEPLOYMENT, targets, observed, True), context(tmp_path / "failing", targets), failing)
    assert result.outcome == Outcome.HALTED and not failing.undone
    assert b not in [k for k, _ in failing.rolled]


def test_a_stopped_rollback_starts_no_device(tmp_path: Path, targets: list[TargetDevice]) -> None:
    observed = {t.key: committed(t.key, "r-new", "r-old") for t in targets}
    stop = threading.Event()
    stop.set()
    work = ScriptedWork()
    result = execute(rollback_plan(DEPLOYMENT, targets, observed), context(tmp_path, targets, stop), work)
    assert work.rolled == [] and result.outcome == Outcome.INTERRUPTED


def test_operations_build_no_device_outcome_and_write_no_rollout_record() -> None:
    """The executor is the only code that decides device outcomes and writes rollouts; operations compose."""
    tree = ast.parse((ROOT / "edgeops" / "operations.py").read_text())
    called = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
              for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not called & {"DeviceOutcome", "RolloutResult", "start_rollout", "device_event", "finish_rollout",
                         "rollback", "revert", "record", "activate", "push", "heal", "uninstall"}


def test_max_parallel_caps_how_many_devices_run_at_once(tmp_path: Path, targets: list[TargetDevice]) -> None:
    """The policy allows 4 at once; ``max_parallel`` 1 (apply --max-parallel 1, a slow shared link) runs one."""
    import time

    observed = {t.key: committed(t.key, "r-new", "r-old") for t in targets}
    plan = rollback_plan(DEPLOYMENT, targets, observed)
    running, most = [0], [0]
    lock = threading.Lock()

    class Counting(ScriptedWork):
        def roll(self, planned: PlannedDevice) -> DeviceOutcome:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.05)  # long enough for others to start, were they allowed to
            with lock:
                running[0] -= 1
            return super().roll(planned)

    ctx = context(tmp_path, targets)
    ctx.max_parallel = 1
    execute(plan, ctx, Counting())
    assert most[0] == 1
