"""`edgeops lab status` and `lab down` without a fleet act on every lab fleet, not only the one named lab."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.lab import lab_up
from edgeops.manifest.workspace import load_workspace
from edgeops.targets import fleet_targets
from labkit.repo import copy_repo, write_lab_fleet

pytestmark = pytest.mark.ssh


def test_lab_status_and_down_cover_every_lab_fleet(tmp_path: Path) -> None:
    root = copy_repo(tmp_path / "repo")
    write_lab_fleet(root, 1, tmp_path / "devices")
    write_lab_fleet(root, 2, tmp_path / "devices", name="bench")
    ws = load_workspace(root)
    for name in ("lab", "bench"):
        lab_up(ws, ws.fleets[name], fleet_targets(ws, ws.fleets[name]))
    try:
        status = CliRunner().invoke(main, ["lab", "status", "--root", str(root)])
        assert status.exit_code == 0, status.output
        assert sorted(line.split()[0] for line in status.output.splitlines() if "running" in line) == \
            ["bench/bench-01", "bench/bench-02", "lab/lab-01"]
    finally:
        down = CliRunner().invoke(main, ["lab", "down", "--root", str(root)])
    assert down.exit_code == 0 and "stopped 2 lab device(s) of bench" in down.output \
        and "stopped 1 lab device(s) of lab" in down.output, down.output
    after = CliRunner().invoke(main, ["lab", "status", "--root", str(root)])
    assert "running" not in after.output and after.output.count("stopped") == 3
