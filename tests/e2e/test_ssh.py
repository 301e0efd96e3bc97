"""Over real sshd lab devices: transport errors by name, atomic pushes, dedup, rollback, quoting."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from edgeops.connections import Connections, ssh_connect
from edgeops.device import Device
from edgeops.errors import (
    AuthRefused,
    ConnectTimeout,
    DeviceError,
    HostKeyChanged,
    HostKeyUnknown,
    HostUnreachable,
    IdentityFileMissing,
    TransportError,
)
from edgeops.lab import admin_key_of
from edgeops.manifest.workspace import load_workspace
from edgeops.release import make_release
from edgeops.render import render_device
from edgeops.rollout import orders_for
from edgeops.targets import TargetDevice, target_devices
from edgeops.transport.ssh import SSHTransport, target_for
from labkit.artifacts import build_for, lab_signed

pytestmark = pytest.mark.ssh


def _targets(root: Path) -> list[TargetDevice]:
    return target_devices(load_workspace(root), "wearable-activity")


def _ssh_target(root: Path, index: int = 0):
    t = _targets(root)[index]
    ssh = t.fleet.obj.spec.ssh
    return target_for(t.name, t.device.host, t.device.port, ssh, t.fleet.path.parent,
                      str(t.secret(ssh.identity_file)) if ssh.identity_file else None)


def _admin_target(root: Path, index: int = 0):
    """The lab administrator's login to a device (root, a shell, the admin key): for tests of the raw transport
    and of device roots the deploy key may not reach. The deploy key runs only the agent."""
    return replace(_ssh_target(root, index), user="root", identity_file=str(admin_key_of(load_workspace(root))))


def _admin_for(root: Path, target: TargetDevice) -> SSHTransport:
    return SSHTransport(_admin_target(root, [t.name for t in _targets(root)].index(target.name)))


def _release(root: Path, target: TargetDevice, tweak: str = ""):
    ws = load_workspace(root)
    doc = ws.deployments["wearable-activity"]
    artifact = build_for(ws, doc.name, "cpu").artifact
    config = render_device(ws, doc, target, artifact.report["artifact"])
    if tweak:  # a different runtime config = a different release with the same model
        config = replace(config, text=config.text.replace('"intra_op_num_threads": 1', f'"intra_op_num_threads": {tweak}'))
        config = replace(config, digest=config.digest[::-1])
    return make_release(doc.name, artifact, config)


def _device(root: Path, target: TargetDevice, transport=None) -> Device:
    return Device(transport or ssh_connect(target), target.root, target.python, "wearable-activity")


def test_put_run_get_round_trip(lab_repo: Path, tmp_path: Path) -> None:
    transport = SSHTransport(_admin_target(lab_repo))
    try:
        local = tmp_path / "hello.txt"
        local.write_text("hello device\n")
        remote = f"{_targets(lab_repo)[0].root}/roundtrip.txt"
        transport.run(["mkdir", "-p", _targets(lab_repo)[0].root])
        assert transport.put(local, remote) == 13
        assert transport.run(["cat", remote]).stdout == "hello device\n"
        transport.get(remote, tmp_path / "back.txt")
        assert (tmp_path / "back.txt").read_text() == "hello device\n"
        assert transport.read_bytes(remote + ".missing") is None
        result = transport.run(["sh", "-c", "echo out; echo err >&2; exit 7"], check=False)
        assert (result.exit_status, result.stdout, result.stderr) == (7, "out\n", "err\n")
    finally:
        transport.close()


def test_unknown_host_key_is_refused_unless_trusted_on_first_use(lab_repo: Path, tmp_path: Path) -> None:
    empty = lab_repo / ".edgeops" / "tofu_known_hosts"  # inside the repository, as a fleet's known_hosts must be
    empty.write_text("")
    target = replace(_ssh_target(lab_repo), known_hosts=str(empty))
    with pytest.raises(HostKeyUnknown, match="is not in .*refusing to connect"):
        SSHTransport(target)
    trusting = SSHTransport(replace(target, trust_on_first_use=True))
    assert any("trust on first use: recorded" in n for n in trusting.notices)
    trusting.close()
    assert f"[127.0.0.1]:{target.port} ssh-ed25519 " in empty.read_text()
    SSHTransport(target).close()  # now known: accepted without opting in


def test_a_host_key_trusted_on_first_use_is_told_to_the_user(lab_repo: Path) -> None:
    from click.testing import CliRunner

    from edgeops.cli import main

    fleet = lab_repo / "manifests" / "fleets" / "lab.yaml"
    text = fleet.read_text()
    empty = lab_repo / ".edgeops" / "tofu_known_hosts"  # inside the repository, as a fleet's known_hosts must be
    empty.write_text("")
    fleet.write_text(text.replace("    known_hosts: ../../.edgeops/lab/known_hosts",
                                  f"    known_hosts: {empty}\n    trust_on_first_use: true"))
    try:
        result = CliRunner().invoke(main, ["status", "manifests/wearable.yaml", "-o", "json", "--root", str(lab_repo)])
    finally:
        fleet.write_text(text)
    notices = [line for line in result.stderr.splitlines() if line.startswith("notice: ")]
    assert len(notices) == 4 and all("trust on first use: recorded" in n and str(empty) in n for n in notices), \
        result.stderr
    assert result.stdout.lstrip().startswith("[")  # the JSON on stdout stays machine-readable


def test_changed_host_key_is_refused(lab_repo: Path, tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    target = _ssh_target(lab_repo)
    other = (tmp_path / "other.pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{target.port} {other[0]} {other[1]}\n")
    with pytest.raises(HostKeyChanged, match="changed.*refusing to connect"):
        SSHTransport(replace(target, known_hosts=str(known)))


def test_identity_without_access_is_refused(lab_repo: Path, tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
    with pytest.raises(AuthRefused, match="refused our key"):
        SSHTransport(replace(_ssh_target(lab_repo), identity_file=str(tmp_path / "stranger")))


def test_missing_identity_file_is_named_and_nothing_connects(lab_repo: Path, tmp_path: Path) -> None:
    missing = tmp_path / "deploy_key"
    with pytest.raises(IdentityFileMissing, match=f"identity file {missing} does not exist"):
        SSHTransport(replace(_ssh_target(lab_repo), identity_file=str(missing)))


def test_closed_port_is_unreachable_and_a_silent_server_times_out(lab_repo: Path) -> None:
    from labkit.repo import free_ports

    with pytest.raises(HostUnreachable, match="connection refused"):
        SSHTransport(replace(_ssh_target(lab_repo), port=free_ports(1)[0], connect_retries=0))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    try:
        with pytest.raises(ConnectTimeout):
            SSHTransport(replace(_ssh_target(lab_repo), port=silent.getsockname()[1], connect_timeout_s=1,
                                 connect_retries=0))
    finally:
        silent.close()


def test_push_dedup_and_rollback_move_no_model_bytes(lab_repo: Path) -> None:
    target = _targets(lab_repo)[1]
    first, second = _release(lab_repo, target), _release(lab_repo, target, tweak="2")
    with Connections() as connections:
        device = _device(lab_repo, target, connections.get(target))
        pushed = device.push(first)
        assert pushed.bytes_moved > first.model_bytes * 0.9
        device.activate(first.id, signed=lab_signed(lab_repo, first))
        device.record({"status": "committed"}, release=first.id)
        again = device.push(first)
        assert again.bytes_moved == 0 and again.files_moved == 0
        update = device.push(second)  # same model and golden set: only the small config files move
        assert update.files_moved == 2 and update.bytes_moved < 5000
        device.activate(second.id, signed=lab_signed(lab_repo, second))
        device.record({"status": "committed"}, release=second.id)
        sent_before = connections.get(target).bytes_sent
        device.rollback(order=orders_for(target, None, "wearable-activity"))  # signed, as the rollback command does
        assert connections.get(target).bytes_sent == sent_before
        state = device.observe()
        assert (state.current, state.committed, state.previous) == (first.id, first.id, None)
        assert state.state["releases"][second.id]["state"] == "rolled_back"
        assert state.state["history"][-1]["action"] == "rollback"


def test_interrupted_push_keeps_the_previous_release_and_the_next_push_completes(lab_repo: Path) -> None:
    target = _targets(lab_repo)[2]
    first = _release(lab_repo, target)
    device = _device(lab_repo, target)
    device.push(first)
    device.activate(first.id, signed=lab_signed(lab_repo, first))
    device.transport.close()
    big = _big_release(lab_repo, target)
    transport = ssh_connect(target)

    def cut(done: int) -> None:  # drop the TCP connection in the middle of the 5 MB upload
        if done > 1_000_000:
            transport._client.get_transport().sock.close()  # type: ignore[attr-defined]

    with pytest.raises(TransportError):
        _device(lab_repo, target, transport).push(big, progress=cut)
    observer = _device(lab_repo, target)
    state = observer.observe()
    assert state.current == first.id and big.id not in state.releases
    admin = _admin_for(lab_repo, target)
    assert admin.run(["cat", f"{target.root}/deployments/wearable-activity/current/runtime.json"]).stdout
    result = observer.push(big)
    assert result.files_moved >= 1
    observer.activate(big.id, signed=lab_signed(lab_repo, big))
    assert observer.observe().current == big.id
    staging = admin.run(["ls", "-A", f"{target.root}/.staging"]).stdout.split()
    admin.close()
    assert staging == []  # the interrupted .part file was cleared


def _big_release(root: Path, target: TargetDevice):
    """The wearable release plus a 5 MB payload file, to have an upload worth interrupting."""
    import hashlib
    import os

    from edgeops.release import ReleaseFile

    release = _release(root, target, tweak="3")
    payload = root / ".edgeops" / "payload.bin"
    payload.parent.mkdir(parents=True, exist_ok=True)
    if not payload.exists():
        payload.write_bytes(os.urandom(5_000_000))
    data = payload.read_bytes()
    extra = ReleaseFile("payload.bin", hashlib.sha256(data).hexdigest(), len(data), local=payload)
    return replace(release, id=release.id + "-big", files=release.files + (extra,))


def test_hostile_arguments_do_not_escape_quoting(lab_repo: Path, tmp_path: Path) -> None:
    transport = SSHTransport(_admin_target(lab_repo))
    marker = tmp_path / "pwned"
    hostile = [f"a; touch {marker}", f"$(touch {marker})", f"`touch {marker}`", "it's \"quoted\"", "x\ny"]
    try:
        assert transport.run(["printf", "%s|", *hostile]).stdout == "|".join(hostile) + "|"
        assert not marker.exists()
    finally:
        transport.close()


def test_hostile_device_root_stays_one_path(lab_repo: Path, tmp_path: Path) -> None:
    target = _targets(lab_repo)[3]
    marker = tmp_path / "pwned"
    root = str(tmp_path / f"dev root; touch {marker} '$(touch {marker})'")
    hostile = replace(target, device=target.device.model_copy(update={"root": root}))
    device = _device(lab_repo, hostile, _admin_for(lab_repo, target))  # a root the deploy key is not confined to
    release = _release(lab_repo, hostile)
    device.push(release)
    device.activate(release.id, signed=lab_signed(lab_repo, release))
    assert (Path(root) / "deployments/wearable-activity/current/model.onnx").is_file()
    assert not marker.exists()


def test_full_disk_fails_cleanly_and_keeps_the_previous_release(lab_repo: Path, tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        target = _targets(lab_repo)[3]
        small = replace(target, device=target.device.model_copy(update={"root": str(mount / "edgeops")}))
        device = _device(lab_repo, small, _admin_for(lab_repo, target))
        first = _release(lab_repo, small)
        device.push(first)
        device.activate(first.id, signed=lab_signed(lab_repo, first))
        with pytest.raises(DeviceError, match="not enough free space"):
            device.push(_big_release(lab_repo, small))
        assert device.observe().current == first.id
    finally:
        subprocess.run(["umount", str(mount)])
        shutil.rmtree(mount, ignore_errors=True)


def test_jump_host_reaches_a_device_through_another(lab_repo: Path) -> None:
    bastion, device = _admin_target(lab_repo, 0), _admin_target(lab_repo, 1)
    through = SSHTransport(replace(device, jump_host=f"root@127.0.0.1:{bastion.port}"))
    try:
        assert through.run(["sh", "-c", "echo $EDGEOPS_LAB_DEVICE"]).stdout.strip() == device.device
    finally:
        through.close()


def test_ssh_config_alias_is_honoured(lab_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _admin_target(lab_repo, 0)
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(f"Host lab-alias\n  HostName 127.0.0.1\n  Port {target.port}\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    aliased = SSHTransport(replace(target, host="lab-alias", port=22, use_ssh_config=True))
    try:
        assert aliased.run(["sh", "-c", "echo $EDGEOPS_LAB_DEVICE"]).stdout.strip() == target.device
    finally:
        aliased.close()


def test_key_from_ssh_agent(lab_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _admin_target(lab_repo, 0)
    started = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    env = dict(line.split(";")[0].split("=", 1) for line in started.splitlines() if "=" in line.split(";")[0])
    try:
        subprocess.run(["ssh-add", "-q", target.identity_file], env={**env, "PATH": "/usr/bin:/bin"}, check=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", env["SSH_AUTH_SOCK"])
        via_agent = SSHTransport(replace(target, identity_file=None, use_agent=True))
        assert via_agent.run(["true"]).exit_status == 0
        via_agent.close()
    finally:
        subprocess.run(["kill", env["SSH_AGENT_PID"]], check=False)
