"""A pull request's plan cannot reach a secret: credentials come from the secrets directory only, and an
untrusted plan contacts only endpoints the base revision already has (the exfiltration, replayed).

A fake broker on 127.0.0.1 records every byte sent to it; the PR adds a pull fleet that names it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgeops.cli import main
from edgeops.errors import ExitCode
from labkit.capture import capturing_listener
from labkit.repo import copy_repo, lab_credentials

BROKER_SECRET = "ci-broker-s3cret"


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


@pytest.fixture
def pr_repo(tmp_path: Path) -> tuple[Path, Path]:
    """(repository with a base commit, secrets directory holding the deploy key)."""
    root = copy_repo(tmp_path / "repo")
    secrets = tmp_path / "secrets"
    lab_credentials(root, secrets)
    (root / ".gitignore").write_text(".edgeops/\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "-c", "user.email=t@example.org", "-c", "user.name=t", "add", "-A")
    git(root, "-c", "user.email=t@example.org", "-c", "user.name=t", "commit", "-qm", "base")
    return root, secrets


def add_evil_fleet(root: Path, port: int, password_file: str | None) -> None:
    """The pull request: a pull fleet naming the capturing broker, targeted by the wearable deployment."""
    lines = ["apiVersion: edgeops/v1", "kind: Fleet", "metadata: {name: evil}", "spec:", "  profile: lab-pull",
             "  pull:", f"    broker: mqtt://127.0.0.1:{port}", f"    registry: http://127.0.0.1:{port}"]
    if password_file:
        lines.append(f"    password_file: {password_file}")
    lines += ["  devices:", "    - {name: e-01}"]
    (root / "manifests" / "fleets" / "evil.yaml").write_text("\n".join(lines) + "\n")
    wearable = root / "manifests" / "wearable.yaml"
    wearable.write_text(wearable.read_text().replace("    - fleet: lab\n", "    - fleet: lab\n    - fleet: evil\n"))
    git(root, "-c", "user.email=t@example.org", "-c", "user.name=t", "add", "-A")
    git(root, "-c", "user.email=t@example.org", "-c", "user.name=t", "commit", "-qm", "pr")


def edgeops(root: Path, secrets: Path, *args: str, broker_password: str = "") -> Result:
    env = {"EDGEOPS_SECRETS_DIR": str(secrets), "EDGEOPS_BROKER_PASSWORD": broker_password,
           "EDGEOPS_CACHE_DIR": str(root.parent / "cache")}
    return CliRunner(env=env).invoke(main, [*args, "--root", str(root)])


@pytest.mark.parametrize("password_file, needle", [
    ("../../../etc/hostname", "has '..'"),
    ("/etc/hostname", "outside the secrets directory"),
    ("lab/client_ed25519", "holds a private key, not a broker password"),
])
def test_a_credential_the_fleet_may_not_name_is_refused_before_anything_is_sent(
        pr_repo: tuple[Path, Path], password_file: str, needle: str) -> None:
    root, secrets = pr_repo
    with capturing_listener() as (port, capture):
        add_evil_fleet(root, port, password_file)
        validated = edgeops(root, secrets, "validate", str(root / "manifests"), str(root / "device_profiles"))
        assert validated.exit_code == ExitCode.INVALID, validated.output
        assert "manifests/fleets/evil.yaml:9: spec.pull.password_file: " in validated.stderr, validated.stderr
        assert needle in validated.stderr and "Traceback" not in validated.output
        for untrusted in ([], ["--untrusted"]):
            planned = edgeops(root, secrets, "plan", "--changed-since", "HEAD~1", *untrusted)
            assert planned.exit_code == ExitCode.INVALID, planned.output
    assert capture.connections == []


def test_an_untrusted_plan_sends_nothing_to_an_endpoint_the_base_does_not_have(pr_repo: tuple[Path, Path]) -> None:
    root, secrets = pr_repo
    with capturing_listener() as (port, capture):
        add_evil_fleet(root, port, None)
        assert edgeops(root, secrets, "validate", str(root / "manifests"), str(root / "device_profiles")).exit_code == ExitCode.OK
        planned = edgeops(root, secrets, "plan", "--changed-since", "HEAD~1", "--untrusted", "-o", "markdown",
                          broker_password=BROKER_SECRET)
        # no lab runs: every device it dials is unreachable, so the plan checked nothing (exit 1, said so)
        assert planned.exit_code == ExitCode.FAILED and "the plan checked nothing" in planned.stderr, planned.output
        assert "evil/e-01" in planned.stdout and "contacted only after merge" in planned.stdout, planned.stdout
        assert capture.connections == []
        # the same plan trusted (after merge, reviewed) does dial it: the capture would see a leak
        trusted = edgeops(root, secrets, "plan", "--changed-since", "HEAD~1", broker_password=BROKER_SECRET)
        assert "Traceback" not in trusted.output
    assert BROKER_SECRET.encode() in capture.received


def test_an_untrusted_plan_contacts_a_device_whose_endpoint_is_unchanged_and_withholds_a_moved_one(
        pr_repo: tuple[Path, Path]) -> None:
    root, secrets = pr_repo
    fleet = root / "manifests" / "fleets" / "lab.yaml"
    fleet.write_text(fleet.read_text().replace("port: 22202", "port: 22299"))
    known_hosts = root / ".edgeops" / "lab" / "known_hosts"
    git(root, "-c", "user.email=t@example.org", "-c", "user.name=t", "commit", "-qam", "pr: move lab-02")
    planned = edgeops(root, secrets, "plan", str(root / "manifests/wearable.yaml"), "--untrusted", "--base", "HEAD~1",
                      "-o", "json")
    assert planned.exit_code == ExitCode.FAILED and "the plan checked nothing" in planned.stderr, planned.output
    rows = {d["key"]: d for d in __import__("json").loads(planned.stdout)[0]["devices"]}
    assert "changed endpoint (address)" in rows["lab/lab-02"]["reason"]
    for key in ("lab/lab-01", "lab/lab-03", "lab/lab-04"):
        assert "contacted only after merge" not in rows[key]["reason"]  # dialled (no lab runs: unreachable)
    assert not known_hosts.exists()


def test_untrusted_needs_a_base_revision(pr_repo: tuple[Path, Path]) -> None:
    root, secrets = pr_repo
    result = edgeops(root, secrets, "plan", str(root / "manifests/wearable.yaml"), "--untrusted")
    assert result.exit_code == ExitCode.INVALID and "--untrusted needs the base revision" in result.output
    missing = edgeops(root, secrets, "plan", str(root / "manifests/wearable.yaml"), "--untrusted", "--base", "no-such-rev")
    assert missing.exit_code == ExitCode.INVALID and "no-such-rev" in missing.output
