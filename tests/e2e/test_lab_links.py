"""A lab like the field: devices on half a core and 256 MB, each behind its own shaped link that can be cut.

Real network namespaces, veth pairs and tc token buckets, created by `edgeops lab up`; real sshd inside.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.lab import lab_down
from edgeops.lablink import LAB_NET
from edgeops.manifest.workspace import load_workspace
from edgeops.targets import target_devices
from labkit.hostcaps import cgroups_writable, namespaces_usable
from labkit.repo import copy_repo, edited, share_build_cache, write_lab_fleet
from labkit.slow_model import make_heavier, make_memory_hungry

pytestmark = [pytest.mark.ssh, pytest.mark.slow]
RECIPE = "  recipe:\n    - quantize:\n        mode: static\n        per_channel: true\n        calibration_method: minmax\n"


def cli(root: Path, *args: str) -> tuple[int, str]:
    done = CliRunner().invoke(main, [*args, "--root", str(root)])
    return done.exit_code, done.output


def apply(root: Path) -> dict:  # type: ignore[type-arg]
    code, output = cli(root, "apply", "manifests/wearable.yaml", "-o", "json")
    return {"exit": code, **json.loads(output[output.index("["):])[0]}


def shaped_lab(base: Path, devices: int, lab: str, stall_s: float = 60) -> Path:
    root = copy_repo(base / "repo")
    share_build_cache(root)
    fleet = write_lab_fleet(root, devices, base / "devices")
    fleet.write_text(fleet.read_text().replace("  devices:\n", f"  lab: {lab}\n  devices:\n")
                     .replace("    connect_retries: 0\n", f"    connect_retries: 0\n    stall_timeout_s: {stall_s}\n"))
    code, output = cli(root, "lab", "up", "lab")
    assert code == 0, output
    return root


@pytest.fixture(scope="module")
def field_lab(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    why = namespaces_usable() or cgroups_writable()
    if why:
        pytest.skip(f"this host cannot create network namespaces or cgroups: {why}")
    root = shaped_lab(tmp_path_factory.mktemp("field"), 4, "{cpu: 0.5, memory_mb: 256, link_mbit: 2}")
    try:
        yield root
    finally:
        lab_down(load_workspace(root), load_workspace(root).fleets["lab"], wipe=True)


def test_each_device_lives_behind_its_own_link_and_lab_status_shows_it(field_lab: Path) -> None:
    code, status = cli(field_lab, "lab", "status", "lab")
    assert code == 0 and status.count("link 2 Mbit/s") == 4 and "0.5 core, 256 MB" in status, status
    targets = target_devices(load_workspace(field_lab), "wearable-activity")
    hosts = {t.device.host for t in targets}
    assert len(hosts) == 4 and all(str(LAB_NET.network_address)[:7] in h for h in hosts)  # 10.213.x.x each
    for target in targets:  # the sshd runs inside a namespace the lab created, not the host's
        pid = int((Path(load_workspace(field_lab).root) / ".edgeops/lab/lab" / target.name / "sshd.pid")
                  .read_text())
        assert Path(f"/proc/{pid}/ns/net").readlink() != Path("/proc/self/ns/net").readlink()


def test_the_wearable_rollout_passes_and_a_model_too_big_for_memory_is_reverted(field_lab: Path) -> None:
    first = apply(field_lab)
    assert first["exit"] == 0 and first["outcome"] == "succeeded", first
    assert {d["decision"] for d in first["devices"]} <= {"Passed", "Inconclusive"}, first
    before = {d["device"]: d["release"] for d in
              json.loads(cli(field_lab, "status", "manifests/wearable.yaml", "-o", "json")[1])[0]["devices"]}
    manifest = field_lab / "manifests" / "wearable.yaml"
    make_memory_hungry(field_lab / "examples/models/wearable_cnn.onnx", field_lab / "examples/models/hungry.onnx",
                       400)
    with edited((manifest, "path: ../examples/models/wearable_cnn.onnx", "path: ../examples/models/hungry.onnx"),
                (manifest, "    sha256: ", "    # sha256: "), (manifest, RECIPE, "  recipe: []\n")):
        hungry = apply(field_lab)
    canary = next(d for d in hungry["devices"] if d["wave"] == 1)
    assert hungry["exit"] == 1 and hungry["outcome"] == "halted" and canary["decision"] == "Failed", hungry
    assert "out of memory" in canary["reason"], canary["reason"]
    after = {d["device"]: d["release"] for d in
             json.loads(cli(field_lab, "status", "manifests/wearable.yaml", "-o", "json")[1])[0]["devices"]}
    assert after == before  # every device on its committed release


@pytest.mark.timeout(900)
def test_a_push_cut_by_lab_link_down_resumes_after_lab_link_up(tmp_path: Path) -> None:
    why = namespaces_usable()
    if why:
        pytest.skip(f"this host cannot create network namespaces: {why}")
    mbit = float(os.environ.get("EDGEOPS_CUT_LINK_MBIT", "16"))  # 2: the field's figure, 80 s a push
    root = shaped_lab(tmp_path, 1, f"{{link_mbit: {mbit:g}}}", stall_s=3)
    try:
        assert apply(root)["exit"] == 0
        heavy = make_heavier(root / "examples/models/wearable_cnn.onnx", root / "examples/models/heavy.onnx", 20)
        size = heavy.stat().st_size
        staging = Path(target_devices(load_workspace(root), "wearable-activity")[0].root) / ".staging"
        manifest = root / "manifests" / "wearable.yaml"
        with edited((manifest, "path: ../examples/models/wearable_cnn.onnx", "path: ../examples/models/heavy.onnx"),
                    (manifest, "    sha256: ", "    # sha256: "), (manifest, RECIPE, "  recipe: []\n")):
            result: dict = {}  # type: ignore[type-arg]
            pushing = threading.Thread(target=lambda: result.update(apply(root)))
            pushing.start()
            while pushing.is_alive() and not any(p.stat().st_size >= size // 2 for p in staging.glob("*.part")):
                time.sleep(0.05)
            code, output = cli(root, "lab", "link", "lab-01", "down")
            assert code == 0 and "DOWN" in output, output
            pushing.join(timeout=300)
            cut = result
            code, output = cli(root, "lab", "link", "lab/lab-01", "up")
            assert code == 0 and "DOWN" not in output, output
            [device] = cut["devices"]
            assert device["decision"] == "Unreachable", device  # the kernel gave up on the link after stall_timeout_s
            kept = sum(p.stat().st_size for p in staging.glob("*.part"))
            assert size // 3 < kept < size, (kept, size)  # what crossed before the cut stays
            resumed_at = time.monotonic()
            resumed = apply(root)
            took = time.monotonic() - resumed_at
        [device] = resumed["devices"]
        assert device["decision"] != "Unreachable", device
        assert device["bytes_moved"] < size - kept + 1_000_000, (device["bytes_moved"], size, kept)
        # the link is really held to its rate: the rest cannot cross faster (a busy host only makes it slower)
        assert (size - kept) * 8 / 1e6 / took < mbit * 1.2, (size - kept, took)
    finally:
        lab_down(load_workspace(root), load_workspace(root).fleets["lab"], wipe=True)
