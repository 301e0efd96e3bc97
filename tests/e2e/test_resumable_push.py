"""A push cut half way resumes from what the device's staging holds, over real sshd and a real cut link."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.manifest.workspace import load_workspace
from edgeops.targets import target_devices
from labkit.relay import relay_in_front
from labkit.repo import edited, running_lab
from labkit.slow_model import make_heavier

pytestmark = pytest.mark.ssh
MODEL_MB = 20
RECIPE = "  recipe:\n    - quantize:\n        mode: static\n        per_channel: true\n        calibration_method: minmax\n"


def apply(root: Path) -> dict:  # type: ignore[type-arg]
    done = CliRunner().invoke(main, ["apply", "manifests/wearable.yaml", "-o", "json", "--root", str(root)])
    return {"exit": done.exit_code, **json.loads(done.stdout)[0]}


def test_an_upload_cut_half_way_resumes_instead_of_starting_again(tmp_path: Path) -> None:
    with running_lab(tmp_path, 1) as root:
        assert apply(root)["exit"] == 0  # the wearable model, as usual
        relay = relay_in_front(root, "lab-01")
        try:
            heavy = make_heavier(root / "examples/models/wearable_cnn.onnx", root / "examples/models/heavy.onnx",
                                 MODEL_MB)
            size = heavy.stat().st_size
            manifest = root / "manifests" / "wearable.yaml"
            with edited((manifest, "path: ../examples/models/wearable_cnn.onnx", "path: ../examples/models/heavy.onnx"),
                        (manifest, "    sha256: ", "    # sha256: "), (manifest, RECIPE, "  recipe: []\n")):
                relay.cut_upload_after = size // 2  # the link drops half way through the model's upload
                cut = apply(root)
                relay.cut_upload_after = None
                [device] = cut["devices"]
                assert device["decision"] == "Unreachable" and device["bytes_moved"] == 0, device
                staging = Path(target_devices(load_workspace(root), "wearable-activity")[0].root) / ".staging"
                parts = {p.name: p.stat().st_size for p in staging.glob("*.part")}
                assert len(parts) == 1 and 0 < next(iter(parts.values())) < size, parts  # what arrived stays
                kept = next(iter(parts.values()))
                resumed = apply(root)
            [device] = resumed["devices"]
            # pushed and measured (the unquantized model is slower than what runs: the gate may reject it, which
            # is not the point here)
            assert device["decision"] != "Unreachable", device
            # bytes moved: the rest of the model and the release's small files (golden set, config), not the whole
            # model again: about 20 MB in all, not 30
            assert device["bytes_moved"] < size - kept + 1_000_000, (device["bytes_moved"], size, kept)
            assert kept + device["bytes_moved"] < size * 1.1
            assert not list(staging.glob("*.part"))  # the finished upload became a blob
        finally:
            relay.close()
