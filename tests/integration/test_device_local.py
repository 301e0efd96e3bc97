"""Release layout operations with the local transport (a directory as a device): fast, no sshd."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from edgeops.device import Device
from edgeops.errors import DeviceError
from edgeops.manifest.workspace import load_workspace
from edgeops.release import make_release
from edgeops.render import render_device
from edgeops.targets import target_devices
from edgeops.transport.local import LocalTransport
from labkit.artifacts import build_for


def releases(root: Path, count: int):
    ws = load_workspace(root)
    doc = ws.deployments["wearable-activity"]
    artifact = build_for(ws, doc.name, "cpu").artifact
    target = target_devices(ws, doc.name)[0]
    config = render_device(ws, doc, target, artifact.report["artifact"])
    base = make_release(doc.name, artifact, config)
    out = []
    for index in range(count):
        text = config.text.replace('"intra_op_num_threads": 1', f'"intra_op_num_threads": {index + 1}')
        out.append(make_release(doc.name, artifact, replace(config, text=text, digest=f"{index:064d}")))
    assert len({r.id for r in out}) == count and base.id
    return out


@pytest.fixture
def device(tmp_path: Path) -> Device:
    import sys

    return Device(LocalTransport("local-01"), str(tmp_path / "device"), sys.executable, "wearable-activity")


def commit(device: Device, release) -> None:  # type: ignore[no-untyped-def]
    device.push(release)
    device.activate(release.id)
    device.record({"status": "committed", "verification": {"outcome": "Passed", "reason": f"{release.id} ok"}})


def test_push_activate_and_state_file(repo_copy: Path, device: Device) -> None:
    first, second = releases(repo_copy, 2)
    device.push(first)
    assert device.observe().current is None  # pushed, not switched
    device.activate(first.id)
    device.record({"status": "committed"})
    device.push(second)
    device.activate(second.id)
    root = Path(device.root) / "deployments" / "wearable-activity"
    assert (root / "current").resolve().name == second.id
    assert (root / "previous").resolve().name == first.id
    state = json.loads((root / "state.json").read_text())
    assert [h["action"] for h in state["history"]] == ["activate", "committed", "activate"]
    assert (state["status"], state["committed"], state["releases"][second.id]["state"]) == \
        ("verifying", first.id, "trial")
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]  # atomic writes leave no temp files
    release_dir = root / "releases" / second.id
    assert {p.name for p in release_dir.iterdir()} == {"model.onnx", "golden.npz", "runtime.json", "release.json"}


def test_a_rejected_release_is_never_a_baseline_previous_or_rollback_target(repo_copy: Path, device: Device) -> None:
    good, bad, later = releases(repo_copy, 3)
    commit(device, good)
    device.push(bad)
    assert device.activate(bad.id)["committed"] == good.id  # the baseline the controller measures against
    device.record({"verification": {"outcome": "Failed", "reason": "p95 30% slower"}})
    back = device.revert()
    assert (back["current"], back["rejected"]) == (good.id, bad.id)
    state = device.observe()
    assert (state.current, state.committed, state.previous, state.status) == (good.id, good.id, None, "committed")
    assert state.state["verification"]["reason"] == f"{good.id} ok"  # the running release's numbers
    assert state.state["last_rejected"] == {**state.state["last_rejected"], "release": bad.id, "reason": "p95 30% slower"}
    with pytest.raises(DeviceError, match="was rejected on this device"):
        device.activate(bad.id)
    with pytest.raises(DeviceError, match="was rejected on this device"):
        device.rollback(to=bad.id)
    commit(device, later)
    assert device.observe().previous == good.id  # the rejected release is skipped
    device.activate(bad.id, allow_rejected=True)  # named explicitly by the user
    assert device.observe().current == bad.id


def test_revert_of_a_first_install_leaves_no_release(repo_copy: Path, device: Device) -> None:
    (only,) = releases(repo_copy, 1)
    device.push(only)
    device.activate(only.id)
    assert device.revert()["current"] is None
    state = device.observe()
    assert (state.current, state.committed, state.status) == (None, None, "removed")


def test_rollback_to_a_named_release_and_missing_release(repo_copy: Path, device: Device) -> None:
    first, second, third, staged = releases(repo_copy, 4)
    for release in (first, second, third):
        commit(device, release)
    device.rollback(to=first.id)
    state = device.observe()
    assert (state.current, state.committed, state.previous) == (first.id, first.id, None)
    with pytest.raises(DeviceError, match="is not on the device"):
        device.rollback(to="r-0000000000000000")
    device.push(staged)
    with pytest.raises(DeviceError, match="was never committed on this device"):
        device.rollback(to=staged.id)
    with pytest.raises(DeviceError, match="no earlier committed release"):
        device.rollback()


def test_prune_keeps_current_previous_and_the_keep_count(repo_copy: Path, device: Device) -> None:
    several = releases(repo_copy, 5)
    for release in several:
        commit(device, release)
    result = device.prune(keep=3)
    state = device.observe()
    assert len(state.releases) == 3
    assert state.current == several[-1].id and state.previous == several[-2].id
    assert set(result["removed_releases"]) == {several[0].id, several[1].id}
    assert result["removed_blobs"] == 4  # their runtime.json and release.json; the shared model stays


def test_checksum_mismatch_discards_the_upload(repo_copy: Path, device: Device) -> None:
    (release,) = releases(repo_copy, 1)
    broken = replace(release, files=tuple(replace(f, sha256="0" * 64) if f.name == "runtime.json" else f
                                          for f in release.files))
    with pytest.raises(DeviceError, match="checksum mismatch"):
        device.push(broken)
    assert device.observe().current is None
    assert list((Path(device.root) / ".staging").iterdir()) == []
