"""Scratch repositories and lab fleets for tests and benchmarks."""

from __future__ import annotations

import atexit
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeops.labplace import free_ports as free_ports  # the tests and benchmarks pick ports with it

REPO = Path(__file__).resolve().parent.parent
# One build cache for every lab fleet of a test run: each lab's repository copy builds the same artifacts, and the
# cache is content-addressed (a key is a hash of everything that makes the artifact), so sharing changes no result.
SHARED_BUILD_CACHE = Path(tempfile.mkdtemp(prefix="edgeops-lab-cache-"))
atexit.register(shutil.rmtree, SHARED_BUILD_CACHE, True)


def share_build_cache(root: Path) -> None:
    """The repository copy's build cache is the run's shared one (see SHARED_BUILD_CACHE)."""
    cache = root / ".edgeops" / "cache"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.symlink_to(SHARED_BUILD_CACHE, target_is_directory=True)


@contextmanager
def edited(*changes: tuple[Path, str, str]) -> Iterator[None]:
    """Replace the first ``old`` by ``new`` in each file for the block, then put every file back as it was."""
    texts = {path: path.read_text() for path, _, _ in changes}
    try:
        for path, old, new in changes:
            assert old in path.read_text(), f"{old!r} not in {path}"
            path.write_text(path.read_text().replace(old, new, 1))
        yield
    finally:
        for path, text in texts.items():
            path.write_text(text)


def copy_repo(dest: Path) -> Path:
    """Copy manifests, profiles, templates and example models/data into ``dest``."""
    for name in ("manifests", "device_profiles", "templates"):
        shutil.copytree(REPO / name, dest / name, dirs_exist_ok=True)
    for name in ("models", "data"):
        shutil.copytree(REPO / "examples" / name, dest / "examples" / name, dirs_exist_ok=True)
    return dest


def write_lab_fleet(root: Path, devices: int, device_roots: Path, name: str = "lab",
                    extra_device: str = "") -> Path:
    """Rewrite the repo copy's lab fleet: ``devices`` sshd devices on free ports, roots under ``device_roots``."""
    lines = [
        "apiVersion: edgeops/v1", "kind: Fleet", f"metadata: {{name: {name}}}", "spec:", "  profile: lab-cpu",
        "  ssh:", "    user: edgeops", "    identity_file: lab/client_ed25519",
        "    known_hosts: ../../.edgeops/lab/known_hosts", "    use_ssh_config: false",
        "    connect_timeout_s: 5", "    connect_retries: 0",
        "  trust:", "    allowed_signers: ../../.edgeops/lab/allowed_signers",
        "    signing_key: lab/release_ed25519", "  devices:",
    ]
    for index, port in enumerate(free_ports(devices), start=1):
        ring = "canary" if index == 1 else "main"
        lines.append(f"    - {{name: {name}-{index:02d}, host: 127.0.0.1, port: {port}, "
                     f"root: {device_roots / f'{name}-{index:02d}'}, labels: {{ring: {ring}}}}}")
    if extra_device:
        lines.append(extra_device)
    path = root / "manifests" / "fleets" / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_hostile_home(home: Path) -> Path:
    """A login HOME like a stock machine's, only worse: its shell startup puts a ``python3`` without
    numpy or onnxruntime first on PATH, and talks on stdout and stderr. Lab devices must not care."""
    bare = home / "bare-python"
    if not (bare / "bin" / "python3").exists():
        base = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", "--without-pip", str(bare)], check=True)
    startup = f'export PATH="{bare}/bin:$PATH"\necho "welcome to a hostile login shell"\necho "motd" >&2\n'
    for name in (".bashrc", ".profile", ".bash_profile"):
        (home / name).write_text(startup)
    return home


@contextmanager
def running_lab(base: Path, devices: int, login_home: Path | None = None,
                deployment: str = "wearable-activity") -> Iterator[Path]:
    """A repo copy under ``base`` whose lab fleet of ``devices`` real sshd devices runs until the block ends."""
    from edgeops.lab import lab_down, lab_up
    from edgeops.manifest.workspace import load_workspace
    from edgeops.targets import target_devices

    root = copy_repo(base / "repo")
    share_build_cache(root)
    write_lab_fleet(root, devices, base / "devices")
    ws = load_workspace(root)
    lab_up(ws, ws.fleets["lab"], target_devices(ws, deployment), login_home=login_home)
    try:
        yield root
    finally:
        lab_down(ws, ws.fleets["lab"])


