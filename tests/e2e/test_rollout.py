"""End to end on the lab fleet: real sshd, real onnxruntime, real agent, real SQLite ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.connections import Connections
from edgeops.errors import ExitCode
from edgeops.manifest.workspace import load_workspace
from edgeops.operations import StalePlan, apply_deployment, plan_deployment, rollback_deployment
from edgeops.rollout import device_for, orders_for
from edgeops.targets import target_devices
from labkit.artifacts import repo_at
from labkit.repo import edited
from labkit.slow_model import make_mislabelled, make_slower

pytestmark = pytest.mark.ssh
MANIFEST = "manifests/wearable.yaml"


def ws_doc(root: Path):
    ws = load_workspace(root)
    return ws, ws.deployments["wearable-activity"]


def do_apply(root: Path, saved=None):
    ws, doc = ws_doc(root)
    with Connections() as connections:
        return apply_deployment(repo_at(root, ws), doc, connections, saved=saved)


def observe_all(root: Path) -> dict:
    ws, doc = ws_doc(root)
    with Connections() as connections:
        return {t.key: device_for(t, connections, doc.name).observe() for t in target_devices(ws, doc.name)}


def cli(root: Path, *args: str):
    return CliRunner().invoke(main, [*args, "--root", str(root)])


def edit(root: Path, file: str, old: str, new: str) -> None:
    path = root / file
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_clean_apply_then_a_second_apply_is_a_no_op(lab_repo: Path) -> None:
    plan, result = do_apply(lab_repo)
    assert result.outcome == "succeeded", result.message
    assert len(result.devices) == 4 and {d.decision for d in result.devices} <= {"Passed", "Inconclusive"}  # both keep it
    assert plan.waves == 3 and [len(plan.wave(n)) for n in (1, 2, 3)] == [1, 1, 2]  # [1, 50%, 100%]
    states = observe_all(lab_repo)
    assert all(s.status in ("committed", "inconclusive") and s.current for s in states.values())
    history_before = {k: len(s.state["history"]) for k, s in states.items()}

    _, again = do_apply(lab_repo)
    assert again.outcome == "no-op" and "no device was touched" in again.message
    assert sum(d.bytes_moved for d in again.devices) == 0
    assert {k: len(s.state["history"]) for k, s in observe_all(lab_repo).items()} == history_before

    status = cli(lab_repo, "status", MANIFEST, "-o", "json")
    assert status.exit_code == 0, status.output
    rows = json.loads(status.stdout)[0]["devices"]
    assert {(r["sync"], r["health"]) for r in rows} == {("Synced", "Healthy")}
    assert all(r["p95_ms"] > 0 and "hwmon, board" in r["power"] for r in rows)

    plan_again = cli(lab_repo, "plan", MANIFEST)
    assert plan_again.exit_code == 0  # 0 = no changes (terraform's -detailed-exitcode convention)


def test_a_model_swapped_for_a_much_worse_one_is_refused_at_plan(lab_repo: Path) -> None:
    """Every build gate passes a worse model (it is compared with itself); the plan compares it with what runs."""
    assert do_apply(lab_repo)[1].ok
    before = {k: s.current for k, s in observe_all(lab_repo).items()}
    make_mislabelled(lab_repo / "examples/models/wearable_cnn.onnx", lab_repo / "examples/models/worse.onnx")
    with edited((lab_repo / MANIFEST, "path: ../examples/models/wearable_cnn.onnx", "path: ../examples/models/worse.onnx"),
                (lab_repo / MANIFEST, "    sha256: ", "    # sha256: ")):
        planned = cli(lab_repo, "plan", MANIFEST, "-o", "json")
        assert planned.exit_code == ExitCode.REFUSED, planned.output
        devices = json.loads(planned.stdout)[0]["devices"]
        assert {d["action"] for d in devices} == {"refused"}, devices
        assert all("quality regression: accuracy" in d["reason"] and "--accept-quality-drop" in d["reason"]
                   for d in devices), devices
        applied = cli(lab_repo, "apply", MANIFEST)
        assert applied.exit_code != ExitCode.OK, applied.output
        assert {k: s.current for k, s in observe_all(lab_repo).items()} == before  # nothing switched
        accepted = cli(lab_repo, "plan", MANIFEST, "--accept-quality-drop")
        assert accepted.exit_code == ExitCode.CHANGES, accepted.output


def test_much_slower_model_is_caught_in_the_canary_and_rolled_back(lab_repo: Path) -> None:
    do_apply(lab_repo)
    before = {k: s.current for k, s in observe_all(lab_repo).items()}
    manifest = (lab_repo / MANIFEST).read_text()
    slow = make_slower(lab_repo / "examples/models/wearable_cnn.onnx", lab_repo / "examples/models/slow.onnx", 1024, 4)
    try:
        edit(lab_repo, MANIFEST, "path: ../examples/models/wearable_cnn.onnx", f"path: ../examples/models/{slow.name}")
        edit(lab_repo, MANIFEST, "    sha256: ", "    # sha256: ")
        plan, result = do_apply(lab_repo)
        assert result.outcome == "halted"
        canary = next(d for d in result.devices if d.wave == 1)
        assert canary.decision == "Failed", canary.reason
        assert "latency new/previous" in canary.reason and "rolled back to" in canary.reason
        assert [d.decision for d in result.devices if d.wave and d.wave > 1] == ["Skipped"] * 3
        after = observe_all(lab_repo)
        assert {k: s.current for k, s in after.items()} == before  # canary back, others never touched
        canary_state = after[canary.key]
        assert canary_state.status in ("committed", "inconclusive") and canary_state.previous != canary.release_id
        assert canary_state.state["releases"][canary.release_id]["state"] == "rejected"
        status = cli(lab_repo, "status", MANIFEST, "-o", "json")
        rows = {f"{r['fleet']}/{r['device']}": r for r in json.loads(status.stdout)[0]["devices"]}
        # healthy again on its committed release, with that release's numbers; git asks for another one
        assert rows[canary.key]["health"] == "Healthy" and rows[canary.key]["sync"] == "OutOfSync"
        assert "rejected on this device" in rows[canary.key]["message"]
        assert status.exit_code == 0, status.output
        history = repo_at(lab_repo).ledger.history("wearable-activity", 1)[0]
        assert history["outcome"] == "halted"
        assert history["devices"][0]["measurements"]["previous_latency"]["p95_ms"] > 0
        again = cli(lab_repo, "plan", MANIFEST, "-o", "json")  # the same release is not tried on it again
        assert again.exit_code == 4, again.output
        planned = {d["key"]: d for d in json.loads(again.stdout)[0]["devices"]}
        assert planned[canary.key]["action"] == "refused"
        assert "this device already rejected" in planned[canary.key]["reason"]
        undo = cli(lab_repo, "rollback", "wearable-activity", "-o", "json")  # the revert already undid it
        assert undo.exit_code == 0, undo.output
        assert json.loads(undo.stdout)["outcome"] == "no-op"
        assert {k: s.current for k, s in observe_all(lab_repo).items()} == before
    finally:
        (lab_repo / MANIFEST).write_text(manifest)
    _, recovered = do_apply(lab_repo)  # git back on the good model: nothing compares against the rejected one
    assert recovered.outcome == "no-op", recovered.message
    assert cli(lab_repo, "status", MANIFEST).exit_code == 0


def test_rollback_command_switches_back_without_moving_bytes(lab_repo: Path) -> None:
    do_apply(lab_repo)
    first = {k: s.current for k, s in observe_all(lab_repo).items()}
    profile = (lab_repo / "device_profiles/lab-cpu.yaml").read_text()
    try:
        edit(lab_repo, "device_profiles/lab-cpu.yaml", 'session.intra_op.allow_spinning: "0"',
             'session.intra_op.allow_spinning: "1"')  # a new runtime config: new releases, same model
        _, result = do_apply(lab_repo)
        assert result.outcome == "succeeded", result.message
        assert all(d.bytes_moved < 5000 for d in result.devices)  # the model blob was already there
        second = {k: s.current for k, s in observe_all(lab_repo).items()}
        assert second != first
        ws, doc = ws_doc(lab_repo)
        shown = CliRunner().invoke(main, ["plan", "--rollback", "wearable-activity", "-o", "json", "--root",
                                          str(lab_repo)])
        assert shown.exit_code == 2, shown.output  # changes pending, nothing changed yet
        planned = {d["key"]: (d["action"], d["release_id"]) for d in json.loads(shown.stdout)["devices"]}
        assert planned == {k: ("rollback", release) for k, release in first.items()}
        assert {k: s.current for k, s in observe_all(lab_repo).items()} == second  # plan changed nothing
        with Connections() as connections:
            rolled = rollback_deployment(repo_at(lab_repo, ws), doc, connections)
        assert rolled.outcome == "succeeded", rolled.message
        assert sum(d.bytes_moved for d in rolled.devices) == 0
        assert {k: s.current for k, s in observe_all(lab_repo).items()} == first
        assert repo_at(lab_repo).ledger.history("wearable-activity", 1)[0]["kind"] == "rollback"
        with Connections() as connections:  # once undone, the same rollout is not undone again
            again = rollback_deployment(repo_at(lab_repo, ws), doc, connections)
        assert again.outcome == "no-op" and {d.decision for d in again.devices} == {"Unchanged"}
        assert {k: s.current for k, s in observe_all(lab_repo).items()} == first
    finally:
        (lab_repo / "device_profiles/lab-cpu.yaml").write_text(profile)


def test_saved_plan_is_refused_when_devices_moved(lab_repo: Path, tmp_path: Path) -> None:
    ws, doc = ws_doc(lab_repo)
    do_apply(lab_repo)
    target = target_devices(ws, doc.name)[1]
    orders = orders_for(target, None, doc.name)  # an operator holding the release key, by hand
    with Connections() as connections:
        device = device_for(target, connections, doc.name)
        running = device.observe().current
        device.uninstall(order=orders("uninstall", None))  # somebody changes a device by hand
    saved = tmp_path / "plan.json"
    assert cli(lab_repo, "plan", MANIFEST, "--out", str(saved)).exit_code == 2
    with Connections() as connections:
        plan, _ = plan_deployment(repo_at(lab_repo, ws), doc, connections)
        device_for(target, connections, doc.name).rollback(to=running, order=orders)  # ...and after the plan
    from edgeops.plan import Plan

    with pytest.raises(StalePlan, match="devices changed since"):
        do_apply(lab_repo, saved=Plan.from_json(saved.read_text()))
    result = cli(lab_repo, "apply", MANIFEST, "--plan", str(saved))
    assert result.exit_code == 1 and "stale" in result.stderr
    _, fixed = do_apply(lab_repo)
    assert fixed.outcome == "succeeded"


def test_unreachable_devices_count_against_their_own_budget(lab_repo: Path) -> None:
    from labkit.repo import free_ports

    fleet_file = lab_repo / "manifests/fleets/lab.yaml"
    fleet = fleet_file.read_text()
    profile = (lab_repo / "device_profiles/lab-cpu.yaml").read_text()
    try:
        port, other_port = free_ports(2)
        fleet_file.write_text(fleet + f"    - {{name: lab-gone, host: 127.0.0.1, port: {port}, "
                                      f"root: /tmp/edgeops-gone, labels: {{ring: main}}}}\n")
        edit(lab_repo, "device_profiles/lab-cpu.yaml", "inter_op_num_threads: 1", "inter_op_num_threads: 2")
        _, result = do_apply(lab_repo)  # 1 of 5 unreachable: within max_unreachable_devices 25%
        assert result.count("Unreachable") == 1 and result.count("Failed") == 0
        # the reachable devices got the new runtime config (an Inconclusive verdict on noise keeps it too)
        assert sum(d.committed for d in result.devices) == 4
        assert result.outcome == "succeeded", result.message
        fleet_file.write_text(fleet_file.read_text() + f"    - {{name: lab-gone-2, host: 127.0.0.1, port: {other_port}, "
                                                       f"root: /tmp/edgeops-gone-2, labels: {{ring: main}}}}\n")
        edit(lab_repo, "device_profiles/lab-cpu.yaml", "inter_op_num_threads: 2", "inter_op_num_threads: 3")
        _, halted = do_apply(lab_repo)  # 2 of 6 unreachable: over budget, nothing starts
        assert halted.outcome == "halted" and "max_unreachable_devices" in halted.message
        assert halted.count("Failed") == 0 and halted.count("Passed") == 0
    finally:
        fleet_file.write_text(fleet)
        (lab_repo / "device_profiles/lab-cpu.yaml").write_text(profile)


def test_history_command_shows_decisions(lab_repo: Path) -> None:
    do_apply(lab_repo)
    result = cli(lab_repo, "history", "wearable-activity", "-o", "json")
    assert result.exit_code == 0
    rollouts = json.loads(result.stdout)
    assert rollouts and all("devices" in r and r["started_at"] for r in rollouts)
    decisions = {e["decision"] for r in rollouts for e in r["devices"]}
    assert "Passed" in decisions


def test_interrupt_lets_devices_in_flight_finish_and_starts_nothing_new(lab_repo: Path) -> None:
    from edgeops.rollout import ApplyContext, SilentReporter
    from edgeops.rollout import execute as apply

    profile = (lab_repo / "device_profiles/lab-cpu.yaml").read_text()
    try:
        edit(lab_repo, "device_profiles/lab-cpu.yaml", "inter_op_num_threads: 1", "inter_op_num_threads: 4")
        ws, doc = ws_doc(lab_repo)
        ledger = repo_at(lab_repo).ledger
        with Connections() as connections:
            plan, desired = plan_deployment(repo_at(lab_repo, ws), doc, connections)

            class CtrlCDuringCanaryPush(SilentReporter):
                def stage(self, key: str, stage: str, detail: str = "") -> None:
                    if stage == "switch":  # the user presses Ctrl-C while the canary is switching
                        ctx.stop.set()

            ctx = ApplyContext(desired, connections, ledger, "tester", {}, CtrlCDuringCanaryPush())
            result = apply(plan, ctx)
        assert result.outcome == "interrupted"
        canary = next(d for d in result.devices if d.wave == 1)
        assert canary.committed  # finished its step: switched, verified, kept (Passed, or Inconclusive on noise)
        assert {d.decision for d in result.devices if d.wave and d.wave > 1} == {"Skipped"}
        states = observe_all(lab_repo)
        assert states[canary.key].status in ("committed", "inconclusive")
    finally:
        (lab_repo / "device_profiles/lab-cpu.yaml").write_text(profile)


def test_a_tighter_slo_is_judged_now_and_plans_a_reverification_without_transfer(lab_repo: Path) -> None:
    do_apply(lab_repo)
    manifest = (lab_repo / MANIFEST).read_text()
    try:
        edit(lab_repo, MANIFEST, "latency_p95_ms: 25", "latency_p95_ms: 0.001")
        status = cli(lab_repo, "status", MANIFEST, "-o", "json")
        assert status.exit_code == 1, status.output  # recorded numbers over the SLO in git now
        rows = json.loads(status.stdout)[0]["devices"]
        assert {r["health"] for r in rows} == {"Degraded"}
        assert all("exceeds the SLO 0.001 ms in git" in r["message"] for r in rows)
        plan = cli(lab_repo, "plan", MANIFEST, "-o", "json")
        assert plan.exit_code == 2, plan.output
        [document] = json.loads(plan.stdout)
        assert {d["action"] for d in document["devices"]} == {"reverify"}
        assert all(d["bytes_to_move"] == 0 and "latency_p95_ms 25.0 -> 0.001" in d["reason"]
                   for d in document["devices"])
        assert any(n.startswith("the SLO changed: 4 device(s)") for n in document["notes"])
        assert all("is over the new SLO of 0.001 ms" in d["warnings"][0] for d in document["devices"])
        comment = cli(lab_repo, "plan", MANIFEST, "-o", "markdown").stdout
        assert comment.count("is over the new SLO") == 4  # the PR comment names every device over it
        _, result = do_apply(lab_repo)
        assert result.outcome == "halted" and sum(d.bytes_moved for d in result.devices) == 0
    finally:
        (lab_repo / MANIFEST).write_text(manifest)
    _, back = do_apply(lab_repo)
    assert back.outcome in ("no-op", "succeeded"), back.message
    assert cli(lab_repo, "status", MANIFEST).exit_code == 0


def test_a_hand_edited_saved_plan_is_refused(lab_repo: Path, tmp_path: Path) -> None:
    do_apply(lab_repo)
    profile = (lab_repo / "device_profiles/lab-cpu.yaml").read_text()
    try:
        edit(lab_repo, "device_profiles/lab-cpu.yaml", "inter_op_num_threads: 1", "inter_op_num_threads: 2")
        saved = tmp_path / "plan.json"
        assert cli(lab_repo, "plan", MANIFEST, "--out", str(saved)).exit_code == 2
        original = json.loads(saved.read_text())
        everything_at_once = {**original, "waves": 1, "devices": [{**d, "wave": 1} for d in original["devices"]]}
        saved.write_text(json.dumps(everything_at_once))
        result = cli(lab_repo, "apply", MANIFEST, "--plan", str(saved))
        assert result.exit_code == 1 and "not the plan edgeops makes now" in result.stderr, result.output
        assert "lab/lab-02: saved update" in result.stderr
        dropped = {**original, "devices": original["devices"][:-1]}
        saved.write_text(json.dumps(dropped))
        result = cli(lab_repo, "apply", MANIFEST, "--plan", str(saved))
        assert result.exit_code == 1 and "not in the saved plan" in result.stderr, result.output
        saved.write_text(json.dumps(original))
        assert cli(lab_repo, "apply", MANIFEST, "--plan", str(saved)).exit_code == 0
    finally:
        (lab_repo / "device_profiles/lab-cpu.yaml").write_text(profile)


def test_on_failure_pause_leaves_the_device_as_it_is_until_abort_or_promote(lab_repo: Path) -> None:
    do_apply(lab_repo)
    before = {k: s.current for k, s in observe_all(lab_repo).items()}
    manifest = (lab_repo / MANIFEST).read_text()
    try:
        edit(lab_repo, MANIFEST, "on_failure: rollback", "on_failure: pause")
        edit(lab_repo, MANIFEST, "    sha256: ", "    # sha256: ")
        for name, width in (("slow-a.onnx", 1024), ("slow-b.onnx", 1100)):
            make_slower(lab_repo / "examples/models/wearable_cnn.onnx", lab_repo / f"examples/models/{name}", width, 4)
        edit(lab_repo, MANIFEST, "path: ../examples/models/wearable_cnn.onnx", "path: ../examples/models/slow-a.onnx")
        _, paused = do_apply(lab_repo)
        assert paused.outcome == "paused" and "edgeops resume" in paused.message, paused.message
        canary = next(d for d in paused.devices if d.wave == 1)
        assert canary.decision == "Paused"
        state = observe_all(lab_repo)[canary.key]
        assert state.current == canary.release_id and state.status == "paused" and "trial" not in state.state
        rows = {f"{r['fleet']}/{r['device']}": r for r in json.loads(cli(lab_repo, "status", MANIFEST, "-o", "json").stdout)[0]["devices"]}
        assert rows[canary.key]["health"] == "Degraded" and "paused" in rows[canary.key]["message"]
        aborted = cli(lab_repo, "abort", "wearable-activity")
        assert aborted.exit_code == 0 and "1 device(s) aborted" in aborted.output, aborted.output
        state = observe_all(lab_repo)[canary.key]
        assert state.current == before[canary.key] and state.state["releases"][canary.release_id]["state"] == "rejected"
        assert cli(lab_repo, "resume", "wearable-activity").exit_code == 1  # nothing is paused now

        edit(lab_repo, MANIFEST, "path: ../examples/models/slow-a.onnx", "path: ../examples/models/slow-b.onnx")
        _, paused = do_apply(lab_repo)
        canary = next(d for d in paused.devices if d.wave == 1)
        assert paused.outcome == "paused" and canary.decision == "Paused"
        promoted = cli(lab_repo, "promote", "wearable-activity")  # accept it as measured, then continue
        assert "1 device(s) promoted" in promoted.output, promoted.output
        state = observe_all(lab_repo)[canary.key]
        assert state.current == canary.release_id and state.committed == canary.release_id
        history = repo_at(lab_repo).ledger.history("wearable-activity", 3)
        assert [r["kind"] for r in history][:2] == ["resume", "promote"]  # promote, then the rollout goes on
    finally:
        (lab_repo / MANIFEST).write_text(manifest)
    for key, state in observe_all(lab_repo).items():  # leave nothing paused for the next test
        if state.status == "paused":
            cli(lab_repo, "abort", "wearable-activity")
            break
    _, back = do_apply(lab_repo)
    assert back.ok, back.message
    assert cli(lab_repo, "status", MANIFEST).exit_code == 0


def test_status_never_builds_it_says_the_release_git_asks_for_is_not_built(lab_repo: Path) -> None:
    do_apply(lab_repo)
    manifest = (lab_repo / MANIFEST).read_text()
    cache = lab_repo / ".edgeops" / "cache"
    entries = sorted(p.name for p in cache.rglob("*") if p.is_dir())
    try:
        edit(lab_repo, MANIFEST, "calibration_method: minmax", "calibration_method: entropy")  # a new artifact
        status = cli(lab_repo, "status", MANIFEST, "-o", "json")
        assert status.exit_code == 0, status.output  # the devices are healthy; what git asks for is unknown
        rows = json.loads(status.stdout)[0]["devices"]
        assert {r["sync"] for r in rows} == {"Unknown"} and {r["health"] for r in rows} == {"Healthy"}
        assert all("is not built yet" in r["message"] for r in rows)
        assert sorted(p.name for p in cache.rglob("*") if p.is_dir()) == entries  # nothing was built
        assert cli(lab_repo, "status", MANIFEST, "--drift-only").exit_code == 1
    finally:
        (lab_repo / MANIFEST).write_text(manifest)
