"""Signed releases over real sshd: an enrolled device runs a new release only with current, signed metadata
that names exactly its files, and takes a new trust root only signed by a key it trusts."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.connections import Connections
from edgeops.device import Device, ReleaseNotTrusted
from edgeops.manifest.workspace import load_workspace
from edgeops.operations import apply_deployment
from edgeops.release import Release, make_release
from edgeops.render import render_device
from edgeops.rollout import device_for, orders_for
from edgeops.signing import (
    RELEASE_NAMESPACE,
    FileDigest,
    SignedMetadata,
    allowed_signers_line,
    generate_key,
    release_metadata,
    sign,
)
from edgeops.targets import TargetDevice, target_devices
from labkit.artifacts import build_for, lab_release_key, repo_at
from labkit.repo import running_lab

pytestmark = pytest.mark.ssh
DEPLOYMENT = "wearable-activity"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, hostile_home: Path):
    """Two enrolled lab devices (lab up makes the release key and installs the trust root)."""
    with running_lab(tmp_path_factory.mktemp("signed"), 2, hostile_home) as root:
        ws = load_workspace(root)
        with Connections() as connections:
            assert apply_deployment(repo_at(root, ws), ws.deployments[DEPLOYMENT], connections)[1].ok
        yield root


def target_of(root: Path) -> TargetDevice:
    return target_devices(load_workspace(root), DEPLOYMENT)[0]


def new_release(root: Path, threads: int) -> Release:
    """Another release of the same model (another runtime config), as a later commit would make."""
    ws = load_workspace(root)
    doc, target = ws.deployments[DEPLOYMENT], target_of(root)
    artifact = build_for(ws, DEPLOYMENT, "cpu").artifact
    config = render_device(ws, doc, target, artifact.report["artifact"])
    text = config.text.replace('"inter_op_num_threads": 1', f'"inter_op_num_threads": {threads}')
    config = replace(config, text=text, digest=f"{threads:064d}")
    return make_release(DEPLOYMENT, artifact, config)


def metadata(release: Release, generation: int, ttl_s: float = 3600, now: float | None = None,
             files: list[FileDigest] | None = None) -> bytes:
    digests = files or [FileDigest(f.name, f.sha256, f.size) for f in release.files]
    return release_metadata(DEPLOYMENT, release.id, digests, release.config_digest, generation, ttl_s, now)


def release_key(root: Path) -> Path:
    return lab_release_key()


def attempt(root: Path, release: Release, signed: SignedMetadata | None) -> tuple[str, Device]:
    """Push ``release`` and try to run it; return the device's refusal kind (the device must stay put)."""
    target = target_of(root)
    with Connections() as connections:
        device = device_for(target, connections, DEPLOYMENT)
        before = device.observe()
        device.push(release)
        with pytest.raises(ReleaseNotTrusted) as refused:
            device.activate(release.id, signed=signed)
        after = device.observe()
        assert (after.current, after.committed) == (before.current, before.committed)  # still on its release
        assert after.state["releases"][release.id]["state"] != "trial"
        return refused.value.kind, device


def test_an_applied_release_is_signed_and_the_device_records_its_generation(lab: Path) -> None:
    with Connections() as connections:
        device = device_for(target_of(lab), connections, DEPLOYMENT)
        state = device.observe()
        entry = state.state["releases"][state.committed]
    assert entry["generation"] > 0 and entry["verifier"] == "ssh-keygen" and entry["expires_at"]
    assert state.facts is not None and state.facts.enrolled and state.facts.signers_sha256 == \
        target_of(lab).signers_sha256  # what the preflight compares


def test_an_unsigned_release_is_refused(lab: Path) -> None:
    kind, _ = attempt(lab, new_release(lab, 2), None)
    assert kind == "unsigned"


def test_tampered_metadata_is_refused(lab: Path) -> None:
    release = new_release(lab, 3)
    data = metadata(release, int(time.time() * 1000))
    signature = sign(release_key(lab), RELEASE_NAMESPACE, data)
    tampered = data.replace(b'"generation":', b'"generation":9')
    assert tampered != data
    kind, _ = attempt(lab, release, SignedMetadata(tampered, signature))
    assert kind == "bad-signature"


def test_a_file_other_than_the_signed_one_is_refused(lab: Path) -> None:
    release = new_release(lab, 4)
    files = [FileDigest(f.name, "0" * 64 if f.name == "model.onnx" else f.sha256, f.size) for f in release.files]
    data = metadata(release, int(time.time() * 1000), files=files)
    kind, _ = attempt(lab, release, SignedMetadata(data, sign(release_key(lab), RELEASE_NAMESPACE, data)))
    assert kind == "file-mismatch"


def test_a_key_the_device_does_not_trust_is_refused(lab: Path, tmp_path: Path) -> None:
    release = new_release(lab, 5)
    generate_key(tmp_path / "intruder", "not the release key")
    data = metadata(release, int(time.time() * 1000))
    kind, _ = attempt(lab, release, SignedMetadata(data, sign(tmp_path / "intruder", RELEASE_NAMESPACE, data)))
    assert kind == "bad-signature"