def write_pull_fleet(root: Path, devices: int, device_roots: Path, name: str = "lab-pull",
                     report_deadline_s: float = 15, tls: bool = False) -> Path:
    """Rewrite the repo copy's pull fleet: its broker and registry on free ports, roots under ``device_roots``;
    with ``tls`` both speak TLS (mqtts://, https://) with the lab's CA in ``.edgeops/lab/<name>/ca.pem``."""
    broker, registry = free_ports(2)
    mqtt, http = ("mqtts", "https") if tls else ("mqtt", "http")
    lines = [
        "apiVersion: edgeops/v1", "kind: Fleet", f"metadata: {{name: {name}}}", "spec:", "  profile: lab-pull",
        "  pull:", f"    broker: {mqtt}://127.0.0.1:{broker}", f"    registry: {http}://127.0.0.1:{registry}",
        *([f"    ca_file: ../../.edgeops/lab/{name}/ca.pem"] if tls else []),
        f"    password_file: lab/{name}/controller.password",
        f"    report_deadline_s: {report_deadline_s}", "    heartbeat_s: 2",
        "  trust:", "    allowed_signers: ../../.edgeops/lab/allowed_signers",
        "    signing_key: lab/release_ed25519", "  devices:",
    ]
    for index in range(1, devices + 1):
        ring = "canary" if index == 1 else "main"
        lines.append(f"    - {{name: pull-{index:02d}, root: {device_roots / f'pull-{index:02d}'}, "
                     f"labels: {{ring: {ring}}}}}")
    path = root / "manifests" / "fleets" / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


PULL_DEPLOYMENT = "wearable-pull"


@contextmanager
def running_pull_lab(base: Path, devices: int, report_deadline_s: float = 15, tls: bool = False) -> Iterator[Path]:
    """A repo copy under ``base`` with a pull fleet (mosquitto, docker-registry, one agent daemon per device)
    and ``manifests/wearable-pull.yaml`` (the wearable model) targeting it, until the block ends."""
    from edgeops.labpull import pull_lab_down, pull_lab_up
    from edgeops.manifest.workspace import load_workspace
    from edgeops.targets import fleet_targets

    root = copy_repo(base / "repo")
    share_build_cache(root)
    write_pull_fleet(root, devices, base / "devices", report_deadline_s=report_deadline_s, tls=tls)
    wearable = (root / "manifests" / "wearable.yaml").read_text()
    (root / "manifests" / f"{PULL_DEPLOYMENT}.yaml").write_text(
        wearable.replace("name: wearable-activity", f"name: {PULL_DEPLOYMENT}").replace("- fleet: lab\n",
                                                                                        "- fleet: lab-pull\n"))
    ws = load_workspace(root)
    fleet = ws.fleets["lab-pull"]
    pull_lab_up(ws, fleet, fleet_targets(ws, fleet))
    try:
        yield root
    finally:
        pull_lab_down(ws, fleet, fleet_targets(ws, fleet))


def lab_device_cpu_s(ws: object, fleet_name: str = "lab") -> float:
    """CPU seconds used on the lab devices so far: every sshd listener's own and its finished children's
    (a connection's sshd, its shells and the agents they ran, once the connection has closed). Detached
    processes (trial timers) are not counted."""
    import os

    from edgeops.lab import lab_status

    total = 0.0
    for device in lab_status(ws, ws.fleets[fleet_name]):  # type: ignore[attr-defined]
        if device.pid:
            fields = Path(f"/proc/{device.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def lab_credentials(root: Path, secrets: Path) -> None:
    """The lab fleet's deploy and release keys in ``secrets`` and its allowed signers where `lab up` leaves
    them (outside git), without starting any device: enough for plan to run against the lab fleet."""
    from edgeops.signing import allowed_signers_line, generate_key

    generate_key(secrets / "lab" / "client_ed25519", "deploy key")
    generate_key(secrets / "lab" / "release_ed25519", "release key")
    signers = root / ".edgeops" / "lab" / "allowed_signers"
    signers.parent.mkdir(parents=True, exist_ok=True)
    signers.write_text(allowed_signers_line((secrets / "lab" / "release_ed25519.pub").read_text()))
