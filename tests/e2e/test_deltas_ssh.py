"""Deltas on the wire, over real sshd: a release whose model differs from the running one only in some tensors
(a head retrained in git) moves only the blocks that changed; the device rebuilds the file, which must hash to
the signed file table before it becomes a blob; a corrupted patch is refused and changes nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edgeops.blocks import patch_block
from edgeops.connections import Connections
from edgeops.device import AgentFailed
from edgeops.manifest.workspace import load_workspace
from edgeops.operations import apply_deployment
from edgeops.rollout import device_for
from edgeops.targets import target_devices
from labkit.artifacts import repo_at
from labkit.federated import retrain_head, write_float_digits
from labkit.repo import copy_repo, share_build_cache, write_lab_fleet

pytestmark = pytest.mark.ssh
NAME = "digits-float"


@pytest.fixture(scope="module")
def delta_lab(tmp_path_factory: pytest.TempPathFactory, hostile_home: Path):
    from edgeops.lab import lab_down, lab_up

    base = tmp_path_factory.mktemp("deltas")
    root = copy_repo(base / "repo")
    share_build_cache(root)
    write_lab_fleet(root, 2, base / "devices")
    write_float_digits(root, NAME, "lab")
    ws = load_workspace(root)
    lab_up(ws, ws.fleets["lab"], target_devices(ws, NAME), login_home=hostile_home)
    try:
        yield root
    finally:
        lab_down(ws, ws.fleets["lab"])


def _apply(root: Path):  # type: ignore[no-untyped-def]
    ws = load_workspace(root)
    with Connections() as connections:
        return apply_deployment(repo_at(root, ws), ws.deployments[NAME], connections)[1]


def test_a_head_retrained_in_git_moves_only_its_blocks_and_the_device_model_hashes_as_signed(delta_lab: Path) -> None:
    first = _apply(delta_lab)
    assert first.ok, first.message
    model = delta_lab / "models" / f"{NAME}.onnx"
    size = model.stat().st_size
    retrain_head(model)
    assert model.stat().st_size == size
    second = _apply(delta_lab)
    assert second.ok, second.message
    moved = [d.bytes_moved for d in second.devices]
    assert len(moved) == 2 and all(0 < m <= 0.05 * size for m in moved), (moved, size)
    print(f"head-only release: {moved[0]} bytes moved per device, {moved[0] / size:.2%} of the model's {size}")
    ws = load_workspace(delta_lab)
    built = hashlib.sha256(_built_model(delta_lab)).hexdigest()
    for target in target_devices(ws, NAME):
        deployment = Path(target.root) / "deployments" / NAME
        state = json.loads((deployment / "state.json").read_text())
        assert state["status"] in ("committed", "inconclusive")  # kept: a busy host may leave the speed undecided
        recorded = state["releases"][state["current"]]["files"]["model.onnx"]["sha256"]
        assert recorded == built == hashlib.sha256((deployment / "current" / "model.onnx").read_bytes()).hexdigest()


def _built_model(root: Path) -> bytes:
    from edgeops.desired import desired_state

    ws = load_workspace(root)
    repo = repo_at(root, ws)
    desired = desired_state(ws, ws.deployments[NAME], repo.cache)
    return next(iter(desired.artifacts.values())).model.read_bytes()


def test_a_corrupted_patch_is_refused_and_changes_nothing(delta_lab: Path) -> None:
    assert _apply(delta_lab).ok
    ws = load_workspace(delta_lab)
    target = target_devices(ws, NAME)[0]
    root = Path(target.root)
    running = (root / "deployments" / NAME / "current" / "model.onnx").read_bytes()
    base = hashlib.sha256(running).hexdigest()
    wanted = bytearray(running)
    wanted[len(wanted) // 2] ^= 0x01
    target_sha = hashlib.sha256(bytes(wanted)).hexdigest()
    block = patch_block(len(wanted))
    index = (len(wanted) // 2) // block
    corrupted = bytes(wanted[index * block:(index + 1) * block])[:-1] + b"\0"  # damaged on the way
    header = {"format": "edgeops.blockpatch/v1", "base": base, "target": target_sha, "size": len(wanted),
              "block": block, "blocks": [index]}
    patch = root / ".staging" / "test.patch"
    patch.write_bytes(json.dumps(header).encode() + b"\n" + corrupted)
    with Connections() as connections:
        device = device_for(target, connections, NAME)
        before = device.observe()
        with pytest.raises(AgentFailed) as refused:
            device.agent("patch", "--root", target.root, "--base", base, "--patch", str(patch), "--sha256", target_sha)
        assert refused.value.kind == "patch-mismatch"
        after = device.observe()
    assert not (root / "blobs" / "sha256" / target_sha).exists()
    assert not [p for p in (root / ".staging").iterdir() if target_sha in p.name or p.name == "test.patch"]
    assert (after.current, after.status) == (before.current, before.status) == (before.current, "committed")