def test_expired_metadata_is_refused(lab: Path) -> None:
    release = new_release(lab, 6)
    data = metadata(release, int(time.time() * 1000), ttl_s=60, now=time.time() - 3600)
    kind, _ = attempt(lab, release, SignedMetadata(data, sign(release_key(lab), RELEASE_NAMESPACE, data)))
    assert kind == "expired"


def test_a_replayed_older_release_is_refused_but_a_rollback_to_a_committed_one_needs_no_signature(lab: Path) -> None:
    first = new_release(lab, 7)
    newer = new_release(lab, 9)
    old_metadata = metadata(first, int(time.time() * 1000))  # signed, never used: the attacker keeps it
    old_signed = SignedMetadata(old_metadata, sign(release_key(lab), RELEASE_NAMESPACE, old_metadata))
    with Connections() as connections:  # a later, properly signed release is committed
        device = device_for(target_of(lab), connections, DEPLOYMENT)
        was = device.observe().committed
        device.push(newer)
        data = metadata(newer, int(time.time() * 1000) + 1)
        device.activate(newer.id, signed=SignedMetadata(data, sign(release_key(lab), RELEASE_NAMESPACE, data)))
        device.record({"status": "committed"}, release=newer.id)
        assert device.observe().committed == newer.id
    kind, _ = attempt(lab, first, old_signed)  # replaying the older signed metadata
    assert kind == "downgrade"
    with Connections() as connections:  # an explicit rollback to a release verified on arrival: no new release
        device = device_for(target_of(lab), connections, DEPLOYMENT)  # signature, only the signed order
        assert device.rollback(to=was, order=orders_for(target_of(lab), None, DEPLOYMENT))["current"] == was
        assert device.observe().current == was


def test_a_new_trust_root_needs_a_signature_by_a_trusted_key_then_releases_follow_it(lab: Path,
                                                                                   tmp_path: Path) -> None:
    signers = lab / ".edgeops" / "lab" / "allowed_signers"
    old_key = release_key(lab)
    generate_key(tmp_path / "new_release", "rotated release key")
    generate_key(tmp_path / "intruder", "not trusted")
    original = signers.read_text()
    signers.write_text(allowed_signers_line((tmp_path / "new_release.pub").read_text()))

    def enroll(*extra: str):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(main, ["enroll", "lab", *extra, "--root", str(lab)])

    refused = enroll("--signed-by", str(tmp_path / "intruder"))
    assert refused.exit_code == 1 and "refused (bad-signature)" in refused.output, refused.output
    rotated = enroll("--signed-by", str(old_key))
    assert rotated.exit_code == 0 and rotated.output.count(": rotated") == 2, rotated.output
    assert enroll("--signed-by", str(old_key)).output.count("already enrolled") == 2

    release = new_release(lab, 8)
    data = metadata(release, int(time.time() * 1000))
    kind, _ = attempt(lab, release, SignedMetadata(data, sign(old_key, RELEASE_NAMESPACE, data)))
    assert kind == "bad-signature"  # the old key no longer signs releases
    with Connections() as connections:
        device = device_for(target_of(lab), connections, DEPLOYMENT)
        device.activate(release.id, signed=SignedMetadata(data, sign(tmp_path / "new_release", RELEASE_NAMESPACE,
                                                                      data)))
        assert device.observe().current == release.id
        device.revert(reason="test over")
    signers.write_text(original)  # back to the lab's own key, a rotation signed by the key trusted now
    back = CliRunner().invoke(main, ["enroll", "lab", "--signed-by", str(tmp_path / "new_release"), "--root", str(lab)])
    assert back.exit_code == 0, back.output


def test_the_builtin_verifier_agrees_with_ssh_keygen(lab: Path, tmp_path: Path) -> None:
    """Devices without OpenSSH (Dropbear images) verify with the agent's own SSHSIG + Ed25519 code."""
    from labkit.artifacts import agent_module

    agent = agent_module()
    data = b'{"release": "r-1"}'
    good = sign(release_key(lab), RELEASE_NAMESPACE, data)
    allowed = lab / ".edgeops" / "lab" / "allowed_signers"
    assert agent.verify_signature(str(allowed), RELEASE_NAMESPACE, data, good, tool="") == "builtin"
    corrupt = good.replace(good.splitlines()[2], good.splitlines()[3])
    for bad_data, bad_sig in ((data + b" ", good), (data, corrupt)):
        for tool in (None, ""):  # ssh-keygen and the built-in verifier refuse the same cases
            with pytest.raises(agent.AgentError) as exc:
                agent.verify_signature(str(allowed), RELEASE_NAMESPACE, bad_data, bad_sig, tool=tool)
            assert exc.value.kind == "bad-signature"
