"""Over real sshd: a device that cannot run the release is refused at plan time and nothing is pushed to it.

lab-01's root is a 1 MB tmpfs (too small for any release); both devices log in through a hostile HOME
whose shell startup puts a python3 without numpy or onnxruntime first on PATH.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.errors import ExitCode
from labkit.repo import copy_repo, share_build_cache, write_lab_fleet

pytestmark = pytest.mark.ssh
PROFILE = "device_profiles/lab-cpu.yaml"
MANIFEST = "manifests/wearable.yaml"


@pytest.fixture(scope="module")
def small_lab(tmp_path_factory: pytest.TempPathFactory, hostile_home: Path):
    from edgeops.lab import lab_down, lab_up
    from edgeops.manifest.workspace import load_workspace
    from edgeops.targets import target_devices

    base = tmp_path_factory.mktemp("preflight")
    root = copy_repo(base / "repo")
    share_build_cache(root)
    write_lab_fleet(root, 2, base / "devices")
    tiny = base / "devices" / "lab-01"
    tiny.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tiny)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a 1 MB tmpfs as a device root (run as root): {mounted.stderr.strip()}")
    try:
        ws = load_workspace(root)
        lab_up(ws, ws.fleets["lab"], target_devices(ws, "wearable-activity"), login_home=hostile_home)
        try:
            yield root, base / "devices"
        finally:
            lab_down(ws, ws.fleets["lab"])
    finally:  # a mount left behind outlives the run (pytest then cannot remove its temporary folders)
        subprocess.run(["umount", str(tiny)], check=False)


def cli(root: Path, *args: str):
    return CliRunner().invoke(main, [*args, "--root", str(root)])


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def pushed(devices: Path, name: str) -> list[str]:
    """What edgeops wrote under a device root (lab up, as the administrator, puts the simulated power sensor, the
    trust root and the agent there)."""
    root = devices / name
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
    return [f for f in found if not f.startswith(("sensors", "trust")) and f not in ("agent", "agent/edgeops_agent.py")]


@pytest.fixture
def profile(small_lab, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(small_lab[0])  # messages name files relative to where edgeops runs
    path = small_lab[0] / PROFILE
    original = path.read_text()
    yield path
    path.write_text(original)


def test_device_python_without_onnxruntime_is_refused_before_any_push(small_lab, profile: Path,
                                                                      hostile_home: Path) -> None:
    root, devices = small_lab
    profile.write_text(profile.read_text().replace("python: /var/tmp/edgeops-lab/runtime/bin/python3",
                                                   "python: python3"))
    plan = cli(root, "plan", MANIFEST)
    assert plan.exit_code == ExitCode.REFUSED, plan.output
    where = f"{PROFILE}:{line_of(profile, 'python: python3')}"
    # the deploy key's shell reads no startup files: python3 is the system's, found on sshd's PATH
    assert re.search(r"lab-02: python3 \(/[^)]*python3\) has no numpy or onnxruntime: install numpy and onnxruntime "
                     rf"on the device or set device.python \({re.escape(where)}\)", plan.output.replace("\n", "")), \
        plan.output
    apply = cli(root, "apply", MANIFEST)
    assert apply.exit_code == ExitCode.REFUSED, apply.output
    assert "halted" in apply.output
    assert pushed(devices, "lab-02") == [] and pushed(devices, "lab-01") == []


def test_missing_execution_provider_is_refused(small_lab, profile: Path) -> None:
    root, devices = small_lab
    profile.write_text(profile.read_text().replace("    - name: CPUExecutionProvider",
                                                   "    - name: XnnpackExecutionProvider\n"
                                                   "    - name: CPUExecutionProvider"))
    plan = cli(root, "plan", MANIFEST, "-o", "json")
    assert plan.exit_code == ExitCode.REFUSED, plan.output
    [document] = json.loads(plan.stdout)
    by_device = {d["device"]: d for d in document["devices"]}
    assert by_device["lab-02"]["action"] == "refused"
    assert "lab-02: onnxruntime" in by_device["lab-02"]["reason"]
    assert "lacks XnnpackExecutionProvider (available: " in by_device["lab-02"]["reason"]
    assert f"change execution_providers ({PROFILE}:{line_of(profile, 'execution_providers:')})" in \
        by_device["lab-02"]["reason"]
    assert "XnnpackExecutionProvider" not in by_device["lab-02"]["facts"]["providers"]
    assert pushed(devices, "lab-02") == []


def test_a_device_without_space_is_refused_and_the_facts_are_shown(small_lab, profile: Path) -> None:
    root, devices = small_lab
    plan = cli(root, "plan", MANIFEST, "-o", "json")
    assert plan.exit_code == ExitCode.REFUSED, plan.output
    [document] = json.loads(plan.stdout)
    by_device = {d["device"]: d for d in document["devices"]}
    tiny, roomy = by_device["lab-01"], by_device["lab-02"]
    assert tiny["action"] == "refused" and " free under " in tiny["reason"] and "set device.root" in tiny["reason"]
    assert tiny["facts"]["free_bytes"] <= 1 << 20
    assert roomy["action"] == "install" and roomy["wave"] == 1
    facts = roomy["facts"]
    assert facts["python_executable"] == "/var/tmp/edgeops-lab/runtime/bin/python3"
    assert facts["onnxruntime_version"] and "CPUExecutionProvider" in facts["providers"]
    assert facts["machine"] and facts["power_readable"] is True
    apply = cli(root, "apply", MANIFEST)  # max_failed_devices: 0, and a refused device counts as failed
    assert apply.exit_code == ExitCode.REFUSED, apply.output
    assert "before the first wave" in apply.output
    assert pushed(devices, "lab-01") == [] and pushed(devices, "lab-02") == []
    status = cli(root, "status", MANIFEST, "-o", "json")
    rows = {r["device"]: r for r in json.loads(status.stdout)[0]["devices"]}
    assert rows["lab-02"]["facts"]["onnxruntime_version"] == facts["onnxruntime_version"]
    assert rows["lab-02"]["runtime"].startswith("py ")


def test_the_lab_device_runtime_holds_only_what_the_agent_needs(small_lab) -> None:
    """Over SSH, as the agent sees it: numpy, onnxruntime and their own dependencies, nothing of the controller's
    (and onnxruntime-genai: the lab-cpu profile generates text with it)."""
    import importlib.metadata

    from edgeops.lab import admin_key_of
    from edgeops.manifest.workspace import load_workspace
    from edgeops.targets import target_devices
    from edgeops.transport.ssh import SSHTransport, target_for

    ws = load_workspace(small_lab[0])
    target = target_devices(ws, "wearable-activity")[1]
    transport = SSHTransport(target_for(target.name, target.device.host, target.device.port,  # the admin's shell
                                        target.fleet.obj.spec.ssh.model_copy(update={"user": "root"}),
                                        target.fleet.path.parent, str(admin_key_of(ws))))
    try:
        listed = transport.run([target.python, "-I", "-c", "import importlib.metadata as m; "
                                "print(' '.join(sorted(d.metadata['Name'].lower() for d in m.distributions())))"])
    finally:
        transport.close()
    installed = set(listed.stdout.split())
    wanted = {"numpy", "onnxruntime", "onnxruntime-genai"}
    requires = {r.split(";")[0].split("<")[0].split(">")[0].split("=")[0].split("[")[0].strip().lower()
                for package in wanted - {"numpy"} for r in importlib.metadata.requires(package) or []
                if "extra ==" not in r}
    assert wanted <= installed
    assert installed <= wanted | requires, installed - (wanted | requires)
    assert not installed & {"edgeops", "paramiko", "pydantic", "click", "jinja2", "onnx", "torch", "rich"}


def test_a_missing_identity_file_stops_before_any_device_is_dialled(small_lab, monkeypatch: pytest.MonkeyPatch) -> None:
    root = small_lab[0]
    monkeypatch.chdir(root)
    fleet = root / "manifests/fleets/lab.yaml"
    original = fleet.read_text()
    try:
        fleet.write_text(original.replace("identity_file: lab/client_ed25519", "identity_file: lab/deploy_key"))
        for command in ("plan", "apply", "status"):
            result = cli(root, command, MANIFEST)
            assert result.exit_code == ExitCode.INVALID, result.output
            assert result.stderr.startswith(f"error: manifests/fleets/lab.yaml:{line_of(fleet, 'identity_file')}: "
                                            "spec.ssh.identity_file: identity file lab/deploy_key "
                                            "does not exist"), result.stderr
    finally:
        fleet.write_text(original)
