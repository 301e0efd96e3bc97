"""A small decoder LM rolled out over real sshd lab devices: built, pushed, measured in time to first token and
tokens per second under onnxruntime-genai, committed; a slower release is caught by tokens/s and rolled back; a
recipe that breaks agreement is refused before any device is touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.connections import Connections
from edgeops.errors import ExitCode
from edgeops.manifest.workspace import load_workspace
from edgeops.operations import apply_deployment
from edgeops.rollout import device_for
from edgeops.targets import target_devices
from labkit.artifacts import repo_at
from labkit.repo import running_lab
from labkit.slow_model import make_slower_decoder

pytestmark = [pytest.mark.ssh, pytest.mark.slow]
MANIFEST = "manifests/assistant-lm.yaml"
NAME = "assistant-lm"


@pytest.fixture(scope="module")
def lm_lab(tmp_path_factory: pytest.TempPathFactory, hostile_home: Path):
    """Two lab devices and the committed small decoder (examples/models/tiny_lm, make_tiny_lm.py --size small)."""
    with running_lab(tmp_path_factory.mktemp("lm"), 2, hostile_home, deployment=NAME) as root:
        yield root


def do_apply(root: Path):
    ws = load_workspace(root)
    with Connections() as connections:
        return apply_deployment(repo_at(root, ws), ws.deployments[NAME], connections)


def observe_all(root: Path) -> dict:
    ws = load_workspace(root)
    with Connections() as connections:
        return {t.key: device_for(t, connections, NAME).observe() for t in target_devices(ws, NAME)}


def edit(root: Path, old: str, new: str) -> str:
    path = root / MANIFEST
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return text


def test_rolled_out_measured_in_tokens_per_second_then_a_no_op(lm_lab: Path) -> None:
    _, result = do_apply(lm_lab)
    assert result.outcome == "succeeded", result.message
    assert len(result.devices) == 2 and {d.decision for d in result.devices} <= {"Passed", "Inconclusive"}  # both keep it
    for device in result.devices:
        generation = device.measurements["generation"]
        assert generation["runtime"].startswith("onnxruntime-genai ")  # what the lab-cpu profile generates with
        assert generation["tokens_per_s"] > 0 and generation["ttft_ms"] > 0 and generation["prompt_tokens"] == 64
        assert device.measurements["golden"]["metric"] == "agreement"
        assert 0 <= device.measurements["golden"]["agreement"] <= 100 and device.measurements["peak_rss_mb"] > 0
        names = {c["name"] for c in device.measurements["checks"]}
        assert {"ttft-slo", "tokens-per-s-slo", "golden", "memory-slo"} <= names
    states = observe_all(lm_lab)
    assert all(s.status in ("committed", "inconclusive") for s in states.values())
    files = next(iter(states.values())).state
    assert files  # the device reports its state
    _, again = do_apply(lm_lab)
    assert again.outcome == "no-op"
    status = CliRunner().invoke(main, ["status", MANIFEST, "-o", "json", "--root", str(lm_lab)])
    assert status.exit_code == 0, status.output
    rows = json.loads(status.stdout)[0]["devices"]
    assert {(r["sync"], r["health"]) for r in rows} == {("Synced", "Healthy")}
    assert all(r["tokens_per_s"] > 0 and r["ttft_ms"] > 0 for r in rows)


def test_a_slower_decoder_is_caught_by_tokens_per_second_and_rolled_back(lm_lab: Path) -> None:
    assert do_apply(lm_lab)[1].ok
    before = {k: s.current for k, s in observe_all(lm_lab).items()}
    generated = lm_lab / "examples" / "models" / "tiny_lm"
    make_slower_decoder(generated / "model.onnx", generated / "slow.onnx", 768, 6)  # same tokens, ~2.5x the work
    original = edit(lm_lab, "tiny_lm/model.onnx", "tiny_lm/slow.onnx")
    try:
        _, result = do_apply(lm_lab)
        assert result.outcome == "halted", result.message
        canary = next(d for d in result.devices if d.wave == 1)
        assert canary.decision == "Failed", canary.reason
        assert "tokens/s new/previous" in canary.reason and "rolled back to" in canary.reason
        assert {k: s.current for k, s in observe_all(lm_lab).items()} == before
    finally:
        (lm_lab / MANIFEST).write_text(original)


def test_a_recipe_that_breaks_agreement_is_refused_before_any_device(lm_lab: Path) -> None:
    before = {k: s.current for k, s in observe_all(lm_lab).items()}
    original = edit(lm_lab, "    - quantize: {mode: auto}",
                    "    - prune: {method: magnitude, sparsity: 0.8, min_elements: 0}")
    try:
        done = CliRunner().invoke(main, ["apply", MANIFEST, "--root", str(lm_lab)])
        assert done.exit_code == ExitCode.FAILED, done.output
        assert "manifests/assistant-lm.yaml:" in done.output and "breaks the quality goal: agreement" in done.output
        assert "Traceback" not in done.output
        assert {k: s.current for k, s in observe_all(lm_lab).items()} == before
    finally:
        (lm_lab / MANIFEST).write_text(original)
