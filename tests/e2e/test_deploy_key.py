"""Over real sshd: the lab's deploy key runs the agent and nothing else (the forced command), reads files but
writes none (SFTP read-only), cannot reach outside the device root, and a trust root changed behind edgeops'
back shows on the next status. The administrator (root, the admin key) is the only one with a shell."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.errors import ExitCode
from edgeops.lab import admin_key_of
from edgeops.manifest.workspace import load_workspace
from edgeops.targets import TargetDevice, target_devices
from edgeops.transport.ssh import SSHTransport, target_for

pytestmark = pytest.mark.ssh
MANIFEST = "manifests/wearable.yaml"


def target(root: Path, index: int = 0) -> TargetDevice:
    return target_devices(load_workspace(root), "wearable-activity")[index]


def ssh(root: Path, device: TargetDevice, *command: str, key: Path | None = None, user: str = "edgeops"):
    """The OpenSSH client, as an attacker holding the key would use it (not edgeops' own code)."""
    ws = load_workspace(root)
    identity = key or device.secret(device.fleet.obj.spec.ssh.identity_file or "")
    return subprocess.run(["ssh", "-i", str(identity), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                           "-o", f"UserKnownHostsFile={ws.root / '.edgeops/lab/known_hosts'}", "-p",
                           str(device.device.port), f"{user}@{device.device.host}", *command],
                          capture_output=True, text=True, timeout=60)


def deploy_transport(root: Path, device: TargetDevice) -> SSHTransport:
    ssh_settings = device.fleet.obj.spec.ssh
    return SSHTransport(target_for(device.name, device.device.host, device.device.port, ssh_settings,
                                   device.fleet.path.parent, str(device.secret(ssh_settings.identity_file or ""))))


def test_the_deploy_key_opens_no_shell_and_runs_nothing_but_the_agent(lab_repo: Path, tmp_path: Path) -> None:
    device = target(lab_repo)
    marker = tmp_path / "pwned"
    for command in (["true"], ["touch", str(marker)], ["sh", "-c", f"touch {marker}"],
                    [device.python, "-c", f"open('{marker}', 'w')"],
                    [device.python, f"{device.root}/agent/edgeops_agent.py", "gate", "--root", "/"]):
        done = ssh(lab_repo, device, *command)
        assert done.returncode != 0 and "this key runs only the edgeops agent" in done.stdout, done
    assert not marker.exists()
    admin = ssh(lab_repo, device, "true", key=admin_key_of(load_workspace(lab_repo)), user="root")
    assert admin.returncode == 0, admin.stderr  # the administrator still has a shell


def test_the_deploy_key_cannot_reach_outside_the_device_root(lab_repo: Path) -> None:
    device = target(lab_repo)
    agent = f"{device.root}/agent/edgeops_agent.py"
    for args in (["state", "--root", "/etc", "--deployment", "x"], ["prepare", "--root", "/", "--deployment", "x"],
                 ["bench", "/etc"], ["assemble", "--root", device.root, "--deployment", "x", "--release", "r",
                                     "--files", "{}", "--staged", json.dumps({"/etc/hostname": "0" * 64})]):
        done = ssh(lab_repo, device, f"echo --edgeops-output-begins--; exec {device.python} {agent} "
                   + " ".join(f"'{a}'" for a in args))
        document = json.loads(done.stdout.strip().splitlines()[-1])
        assert document["error"] == "restricted", (args, done.stdout)
    assert Path("/etc/hostname").exists()


def test_the_deploy_key_reads_files_but_writes_none(lab_repo: Path) -> None:
    device = target(lab_repo, 1)
    transport = deploy_transport(lab_repo, device)
    try:
        trust = f"{device.root}/trust/allowed_signers"
        assert transport.read_bytes(trust)  # reads work: status stays cheap
        sftp = transport._sftp_client()
        for path in (trust, f"{device.root}/trust/new_signers", f"{device.root}/agent/edgeops_agent.py",
                     f"{device.root}/.staging/x"):
            with pytest.raises(PermissionError):
                with sftp.open(path, "wb") as handle:
                    handle.write(b"ssh-ed25519 AAAA attacker")
        with pytest.raises(PermissionError):
            sftp.remove(trust)
    finally:
        transport.close()


def test_the_agent_works_through_the_gate_and_a_changed_trust_root_shows_on_the_next_status(lab_repo: Path) -> None:
    applied = CliRunner().invoke(main, ["apply", MANIFEST, "--root", str(lab_repo)])
    assert applied.exit_code == ExitCode.OK, applied.output
    device = target(lab_repo, 2)
    trust = Path(device.root) / "trust" / "allowed_signers"
    original = trust.read_bytes()
    try:
        trust.chmod(0o644)  # the administrator (or someone with root) changes it behind edgeops' back
        trust.write_bytes(original + b"release@edgeops ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIattacker\n")
        status = CliRunner().invoke(main, ["status", MANIFEST, "-o", "json", "--root", str(lab_repo)])
        rows = {r["device"]: r for r in json.loads(status.stdout)[0]["devices"]}
        assert status.exit_code == 1
        assert rows[device.name]["health"] == "Degraded" and "allowed-signers" in rows[device.name]["message"], rows
        assert all(r["health"] == "Healthy" for name, r in rows.items() if name != device.name)
    finally:
        trust.write_bytes(original)
        trust.chmod(0o444)
    again = CliRunner().invoke(main, ["status", MANIFEST, "--root", str(lab_repo)])
    assert again.exit_code == 0, again.output
