"""The red team's reproduction over real sshd: tightening an SLO plans a re-verification (0 bytes); 3 of 8
devices miss the new SLO and the rollout halts. The halt must not take a model off the 5 that passed (it
used to "roll back" their first install: 5 of 8 devices left with no model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.errors import ExitCode
from edgeops.lab import lab_down, lab_up
from edgeops.manifest.workspace import load_workspace
from edgeops.targets import target_devices
from labkit.repo import copy_repo, share_build_cache, write_lab_fleet

pytestmark = pytest.mark.ssh
MANIFEST = "manifests/wearable.yaml"
HOT = ("lab-02", "lab-05", "lab-07")  # their simulated board sensors read 1 kW: ~700x the energy per inference


def cli(root: Path, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, [*args, "--root", str(root)])


def test_a_tightened_slo_degrades_the_devices_that_miss_it_and_removes_no_model(
        tmp_path_factory: pytest.TempPathFactory, hostile_home: Path) -> None:
    base = tmp_path_factory.mktemp("slo")
    root = copy_repo(base / "repo")
    share_build_cache(root)
    fleet = write_lab_fleet(root, 8, base / "devices")
    fleet.write_text(re.sub(r"(name: (" + "|".join(HOT) + r"), [^\n]*)\}\n", r"\1, lab: {power_mw: 1000000}}\n",
                            fleet.read_text()))
    manifest = root / MANIFEST
    manifest.write_text(manifest.read_text().replace("waves: [1, 50%, 100%]", "waves: [1, 25%, 100%]")
                        .replace("energy_per_inference_mj: 50", "energy_per_inference_mj: 10000"))  # all pass
    ws = load_workspace(root)
    lab_up(ws, ws.fleets["lab"], target_devices(ws, "wearable-activity"), login_home=hostile_home)
    try:
        first = cli(root, "apply", MANIFEST)
        assert first.exit_code == ExitCode.OK, first.output
        # hot devices measure ~20-50 mJ (1 kW x 0.02-0.05 ms), the others ~0.05 mJ: 5 mJ splits them on any load
        manifest.write_text(manifest.read_text().replace("energy_per_inference_mj: 10000", "energy_per_inference_mj: 5"))
        planned = cli(root, "plan", MANIFEST, "-o", "json")
        assert {d["action"] for d in json.loads(planned.stdout)[0]["devices"]} == {"reverify"}, planned.output
        assert all(d["bytes_to_move"] == 0 for d in json.loads(planned.stdout)[0]["devices"])
        applied = cli(root, "apply", MANIFEST, "-o", "json")
        assert applied.exit_code == ExitCode.FAILED, applied.output
        status = cli(root, "status", MANIFEST, "-o", "json")
        rows = {r["device"]: r for r in json.loads(status.stdout)[0]["devices"]}
        assert status.exit_code == ExitCode.FAILED
        assert all(r["release"] for r in rows.values()), rows  # 0 devices without a model
        for name, row in rows.items():
            if name in HOT:
                assert row["health"] == "Degraded" and "SLO" in row["message"], (name, row)
            else:
                assert row["health"] == "Healthy", (name, row)
        for target in target_devices(load_workspace(root), "wearable-activity"):
            state = json.loads((Path(target.root) / "deployments/wearable-activity/state.json").read_text())
            assert state["committed"] and state["current"] == state["committed"], (target.name, state)
    finally:
        lab_down(ws, ws.fleets["lab"])
