"""A lab placement moves only the fleet's loopback devices, and an unreadable one moves nothing."""

from __future__ import annotations

from pathlib import Path

from edgeops.manifest.placement import Place, placed, placement_file, read_placement, write_placement
from edgeops.manifest.workspace import load_workspace
from labkit.repo import copy_repo


def test_a_placement_moves_lab_devices_and_never_a_real_fleets(tmp_path: Path) -> None:
    root = copy_repo(tmp_path / "repo")
    moved = Place("127.0.0.1", 40001, "/var/tmp/elsewhere/lab-01")
    write_placement(root, "lab", {"lab-01": moved})
    write_placement(root, "meter-cameras", {"cam-plant-a-01": Place("127.0.0.1", 40002, "/tmp/x")})
    ws = load_workspace(root)
    lab = {d.name: d for d in ws.fleets["lab"].obj.spec.devices}
    assert (lab["lab-01"].host, lab["lab-01"].port, lab["lab-01"].root) == ("127.0.0.1", 40001, moved.root)
    assert lab["lab-02"].port == 22202 and lab["lab-02"].root is None
    camera = ws.fleets["meter-cameras"].obj.spec.devices[0]
    assert camera.host != "127.0.0.1" and camera.port != 40002  # a real device is never redirected
    assert ws.fleets["lab"].where(("spec", "devices", 0, "port")).endswith("lab.yaml:22")  # lines stay the file's
    assert placed(ws.fleets["lab"], {}) is ws.fleets["lab"]


def test_an_unreadable_placement_leaves_the_devices_where_the_file_says(tmp_path: Path) -> None:
    root = copy_repo(tmp_path / "repo")
    for text in ("{not json", '{"lab-01": {"host": "127.0.0.1"}}', "[1, 2]"):
        placement_file(root, "lab").parent.mkdir(parents=True, exist_ok=True)
        placement_file(root, "lab").write_text(text)
        assert read_placement(root, "lab") == {}
        assert load_workspace(root).fleets["lab"].obj.spec.devices[0].port == 22201
    write_placement(root, "lab", {})
    assert not placement_file(root, "lab").exists()
