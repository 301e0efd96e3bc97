"""The agent's one transition function, on a local enrolled device: no side door makes a release current.

Each case is a reproduction from the red team: a rollback naming an unsigned release with --allow-rejected,
a repair that brings foreign bytes, a read that "finished" a hand-repointed link, a switch without a timer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import pytest

from edgeops.device import AgentFailed, Device, ReleaseNotTrusted
from edgeops.signing import (
    RELEASE_NAMESPACE,
    FileDigest,
    SignedMetadata,
    allowed_signers_line,
    generate_key,
    release_metadata,
    sign,
    sign_order,
)
from edgeops.transport.local import LocalTransport
from tests.integration.test_device_local import releases

DEPLOYMENT = "wearable-activity"


def tree_digest(root: Path) -> str:
    """Every path, link target, mode and byte under ``root``: what a read must leave as it found it."""
    digest = hashlib.sha256()
    for base, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(base) / name
            stat = os.lstat(path)
            digest.update(f"{path.relative_to(root)} {stat.st_mode} {stat.st_mtime_ns}".encode())
            if os.path.islink(path):
                digest.update(os.readlink(path).encode())
            elif path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def enrolled(tmp_path: Path) -> tuple[Device, Path]:
    """A local device enrolled with a release key; (device, the key)."""
    key = tmp_path / "release_key"
    generate_key(key, "test release key")
    device = Device(LocalTransport("local-01"), str(tmp_path / "device"), sys.executable, DEPLOYMENT)
    device.enroll(allowed_signers_line((tmp_path / "release_key.pub").read_text()).encode())
    return device, key


def signed(key: Path, release, generation: int | None = None) -> SignedMetadata:  # type: ignore[no-untyped-def]
    data = release_metadata(DEPLOYMENT, release.id, [FileDigest(f.name, f.sha256, f.size) for f in release.files],
                            release.config_digest, generation or time.time_ns() // 1_000_000, 3600)
    return SignedMetadata(data, sign(key, RELEASE_NAMESPACE, data))


def orders(key: Path, allow_rejected: bool = False):  # type: ignore[no-untyped-def]
    """What signs the controller's orders (rollback, uninstall) for the local device."""
    return lambda action, release: sign_order(key, DEPLOYMENT, "lab/local-01", action, release,
                                              allow_rejected and action == "rollback")


def commit(device: Device, release, key: Path) -> None:  # type: ignore[no-untyped-def]
    device.push(release)
    device.activate(release.id, signed=signed(key, release))
    device.record({"status": "committed"}, release=release.id)


def test_rollback_allow_rejected_to_an_unsigned_release_is_refused(repo_copy: Path, enrolled) -> None:  # type: ignore[no-untyped-def]
    device, key = enrolled
    good, unsigned = releases(repo_copy, 2)
    commit(device, good, key)
    device.push(unsigned)  # on the device, never signed
    with pytest.raises(ReleaseNotTrusted) as refused:  # even with a signed order: the release is not signed
        device.rollback(to=unsigned.id, allow_rejected=True, order=orders(key, True))
    assert refused.value.kind == "unsigned" and "not signed" in refused.value.message
    state = device.observe()
    assert (state.current, state.committed) == (good.id, good.id)


def test_a_rejected_signed_release_named_again_runs_as_a_trial_not_committed(repo_copy: Path, enrolled) -> None:  # type: ignore[no-untyped-def]
    device, key = enrolled
    good, bad = releases(repo_copy, 2)
    commit(device, good, key)
    device.push(bad)
    device.activate(bad.id, signed=signed(key, bad))
    device.revert(reason="failed verification")
    with pytest.raises(AgentFailed, match="rejected on this device"):
        device.rollback(to=bad.id, order=orders(key))
    switched = device.rollback(to=bad.id, allow_rejected=True, trial_window_s=60, order=orders(key, True))
    assert switched["current"] == bad.id and switched["trial_until"]  # a trial, its timer armed
    state = device.observe()
    assert state.committed == good.id and state.state["trial"]["release"] == bad.id
    device.revert(reason="test over")


