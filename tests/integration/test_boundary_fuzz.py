"""A fuzzer at the trust boundary: hostile fleets from a pull request, run through `validate` and an untrusted
`plan` in this process under an audit hook (``sys.addaudithook``) that records every file opened and every
socket connected, and refuses (raises) any connection off this machine.

Whatever a generated fleet names (paths out of the repository in every spelling, symlinks, credentials that are
really keys, brokers, registries and hosts anywhere), the run must: read no file outside the allowed roots,
connect to no endpoint the base revision does not have, show no secret byte, and end with a documented exit code
and no traceback. Bounded: a few dozen cases, under a minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeops.cli import main
from labkit.audit import off_machine, outside, watching
from labkit.repo import copy_repo, lab_credentials

SECRET = "OUTSIDE-SECRET-7f3a"            # planted outside every allowed root
BROKER_PASSWORD = "BROKER-PASSWORD-91c2"  # the CI's EDGEOPS_BROKER_PASSWORD
STORED_PASSWORD = "STORED-PASSWORD-55d0"  # a password file in the secrets directory
BASE_PORTS = {22201, 22202, 22203, 22204}  # the base revision's lab fleet: the only endpoints an untrusted plan dials


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.email=f@example.org", "-c", "user.name=f", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    base = tmp_path_factory.mktemp("fuzz")
    root = copy_repo(base / "repo")
    secrets, outside_dir = base / "secrets", base / "outside"
    lab_credentials(root, secrets)
    (secrets / "lab" / "broker.password").write_text(STORED_PASSWORD + "\n")
    outside_dir.mkdir()
    (outside_dir / "secret.txt").write_text(SECRET + "\n")
    (outside_dir / "id_ed25519").write_text(f"-----BEGIN OPENSSH PRIVATE KEY-----\n{SECRET}\n")
    (root / ".gitignore").write_text(".edgeops/\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "base")
    built = CliRunner(env={"EDGEOPS_CACHE_DIR": str(base / "cache"), "EDGEOPS_SECRETS_DIR": str(secrets)}).invoke(
        main, ["build", str(root / "manifests" / "wearable.yaml"), "--root", str(root)])
    assert built.exit_code == 0, built.output  # built before the watch: a plan only reads the cache
    return {"root": root, "secrets": secrets, "outside": outside_dir, "base": git(root, "rev-parse", "HEAD"),
            "cache": base / "cache"}


def path_spellings(world: dict) -> st.SearchStrategy[str]:  # type: ignore[type-arg]
    """Names a fleet may give a file: mostly ways out of the repository and the secrets directory."""
    out = world["outside"]
    rel = os.path.relpath(out / "secret.txt", world["root"] / "manifests" / "fleets")
    from_secrets = os.path.relpath(out / "secret.txt", world["secrets"])
    escapes = st.sampled_from([
        from_secrets, f"lab/../{from_secrets}", f"lab/../../{os.path.relpath(out / 'id_ed25519', world['secrets'])}",
        f"{out}/secret.txt", rel, f"../../../../../../..{out}/secret.txt", f"lab/../../{rel}", "~/.ssh/id_ed25519",
        f"{out}/id_ed25519", "link-out", "../../link-out", f"./{from_secrets}", f"lab//../{from_secrets}",
    ])
    odd = st.sampled_from([
        "lab/client_ed25519", "lab/broker.password", "lab/release_ed25519", "lab/release_ed25519.pub", "", ".", "..",
        "/", "lab/", "x\u0000y", "lab/\u2024\u2024/x", "%2e%2e/secret", "lab//client_ed25519", "./lab/client_ed25519",
        str(world["secrets"] / "lab/client_ed25519"),
    ])
    return st.one_of(escapes, escapes, escapes, odd)


HOSTS = st.sampled_from(["127.0.0.1", "127.0.0.9", "localhost", "[::1]", "192.0.2.7", "device.invalid",
                         "169.254.169.254", "10.9.8.7", "0.0.0.0", "a" * 70])
PORTS = st.sampled_from([22201, 1883, 8883, 5000, 65535, 1])
CREDENTIAL_FIELDS = st.sampled_from(["ssh.identity_file", "ssh.known_hosts", "pull.password_file", "pull.ca_file",
                                     "trust.signing_key", "trust.allowed_signers"])


def hostile_fleet(draw: st.DrawFn, world: dict) -> tuple[str, bool]:  # type: ignore[type-arg]
    """A fleet file a pull request adds, and whether it is a pull fleet."""
    attacked = draw(CREDENTIAL_FIELDS)
    pull = attacked.startswith("pull.") or draw(st.booleans())
    host, port = draw(HOSTS), draw(PORTS)
    fields = {attacked: draw(path_spellings(world)),
              **dict(draw(st.lists(st.tuples(CREDENTIAL_FIELDS, path_spellings(world)), max_size=2)))}
    scheme = draw(st.sampled_from(["mqtt", "mqtts"]))
    lines = ["apiVersion: edgeops/v1", "kind: Fleet", "metadata: {name: fuzz}", "spec:", "  profile: lab-cpu",
             "  ssh:", "    use_ssh_config: false", "    connect_timeout_s: 1", "    connect_retries: 0"]
    lines += [f"    {k.split('.')[1]}: {v!r}" for k, v in fields.items() if k.startswith("ssh.")]
    if pull:
        lines += ["  pull:", f"    broker: {scheme}://{host}:{port}", f"    registry: http://{host}:{port}",
                  f"    insecure: {str(draw(st.booleans())).lower()}"]
        lines += [f"    {k.split('.')[1]}: {v!r}" for k, v in fields.items() if k.startswith("pull.")]
    trust = {k: v for k, v in fields.items() if k.startswith("trust.")}
    if trust:
        lines += ["  trust:"] + [f"    {k.split('.')[1]}: {v!r}" for k, v in trust.items()]
        if "trust.allowed_signers" not in trust:
            lines.append("    allowed_signers: ../../.edgeops/lab/allowed_signers")
    device = f"{{name: fz-01, host: {host!r}, port: {port}}}" if not pull else "{name: fz-01}"
    lines += ["  devices:", f"    - {device}"]
    return "\n".join(lines) + "\n", pull


@st.composite
def pull_requests(draw: st.DrawFn, world: dict) -> tuple[str, bool, bool]:  # type: ignore[type-arg]
    text, pull = hostile_fleet(draw, world)
    return text, pull, draw(st.booleans())  # also retarget the lab fleet's device at the hostile host?


def run(world: dict, *args: str) -> tuple[int, str, list[str], list[object]]:  # type: ignore[type-arg]
    env = {"EDGEOPS_SECRETS_DIR": str(world["secrets"]), "EDGEOPS_BROKER_PASSWORD": BROKER_PASSWORD,
           "EDGEOPS_CACHE_DIR": str(world["cache"]), "HOME": str(world["outside"].parent)}
    with watching(block_off_machine=True) as seen:
        result = CliRunner(env=env).invoke(main, [*args, "--root", str(world["root"])])
    return result.exit_code, result.output, seen.opened, seen.connected


def allowed_roots(world: dict) -> list[str]:  # type: ignore[type-arg]
    """Where an untrusted run may read: the repository, the secrets directory, its own scratch and cache, the
    Python installation, and the kernel's pseudo files."""
    python = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.dirname(os.__file__))}
    system = ["/usr/lib/os-release", "/etc/os-release", "/etc/localtime", "/usr/share/zoneinfo", "/etc/ssl",
              "/usr/lib/ssl", "/etc/hosts", "/etc/nsswitch.conf", "/etc/host.conf", "/etc/resolv.conf", "/etc/gai.conf"]
    return [str(world["root"]), str(world["secrets"]), str(world["cache"]), *python, *system, "/proc", "/sys", "/dev",
            os.path.join(tempfile.gettempdir(), "edgeops-"), *[p for p in sys.path if p and os.path.isdir(p)]]


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_hostile_pull_request_reads_no_secret_and_dials_nothing_new(world: dict, data: st.DataObject) -> None:  # type: ignore[type-arg]
    root = world["root"]
    text, pull, move_lab = data.draw(pull_requests(world))
    git(root, "reset", "-q", "--hard", world["base"])
    git(root, "clean", "-qfd", "-e", ".edgeops")
    (root / "manifests" / "fleets" / "fuzz.yaml").write_text(text)
    (root / "manifests" / "fleets" / "link-out").symlink_to(world["outside"] / "secret.txt")
    (root / "link-out").symlink_to(world["outside"] / "secret.txt")
    wearable = root / "manifests" / "wearable.yaml"
    wearable.write_text(wearable.read_text().replace("    - fleet: lab\n", "    - fleet: lab\n    - fleet: fuzz\n"))
    if move_lab:
        fleet = root / "manifests" / "fleets" / "lab.yaml"
        fleet.write_text(fleet.read_text().replace("port: 22202", "port: 1883"))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "pull request")
    for args in (["validate", str(root / "manifests"), str(root / "device_profiles")],
                 ["plan", "--untrusted", "--base", str(world["base"]), str(wearable), "-o", "markdown"]):
        code, output, opened, connected = run(world, *args)
        assert code in (0, 2, 3, 4) or (code == 1 and "the plan checked nothing" in output), (args, code, output)
        assert "Traceback" not in output, output
        for secret in (SECRET, BROKER_PASSWORD, STORED_PASSWORD, "PRIVATE KEY"):
            assert secret not in output, (secret, output)
        assert not outside(opened, allowed_roots(world)), (text, outside(opened, allowed_roots(world)))
        dialled = [a for a in connected if isinstance(a, tuple)]
        assert all(not off_machine(a) and int(a[1]) in BASE_PORTS for a in dialled), (text, dialled)
