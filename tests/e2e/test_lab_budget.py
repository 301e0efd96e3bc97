"""Lab devices with their own CPU and memory budgets, enforced by the kernel on the sshd and all it starts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.errors import HostUnreachable
from edgeops.lab import admin_key_of, cgroup_name, lab_down, lab_up
from edgeops.labcgroup import Budget, applied, members
from edgeops.manifest.workspace import load_workspace
from edgeops.targets import target_devices
from edgeops.transport.ssh import SSHTransport, target_for
from labkit.hostcaps import cgroups_writable
from labkit.repo import copy_repo, share_build_cache, write_lab_fleet

pytestmark = pytest.mark.ssh


@pytest.fixture(scope="module")
def budget_lab(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    why = cgroups_writable()
    if why:
        pytest.skip(f"this host cannot create cgroups: {why}")
    base = tmp_path_factory.mktemp("budget")
    root = copy_repo(base / "repo")
    share_build_cache(root)
    fleet = write_lab_fleet(root, 2, base / "devices")
    text = fleet.read_text().replace("  devices:\n", "  lab: {cpu: 0.5, memory_mb: 256}\n  devices:\n")
    fleet.write_text(text.replace("labels: {ring: main}}", "labels: {ring: main}, lab: {memory_mb: 128}}"))
    ws = load_workspace(root)
    devices = lab_up(ws, ws.fleets["lab"], target_devices(ws, "wearable-activity"))
    try:
        yield root, devices
    finally:
        lab_down(load_workspace(root), load_workspace(root).fleets["lab"])


def admin(root: Path, index: int) -> SSHTransport:
    t = target_devices(load_workspace(root), "wearable-activity")[index]
    ssh = t.fleet.obj.spec.ssh
    return SSHTransport(replace(target_for(t.name, t.device.host, t.device.port, ssh, t.fleet.path.parent, None),
                                user="root", identity_file=str(admin_key_of(load_workspace(root)))))


def test_each_device_runs_under_its_own_budget_and_lab_status_shows_it(budget_lab) -> None:  # type: ignore[no-untyped-def]
    root, devices = budget_lab
    canary, main_device = devices
    assert "0.5 core, 256 MB" in canary.budget and "0.5 core, 128 MB" in main_device.budget  # device overrides
    ws = load_workspace(root)
    first, second = cgroup_name(ws, "lab", "lab-01"), cgroup_name(ws, "lab", "lab-02")
    assert applied(first) == Budget(0.5, 256) and applied(second) == Budget(0.5, 128)
    assert canary.pid in members(first)
    shown = CliRunner().invoke(main, ["lab", "status", "lab", "--root", str(root)])
    assert "lab/lab-01" in shown.output and "0.5 core, 256 MB" in shown.output, shown.output


def test_a_session_and_what_it_starts_are_inside_the_budget(budget_lab) -> None:  # type: ignore[no-untyped-def]
    root, _ = budget_lab
    transport = admin(root, 1)
    try:
        groups = transport.run(["cat", "/proc/self/cgroup"]).stdout
        assert f"edgeops-lab/{cgroup_name(load_workspace(root), 'lab', 'lab-02')}" in groups, groups
        # more memory than the device has: the kernel's OOM killer stops it there (the process, or the session it
        # ran in), as on a small device
        try:
            grab = transport.run(["python3", "-c", "b = bytearray(400 * 2**20); b[::4096] = b'x' * len(b[::4096])"],
                                 check=False)
            assert grab.exit_status != 0, grab
        except HostUnreachable:
            pass
    finally:
        transport.close()
    again = admin(root, 1)  # the device itself lives on: a new session, an allocation that fits
    try:
        fits = again.run(["python3", "-c", "b = bytearray(32 * 2**20); print(len(b))"])
        assert fits.stdout.strip() == str(32 * 2**20)
    finally:
        again.close()


def test_lab_down_removes_the_budgets(tmp_path: Path) -> None:
    why = cgroups_writable()
    if why:
        pytest.skip(f"this host cannot create cgroups: {why}")
    root = copy_repo(tmp_path / "repo")
    fleet = write_lab_fleet(root, 1, tmp_path / "devices")
    fleet.write_text(fleet.read_text().replace("  devices:\n", "  lab: {cpu: 0.25}\n  devices:\n"))
    ws = load_workspace(root)
    [device] = lab_up(ws, ws.fleets["lab"], target_devices(ws, "wearable-activity"))
    name = cgroup_name(ws, "lab", "lab-01")
    assert applied(name).cpu == 0.25 and device.pid in members(name)
    lab_down(ws, ws.fleets["lab"])
    assert members(name) == set() and applied(name) == Budget()


def test_the_wearable_rollout_passes_on_half_a_core_and_a_small_memory(budget_lab) -> None:  # type: ignore[no-untyped-def]
    import json

    root, _ = budget_lab
    applied_now = CliRunner().invoke(main, ["apply", "manifests/wearable.yaml", "-o", "json", "--root", str(root)])
    assert applied_now.exit_code == 0, applied_now.output
    decisions = {d["decision"] for d in json.loads(applied_now.stdout)[0]["devices"]}
    assert decisions <= {"Passed", "Inconclusive"}, applied_now.stdout  # Inconclusive keeps it, as Passed does


def test_a_model_too_big_for_the_device_fails_on_memory_and_every_device_stays(budget_lab) -> None:  # type: ignore[no-untyped-def]
    import json

    from labkit.repo import edited
    from labkit.slow_model import make_heavier

    root, _ = budget_lab
    manifest = root / "manifests" / "wearable.yaml"
    runner = CliRunner()
    assert runner.invoke(main, ["apply", "manifests/wearable.yaml", "--root", str(root)]).exit_code == 0
    status = json.loads(runner.invoke(main, ["status", "manifests/wearable.yaml", "-o", "json", "--root",
                                             str(root)]).stdout)[0]["devices"]
    before = {row["device"]: row["release"] for row in status}
    make_heavier(root / "examples/models/wearable_cnn.onnx", root / "examples/models/heavy.onnx", 300)
    recipe = "  recipe:\n    - quantize:\n        mode: static\n        per_channel: true\n        calibration_method: minmax\n"
    assert recipe in manifest.read_text()
    with edited((manifest, "path: ../examples/models/wearable_cnn.onnx", "path: ../examples/models/heavy.onnx"),
                (manifest, "    sha256: ", "    # sha256: "), (manifest, recipe, "  recipe: []\n")):
        done = runner.invoke(main, ["apply", "manifests/wearable.yaml", "-o", "json", "--root", str(root)])
    assert done.exit_code == 1, done.output
    result = json.loads(done.stdout)[0]
    canary = next(d for d in result["devices"] if d["wave"] == 1)
    assert result["outcome"] == "halted" and canary["decision"] == "Failed", result
    assert "out of memory" in canary["reason"], canary["reason"]  # named: the kernel killed it for memory
    status = json.loads(runner.invoke(main, ["status", "manifests/wearable.yaml", "-o", "json", "--root",
                                             str(root)]).stdout)[0]["devices"]
    assert {row["device"]: row["release"] for row in status} == before  # every device on its committed release
