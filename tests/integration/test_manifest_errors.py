"""Broken manifests, fleets and profiles: each gives one located line, exit code 3, no traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main

W, C, A = "manifests/wearable.yaml", "manifests/camera.yaml", "manifests/assistant.yaml"
LAB, CAMS, WB = "manifests/fleets/lab.yaml", "manifests/fleets/meter-cameras.yaml", "manifests/fleets/wristbands-eu.yaml"
ARM, X86, JET, NPU = ("device_profiles/arm-wearable.yaml", "device_profiles/x86-gateway.yaml",
                      "device_profiles/jetson-orin.yaml", "device_profiles/npu-edge.yaml")

# (id, file, old text, new text, text on the expected line, words the message must contain)
CASES = [
    ("negative-slo", W, "latency_p95_ms: 25", "latency_p95_ms: -3", "latency_p95_ms: -3", "spec.slo.latency_p95_ms: must be > 0 (got -3)"),
    ("unknown-key-typo", W, "latency_p95_ms: 25", "latnecy_p95_ms: 25", "latnecy", "did you mean 'latency_p95_ms'"),
    ("missing-fleet", W, "fleet: lab", "fleet: labb", "fleet: labb", "no Fleet named 'labb'; did you mean 'lab'"),
    ("wrong-type-number", W, "max_drop: 1.0", "max_drop: lots", "max_drop: lots", "spec.quality.max_drop: must be a number"),
    ("bad-yaml-colon", W, "metric: accuracy", "metric: accuracy: high", "accuracy: high", "malformed YAML: mapping values"),
    ("bad-yaml-unclosed", W, "waves: [1, 50%, 100%]", "waves: [1, 50%, 100%", "max_failed_devices", "malformed YAML"),
    ("duplicate-key", W, "  targets:", "  slo: {}\n  targets:", "  slo: {}", "duplicate key 'slo'"),
    ("wave-over-100", W, "waves: [1, 50%, 100%]", "waves: [1, 150%, 100%]", "waves:", "between 0% and 100%"),
    ("wave-zero", W, "waves: [1, 50%, 100%]", "waves: [1, 0%, 100%]", "waves:", "no device"),
    ("wave-garbage", W, "waves: [1, 50%, 100%]", "waves: [1, half, 100%]", "waves:", "percentage such as '25%'"),
    ("negative-budget", W, "max_failed_devices: 0", "max_failed_devices: -1", "max_failed_devices", "must be >= 0"),
    ("bad-enum", W, "on_failure: rollback", "on_failure: explode", "on_failure: explode", "must be one of"),
    ("missing-model-file", W, "wearable_cnn.onnx", "nope.onnx", "nope.onnx", "model file not found"),
    ("sha-mismatch", W, "sha256: ", "sha256: " + "a" * 64 + "\n    #", "sha256: aaaa", "do not match the pinned digest"),
    ("sha-bad-form", W, "sha256: ", "sha256: abc\n    #", "sha256: abc", "spec.model.sha256"),
    ("bad-quantize-mode", W, "mode: static", "mode: int3", "mode: int3", "spec.recipe[0].quantize.mode: must be one of"),
    ("bad-calibration-method", W, "calibration_method: minmax", "calibration_method: kmeans", "kmeans", "must be one of"),
    ("unknown-step", W, "- quantize:", "- quantise:", "quantise", "did you mean 'quantize'"),
    ("bad-api-version", W, "apiVersion: edgeops/v1", "apiVersion: edgeops/v2", "apiVersion", "apiVersion: must be one of"),
    ("unknown-kind", W, "kind: Deployment", "kind: Deploymint", "kind: Deploymint", "did you mean 'Deployment'"),
    ("bad-name", W, "name: wearable-activity", "name: Wearable_Activity", "name: Wearable_Activity", "metadata.name"),
    ("missing-calibration-data", W, "wearable_calibration.npz", "gone.npz", "gone.npz", "calibration data not found"),
    ("selector-wrong-type", W, "    - fleet: lab", "    - fleet: lab\n      selector: {match_labels: [a]}", "match_labels", "must be a mapping"),
    ("missing-required", W, "  quality:\n    metric: accuracy\n", "  quality:\n", "  quality:", "spec.quality.metric: required field is missing"),
    ("fp16-on-cpu", C, "- quantize: {mode: auto}", "- quantize: {mode: fp16}", "- quantize: {mode: fp16}", "fp16 targets GPUs"),
    ("two-step-kinds", C, "- quantize: {mode: auto}", "- {quantize: {mode: auto}, prune: {method: magnitude, sparsity: 0.5}}", "prune", "exactly one of"),
    ("sparsity-over-1", C, "- quantize: {mode: auto}", "- prune: {method: magnitude, sparsity: 1.5}", "sparsity: 1.5", "must be < 1"),
    ("tpu-not-integer", A, "      - quantize: {mode: static, op_types: [MatMul, Gemm], activation_type: uint8}",
     "      - prune: {method: magnitude, sparsity: 0.5}", "    tpu:", "needs a fully integer model"),
    ("relative-max-abs", A, "metric: cosine", "metric: max_abs_error\n    drop: relative", "  quality:", "no baseline"),
    ("port-range", LAB, "port: 22201", "port: 70000", "port: 70000", "must be <= 65535"),
    ("duplicate-device", LAB, "name: lab-02", "name: lab-01", "  devices:", "appears twice"),
    ("fleet-profile-missing", LAB, "profile: lab-cpu", "profile: lab-gpu", "profile: lab-gpu", "did you mean 'lab-cpu'"),
    ("device-profile-missing", CAMS, "host: cam-plant-a-01.cameras.example.net, profile: jetson-orin",
     "host: cam-plant-a-01.cameras.example.net, profile: jetson-nano", "jetson-nano", "no DeviceProfile named 'jetson-nano'"),
    ("empty-host", LAB, "lab-03, host: 127.0.0.1", "lab-03, host: ''", "lab-03", "spec.devices[2].host"),
    ("duplicate-name-across-files", WB, "name: wristbands-eu", "name: lab", "name: lab", "names must be unique"),
    ("negative-threads", ARM, "intra_op_num_threads: 1", "intra_op_num_threads: -1", "intra_op_num_threads", "must be >= 0"),
    ("gpu-without-gpu-provider", X86, "accelerator: cpu", "accelerator: gpu", "execution_providers:", "needs one of"),
    ("missing-template", ARM, "template: cpu.json.j2", "template: nope.j2", "template: nope.j2", "template not found"),
    ("relative-root", ARM, "root: /opt/edgeops", "root: opt/edgeops", "root: opt", "absolute path"),
    ("rapl-board-boundary", X86, "boundary: package", "boundary: board", "boundary: board", "must be one of"),
    ("power-source-typo", ARM, "source: hwmon", "source: hwmom", "source: hwmom", "did you mean 'hwmon'"),
    ("unknown-provider", JET, "- name: CUDAExecutionProvider", "- name: CUDAProvider", "CUDAProvider", "must be one of"),
    ("bad-yaml-tab", NPU, "  accelerator: tpu", "\taccelerator: tpu", "\taccelerator", "malformed YAML"),
    # what can be known offline: the model file against its declaration, fleets against each other
    ("model-input-name", W, "{name: signal,", "{name: signals,", "signals", "the model has no input 'signals'; did you mean 'signal'?"),
    ("model-input-dtype", W, "shape: [batch, 3, 128], dtype: float32", "shape: [batch, 3, 128], dtype: int64", "int64", "'signal' is float32 in the model, declared int64"),
    ("model-input-rank", W, "shape: [batch, 3, 128]", "shape: [batch, 384]", "batch, 384", "has rank 3 in the model"),
    ("model-input-dim", W, "shape: [batch, 3, 128]", "shape: [batch, 3, 64]", "batch, 3, 64", "axis 2 is 128 in the model, declared 64"),
    ("model-output-name", W, "{name: logits,", "{name: scores,", "scores", "the model has no output 'scores'; the model has: logits"),
    ("quality-output", W, "metric: accuracy", "metric: accuracy\n    output: logit", "output: logit", "no output 'logit'; did you mean 'logits'?"),
    ("recipe-op-type", W, "calibration_method: minmax", "calibration_method: minmax\n        op_types: [Conv, Gem]", "op_types", "the model has no Gem nodes; did you mean 'Gemm'?"),
    ("waves-shrink", W, "waves: [1, 50%, 100%]", "waves: [1, 50%, 25%]", "waves:", "must grow"),
    ("duplicate-address", LAB, "port: 22202", "port: 22201", "lab-02", "127.0.0.1:22201 is also manifests/fleets/lab.yaml device lab-01"),
    ("duplicate-address-across-fleets", CAMS, "host: cam-plant-a-01.cameras.example.net,", "host: 127.0.0.1, port: 22203,", "127.0.0.1, port: 22203", "is also manifests/fleets/lab.yaml device lab-03"),
    ("host-with-user", LAB, "lab-03, host: 127.0.0.1", "lab-03, host: root@127.0.0.1", "root@", "put the user in ssh.user"),
    ("host-garbage", LAB, "lab-03, host: 127.0.0.1", "lab-03, host: 'cam 01; rm -rf /'", "lab-03", "is not a valid host name"),
    ("bad-user", LAB, "user: edgeops", "user: 'ro ot'", "user:", "'ro ot' is not a valid user name"),
    ("bad-jump-host", WB, "jump_host: ops@bastion.wristbands.example.net:22", "jump_host: ops@bastion.wristbands.example.net:99999", "jump_host", "port '99999'"),
    ("provider-typo", JET, "- name: CUDAExecutionProvider", "- name: CUDAExecutionProvidr", "CUDAExecutionProvidr", "did you mean 'CUDAExecutionProvider'?"),
    ("device-name-path", LAB, "name: lab-02", "name: ../lab-02", "../lab-02", "spec.devices[1].name: does not match"),
    ("not-a-mapping", NPU, None, "- just\n- a list\n", "- just", "expected a mapping"),
    ("empty-file", NPU, None, "", None, "empty file"),
]


def _mutate(root: Path, file: str, old: str | None, new: str) -> str:
    path = root / file
    text = path.read_text()
    if old is None:
        text = new
    else:
        assert old in text, f"test case out of date: {old!r} not in {file}"
        text = text.replace(old, new, 1)
    path.write_text(text)
    return text


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_broken_input_gives_one_located_error(repo_copy: Path, monkeypatch: pytest.MonkeyPatch, case: tuple) -> None:
    _, file, old, new, anchor, words = case
    text = _mutate(repo_copy, file, old, new)
    monkeypatch.chdir(repo_copy)
    result = CliRunner().invoke(main, ["validate", "manifests", "device_profiles"])
    assert result.exit_code == 3, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    expected_line = next((i for i, line in enumerate(text.splitlines(), 1) if anchor in line), None) if anchor else 1
    assert re.match(rf"^error: {re.escape(file)}:{expected_line}: ", lines[0]), (lines[0], expected_line)
    assert words in lines[0]


def test_no_traceback_from_the_real_entry_point(repo_copy: Path) -> None:
    _mutate(repo_copy, W, "latency_p95_ms: 25", "latency_p95_ms: -3")
    done = subprocess.run([sys.executable, "-m", "edgeops", "validate", "manifests"], cwd=repo_copy,
                          capture_output=True, text=True)
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    line = next(i for i, text in enumerate((repo_copy / W).read_text().splitlines(), 1) if "latency_p95_ms" in text)
    assert done.stderr.strip() == f"error: manifests/wearable.yaml:{line}: spec.slo.latency_p95_ms: must be > 0 (got -3)"


def test_several_errors_are_reported_together(repo_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _mutate(repo_copy, W, "latency_p95_ms: 25", "latency_p95_ms: -3")
    _mutate(repo_copy, LAB, "port: 22201", "port: 0")
    monkeypatch.chdir(repo_copy)
    result = CliRunner().invoke(main, ["validate", "manifests", "device_profiles"])
    assert result.exit_code == 3
    assert len(result.stderr.strip().splitlines()) == 2


def test_missing_path_is_a_located_error(repo_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo_copy)
    result = CliRunner().invoke(main, ["validate", "manifests/nothing.yaml"])
    assert result.exit_code == 3
    assert result.stderr.strip() == "error: manifests/nothing.yaml: file not found"


def test_examples_validate(repo_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo_copy)
    result = CliRunner().invoke(main, ["validate", "manifests", "device_profiles"])
    assert result.exit_code == 0, result.output
    assert "5 deployment(s), 5 fleet(s), 6 device profile(s)" in result.output


def test_validate_reports_on_the_files_given_and_what_they_use(repo_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _mutate(repo_copy, C, "- quantize: {mode: auto}", "- quantize: {mode: int3}")  # an unrelated broken manifest
    monkeypatch.chdir(repo_copy)
    result = CliRunner().invoke(main, ["validate", W])
    assert result.exit_code == 0, result.output
    assert "valid: 1 deployment(s), 0 fleet(s), 0 device profile(s)" in result.stdout
    _mutate(repo_copy, "device_profiles/lab-cpu.yaml", "intra_op_num_threads: 1", "intra_op_num_threads: -1")
    result = CliRunner().invoke(main, ["validate", W])  # the profile the manifest's fleet uses is checked too
    assert result.exit_code == 3
    assert [line.split(":")[1] for line in result.stderr.splitlines()] == [" device_profiles/lab-cpu.yaml"]
    whole = CliRunner().invoke(main, ["validate"])
    assert whole.exit_code == 3 and "manifests/camera.yaml" in whole.stderr


def test_a_missing_identity_file_is_a_warning_offline(repo_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    monkeypatch.chdir(repo_copy)
    monkeypatch.setenv("EDGEOPS_SECRETS_DIR", str(tmp_path / "empty-secrets"))
    result = CliRunner().invoke(main, ["validate", LAB])
    assert result.exit_code == 0, result.output
    assert "warning: manifests/fleets/lab.yaml:14: spec.ssh.identity_file: lab/client_ed25519 " \
           "does not exist (yet)" in result.stderr
    assert "warning: manifests/fleets/lab.yaml:19: spec.trust.allowed_signers: ../../.edgeops/lab/allowed_signers " \
           "does not exist (yet)" in result.stderr


def test_usage_errors_do_not_look_like_pending_changes(repo_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo_copy)
    assert CliRunner().invoke(main, ["plan", "--no-such-option"]).exit_code == 3
    assert CliRunner().invoke(main, ["plan"]).exit_code == 3          # neither MANIFEST nor --changed-since
    assert CliRunner().invoke(main, ["lab", "up", "--bogus"]).exit_code == 3
    _mutate(repo_copy, W, "mode: static", "mode: int3")
    assert CliRunner().invoke(main, ["plan", W]).exit_code == 3     # invalid input, before any device