def test_a_repair_with_foreign_bytes_is_refused_and_records_nothing(repo_copy: Path, enrolled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    device, key = enrolled
    (good,) = releases(repo_copy, 1)
    commit(device, good, key)
    model = Path(device.root) / "deployments" / DEPLOYMENT / "releases" / good.id / "model.onnx"
    recorded = json.loads((model.parents[2] / "state.json").read_text())["releases"][good.id]["files"]
    foreign = b"not the signed model"
    digest = hashlib.sha256(foreign).hexdigest()
    blob = Path(device.root) / "blobs" / "sha256" / digest
    blob.write_bytes(foreign)
    files = {f.name: (digest if f.name == "model.onnx" else f.sha256) for f in good.files}
    with pytest.raises(AgentFailed, match="restores the bytes recorded") as refused:
        device.agent("assemble", "--root", device.root, "--deployment", DEPLOYMENT, "--release", good.id,
                     "--files", json.dumps(files), "--repair")
    assert refused.value.kind == "file-mismatch"
    after = json.loads((model.parents[2] / "state.json").read_text())["releases"][good.id]["files"]
    assert after == recorded and hashlib.sha256(model.read_bytes()).hexdigest() == recorded["model.onnx"]["sha256"]


def test_a_repair_restores_the_recorded_bytes(repo_copy: Path, enrolled) -> None:  # type: ignore[no-untyped-def]
    device, key = enrolled
    (good,) = releases(repo_copy, 1)
    commit(device, good, key)
    model = Path(device.root) / "deployments" / DEPLOYMENT / "releases" / good.id / "model.onnx"
    original = model.read_bytes()
    os.chmod(model, 0o644)
    model.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit
    assert device.observe(verify=True).damaged
    device.push(good, repair=True)
    assert model.read_bytes() == original and not device.observe(verify=True).damaged


def test_a_read_changes_no_byte_and_reports_a_repointed_link(repo_copy: Path, enrolled) -> None:  # type: ignore[no-untyped-def]
    device, key = enrolled
    first, second = releases(repo_copy, 2)
    commit(device, first, key)
    device.push(second)
    directory = Path(device.root) / "deployments" / DEPLOYMENT
    tmp = directory / ".hand"
    os.symlink(f"releases/{second.id}", tmp)
    os.replace(tmp, directory / "current")  # repointed by hand
    before = tree_digest(Path(device.root))
    for verify in (False, True):
        state = device.observe(verify=verify)
        assert state.current == second.id  # what runs, not what the state file says
        assert state.half_done and "current points at" in state.half_done[0]
    assert tree_digest(Path(device.root)) == before  # no byte, link or time changed
    device.activate(first.id)  # the next mutating step settles it
    assert device.observe().current == first.id and not device.observe().half_done


def test_a_switch_without_an_armed_timer_is_refused(repo_copy: Path, enrolled) -> None:  # type: ignore[no-untyped-def]
    device, key = enrolled
    first, second = releases(repo_copy, 2)
    commit(device, first, key)
    device.push(second)
    meta = signed(key, second)
    with pytest.raises(AgentFailed, match="timer armed") as refused:
        device.agent("switch", "--root", device.root, "--deployment", DEPLOYMENT, "--release", second.id,
                     *meta.as_args())
    assert refused.value.kind == "timer-required" and device.observe().current == first.id


def test_leaving_a_device_without_a_model_takes_an_explicit_uninstall(repo_copy: Path, enrolled) -> None:  # type: ignore[no-untyped-def]
    device, key = enrolled
    (first,) = releases(repo_copy, 1)
    commit(device, first, key)
    for action in ("activate", "rollback"):
        with pytest.raises(AgentFailed, match="takes --action uninstall"):
            device.agent("switch", "--root", device.root, "--deployment", DEPLOYMENT, "--release", "none",
                         "--action", action)
    assert device.observe().current == first.id
    device.uninstall(order=orders(key)("uninstall", None))
    assert device.observe().current is None


def test_a_rollback_on_an_enrolled_device_takes_a_fresh_order_signed_by_the_release_key(repo_copy: Path, enrolled,
                                                                                        tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    device, key = enrolled
    first, second = releases(repo_copy, 2)
    commit(device, first, key)
    commit(device, second, key)
    (Path(device.root) / "trust" / "identity").write_text("lab/local-01\n")
    with pytest.raises(ReleaseNotTrusted) as refused:  # the deploy key alone
        device.rollback(to=first.id)
    assert refused.value.kind == "unsigned"
    generate_key(tmp_path / "intruder", "not the release key")
    cases = {
        "bad-signature": sign_order(tmp_path / "intruder", DEPLOYMENT, "lab/local-01", "rollback", first.id),
        "order-mismatch": sign_order(key, DEPLOYMENT, "lab/local-02", "rollback", first.id),  # another device
    }
    for kind, order in cases.items():
        with pytest.raises(AgentFailed) as wrong:
            device.rollback(to=first.id, order=lambda action, release, o=order: o)
        assert wrong.value.kind == kind
    assert device.observe().current == second.id
    order = sign_order(key, DEPLOYMENT, "lab/local-01", "rollback", first.id)
    assert device.rollback(to=first.id, order=lambda action, release: order)["current"] == first.id
    device.activate(second.id)  # committed before: back on it without a new signature
    with pytest.raises(AgentFailed) as replayed:
        device.rollback(to=first.id, order=lambda action, release: order)
    assert replayed.value.kind == "replay" and device.observe().current == second.id


def test_a_damaged_rollback_target_is_seen_by_a_verifying_read_and_healed_from_the_blobs(repo_copy: Path,
                                                                                       enrolled) -> None:  # type: ignore[no-untyped-def]
    device, key = enrolled
    first, second = releases(repo_copy, 2)
    commit(device, first, key)
    commit(device, second, key)  # first is now the previous release: the rollback target
    config = Path(device.root) / "deployments" / DEPLOYMENT / "releases" / first.id / "runtime.json"
    original = config.read_bytes()
    os.chmod(config, 0o644)
    config.write_bytes(original.replace(b"1", b"2", 1))  # same size, another byte
    assert device.observe().damaged == {}  # sizes and times: the running release only
    seen = device.observe(verify=True)
    assert first.id in seen.damaged and second.id not in seen.damaged
    healed = device.heal()
    assert healed["healed"] == [f"{first.id}/runtime.json"] and config.read_bytes() == original
    assert device.observe(verify=True).damaged == {}


def test_a_corrupt_state_file_reads_as_damaged_and_is_rebuilt(repo_copy: Path, enrolled) -> None:  # type: ignore[no-untyped-def]
    device, key = enrolled
    first, second = releases(repo_copy, 2)
    commit(device, first, key)
    commit(device, second, key)
    state_file = Path(device.root) / "deployments" / DEPLOYMENT / "state.json"
    state_file.write_text(state_file.read_text()[:40])  # a torn write
    before = tree_digest(Path(device.root))
    seen = device.observe()
    assert seen.state_error and "corrupt" in seen.state_error and seen.current == second.id
    assert tree_digest(Path(device.root)) == before  # read: nothing rebuilt yet
    healed = device.heal(committed=second.id)
    assert healed["healed"][0].startswith("state.json rebuilt")
    after = device.observe(verify=True)
    assert after.state_error is None and (after.current, after.committed) == (second.id, second.id)
    assert after.damaged == {}


def test_a_training_step_on_an_enrolled_device_needs_the_controllers_order_for_its_tensors_spec_and_deadline(
        repo_copy: Path, enrolled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A federated round's local step trains on the device's own samples and sends what it learned: a deploy key
    or a broker password alone cannot ask for that. The order binds the release, tensors, spec and deadline."""
    import numpy as np

    from edgeops.signing import training_bindings

    device, key = enrolled
    [release] = releases(repo_copy, 1)
    commit(device, release, key)
    (Path(device.root) / "trust" / "identity").write_text("lab/local-01\n")
    tensors = tmp_path / "global.npz"
    np.savez(tensors, w=np.zeros((4, 2), np.float32), b=np.zeros(2, np.float32))
    spec = {"release": release.id, "features": "missing", "weight": "w", "bias": "b", "data": "data/nowhere",
            "epochs": 1, "learning_rate": 0.1, "batch_size": 8, "clip_norm": 1.0, "seed": 1}

    def order(bindings: dict, device_key: str = "lab/local-01", signer: Path = key):  # type: ignore[no-untyped-def,type-arg]
        return sign_order(signer, DEPLOYMENT, device_key, "train", release.id, bindings=bindings)

    later = time.time() + 600
    generate_key(tmp_path / "intruder", "not the release key")
    cases = {
        "unsigned": None,
        "bad-signature": order(training_bindings(tensors.read_bytes(), spec, later), signer=tmp_path / "intruder"),
        "order-mismatch": order(training_bindings(tensors.read_bytes(), {**spec, "data": "."}, later)),  # another spec
        "expired": order(training_bindings(tensors.read_bytes(), spec, time.time() - 1)),
    }
    before = tree_digest(Path(device.root) / "deployments")
    for kind, signed_order in cases.items():
        with pytest.raises(AgentFailed) as refused:
            device.adapt_train(tensors, spec, order=signed_order)
        assert refused.value.kind == kind, (kind, refused.value.message)
    other_tensors = tmp_path / "other.npz"
    np.savez(other_tensors, w=np.ones((4, 2), np.float32), b=np.zeros(2, np.float32))
    with pytest.raises(AgentFailed) as swapped:  # the order of one round's tensors does not cover other tensors
        device.adapt_train(other_tensors, spec, order=order(training_bindings(tensors.read_bytes(), spec, later)))
    assert swapped.value.kind == "order-mismatch"
    # the right order passes the check: the step goes on to the device's samples (there are none here)
    with pytest.raises(AgentFailed) as taken:
        device.adapt_train(tensors, spec, order=order(training_bindings(tensors.read_bytes(), spec, later)))
    assert taken.value.kind == "no-data", taken.value.message
    assert tree_digest(Path(device.root) / "deployments") == before  # a training step changes nothing that runs
