"""Broken manifests, fleets and profiles: each gives one located line, exit code 3, no traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.labplace import free_ports

W, C, A = "manifests/wearable.yaml", "manifests/camera.yaml", "manifests/assistant.yaml"
PULL = "manifests/fleets/lab-pull.yaml"
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
    ("bad-yaml-unclosed", W, "waves: [1, 50%, 100%]", "waves: [1, 50%, 100%", "waves: [1, 50%, 100%", "this bracket is never closed"),
    ("unclosed-quote", W, "name: wearable-activity", "name: 'wearable-activity", "name: 'wearable", "this quote is never closed"),
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
    ("duplicate-device", LAB, "name: lab-02", "name: lab-01", "lab-01, host: 127.0.0.1, port: 22202", "appears twice"),
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
    ("device-name-path", LAB, "name: lab-02", "name: ../lab-02", "../lab-02", "spec.devices[1].name: must be a name of lower-case letters"),
    ("not-a-mapping", NPU, None, "- just\n- a list\n", "- just", "expected a mapping"),
    ("empty-file", NPU, None, "", None, "empty file"),
    # issue 28: what validate can know
    ("ca-file-missing", PULL, "    registry: http://127.0.0.1:15001", "    registry: http://127.0.0.1:15001\n    ca_file: nope.pem", "ca_file", "nope.pem not found"),
    ("ca-file-not-a-certificate", PULL, "    registry: http://127.0.0.1:15001", "    registry: http://127.0.0.1:15001\n    ca_file: lab.yaml", "ca_file", "holds no PEM certificate"),
    ("allowed-signers-not-one", LAB, "allowed_signers: ../../.edgeops/lab/allowed_signers", "allowed_signers: lab.yaml", "allowed_signers", "is not 'principals [options] key-type key'"),
    ("wave-selector-matches-nothing", W, "waves: [1, 50%, 100%]", "waves: [{selector: 'ring=canry'}, 100%]", "waves:", "wave 1 selects no device ('ring=canry'; labels here: ring=canary|main, site=lab)"),
    ("wave-selector-adds-nothing", W, "waves: [1, 50%, 100%]", "waves: [1, {selector: ring=canary}, 100%]", "waves:", "wave 2 selects no device an earlier wave did not take"),
    ("target-selector-matches-nothing", W, "    - fleet: lab", "    - fleet: lab\n      selector: {match_labels: {ring: canry}}", "match_labels", "matches no device of fleet lab (its labels: ring=canary|main, site=lab)"),
    ("exclude-nodes-unknown", W, "calibration_method: minmax", "calibration_method: minmax\n        exclude_nodes: [conv_9]", "exclude_nodes", "the model has no node named 'conv_9'"),
    ("smooth-weight-only", W, "mode: static", "mode: weight_only\n        smooth: 0.5", "- quantize:", "smooth only applies to mode: static or dynamic"),
    ("no-wrong-hint", W, "mode: static", "mode: automatic", "mode: automatic", "'auto' (got 'automatic')"),
    # issue 29: deciding on the device, splitting outliers
    ("decide-on-static", W, "mode: static", "mode: static\n        decide_on: device", "- quantize:", "decide_on only applies to mode: auto"),
    ("decide-on-size", W, "mode: static", "mode: auto\n        objective: size\n        decide_on: device", "- quantize:", "with objective: size the smallest file wins wherever it is measured"),
    ("split-outliers-static", W, "mode: static", "mode: static\n        split_outliers: 6", "- quantize:", "split_outliers only applies to mode: dynamic"),
    ("rotate-static", W, "mode: static", "mode: static\n        rotate: 64", "- quantize:", "rotate only applies to mode: dynamic"),
    ("rotate-not-a-block", W, "mode: static", "mode: dynamic\n        rotate: 48", "rotate", "16, 32, 64 or 128"),
    ("gptq-fp16", W, "mode: static", "mode: fp16\n        rounding: gptq", "- quantize:", "rounding: gptq only applies to integer weights"),
    ("rounding-unknown", W, "mode: static", "mode: dynamic\n        rounding: stochastic", "rounding", "'nearest' or 'gptq'"),
    ("case-only-hint", ARM, "- name: CPUExecutionProvider", "- name: XNNPACKExecutionProvider", "XNNPACK", "did you mean 'XnnpackExecutionProvider'?"),
    ("empty-spec", NPU, None, "apiVersion: edgeops/v1\nkind: DeviceProfile\nmetadata: {name: npu-edge}\nspec:\n", "spec:", "spec: is empty; write its fields under it"),
    ("device-name-not-dns", LAB, "name: lab-02", "name: Nu3_Pi_05", "Nu3_Pi_05", "try 'nu3-pi-05'"),
    ("device-name-dots", LAB, "name: lab-02", "name: a..b", "a..b", "try 'a-b'"),
    ("hardware-class-not-dns", ARM, "hardware_class: arm-cortex-a53", "hardware_class: ARM_A53", "ARM_A53", "try 'arm-a53'"),
    ("root-slash", ARM, "root: /opt/edgeops", "root: /", "root: /", "/ is a system directory"),
    ("root-etc", ARM, "root: /opt/edgeops", "root: /etc/", "root: /etc", "/etc is a system directory"),
    ("root-nul", ARM, "root: /opt/edgeops", 'root: "/opt/edge\\0ops"', "root: ", "control characters"),
    ("infinite-number", W, "latency_p95_ms: 25", "latency_p95_ms: 1e400", "1e400", "must be a finite number"),
    ("kind-a-mapping", W, "kind: Deployment", "kind: {a: 1}", "kind: {a: 1}", "unknown kind {'a': 1}"),
    ("empty-recipe-step", C, "- quantize: {mode: auto}", "- quantize: null", "- quantize: null", "quantize: is empty"),
    ("device-root-override", LAB, "lab-03, host: 127.0.0.1", "lab-03, root: /proc/edgeops, host: 127.0.0.1", "lab-03", "is a system directory"),
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
    assert "valid: 1 deployment(s), 1 fleet(s), 1 device profile(s)" in result.stdout  # what it uses, checked
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


@pytest.mark.parametrize("content", [b"hello, not a model\n", b"PK\x03\x04" + bytes(range(256)) * 4],
                         ids=["text", "zip-like-npz"])
def test_a_model_file_that_is_not_onnx_is_a_located_error(repo_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                          content: bytes) -> None:
    _mutate(repo_copy, W, "    sha256: ", "    # sha256: ")   # no pin: the bytes themselves must be checked
    (repo_copy / "examples/models/wearable_cnn.onnx").write_bytes(content)
    monkeypatch.chdir(repo_copy)
    result = CliRunner().invoke(main, ["validate", W])
    assert result.exit_code == 3, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {W}:9: spec.model.path: ") \
        and "is not an ONNX model" in lines[0], lines


def test_schema_and_reference_errors_of_a_file_come_in_one_round_in_file_order(
        repo_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _mutate(repo_copy, W, "latency_p95_ms: 25", "latency_p95_ms: -3")   # schema
    _mutate(repo_copy, W, "fleet: lab", "fleet: labb")                  # reference
    _mutate(repo_copy, W, "wearable_calibration.npz", "gone.npz")       # file
    monkeypatch.chdir(repo_copy)
    result = CliRunner().invoke(main, ["validate", W])
    assert result.exit_code == 3
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert [e.split(":")[3].strip() for e in errors] == [
        "spec.data.calibration", "spec.slo.latency_p95_ms", "spec.targets[0].fleet"], errors
    numbers = [int(e.split(":")[2]) for e in errors]
    assert numbers == sorted(numbers)


def test_a_copied_manifest_reports_its_own_mistakes_beside_the_duplicate_name(
        repo_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = repo_copy / "manifests" / "wearable-copy.yaml"
    copy.write_text((repo_copy / W).read_text().replace("fleet: lab", "fleet: lbb"))
    monkeypatch.chdir(repo_copy)
    result = CliRunner().invoke(main, ["validate"])
    assert result.exit_code == 3
    assert ":5: metadata.name: Deployment 'wearable-activity' is also defined in manifests/" in result.stderr
    assert "manifests/wearable-copy.yaml:33: spec.targets[0].fleet: no Fleet named 'lbb'; did you mean 'lab'?" in \
        result.stderr


def test_a_count_wave_that_adds_nothing_to_a_fleet_this_small_is_a_warning(repo_copy: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _mutate(repo_copy, W, "waves: [1, 50%, 100%]", "waves: [4, 50%, 100%]")  # meant for a larger fleet, maybe
    monkeypatch.chdir(repo_copy)
    result = CliRunner().invoke(main, ["validate", W])
    assert result.exit_code == 0, result.output
    assert "warning: manifests/wearable.yaml:35: spec.rollout.waves[1]: wave 2 adds no device: the waves before it " \
           "already take all 4 targeted device(s)" in result.stderr


def test_allow_empty_turns_a_wave_that_takes_nothing_into_a_warning(repo_copy: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _mutate(repo_copy, W, "waves: [1, 50%, 100%]", "waves: [{selector: 'ring=canry'}, 100%]")
    monkeypatch.chdir(repo_copy)
    assert CliRunner().invoke(main, ["validate", W]).exit_code == 3
    result = CliRunner().invoke(main, ["validate", W, "--allow-empty"])
    assert result.exit_code == 0, result.output
    assert "warning: manifests/wearable.yaml:35: spec.rollout.waves[0]: wave 1 selects no device" in result.stderr


def test_a_broken_unrelated_manifest_is_a_warning_for_commands_about_another_deployment(
        repo_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (repo_copy / "manifests" / "broken.yaml").write_text(
        "apiVersion: edgeops/v1\nkind: Deployment\nmetadata: {name: broken-one}\nspec:\n  targets: [{fleet: lab}]\n")
    monkeypatch.chdir(repo_copy)
    monkeypatch.setenv("EDGEOPS_LEDGER", str(tmp_path / "ledger.sqlite"))
    for command in (["history", "wearable-activity"], ["report", "wearable-activity", "-o", "json"]):
        result = CliRunner().invoke(main, command)
        assert "warning: manifests/broken.yaml:4: spec.model: required field is missing (and 2 more)" in result.stderr
        assert "not used here, so skipped" in result.stderr and "error: manifests/broken.yaml" not in result.stderr
    assert CliRunner().invoke(main, ["history", "wearable-activity"]).exit_code == 0
    broken = CliRunner().invoke(main, ["history", "broken-one"])   # the broken one itself: its errors, exit 3
    assert broken.exit_code == 3 and "error: manifests/broken.yaml:4: spec.model: required field" in broken.stderr
    whole = CliRunner().invoke(main, ["validate"])                  # the whole repository: an error
    assert whole.exit_code == 3 and "error: manifests/broken.yaml" in whole.stderr


@pytest.mark.parametrize("env, args, words", [
    ({"EDGEOPS_SIGNING_KEY": "/nonexistent/key"}, ["plan", W, "--root", "."], "EDGEOPS_SIGNING_KEY: /nonexistent/key is not a file"),
    ({"EDGEOPS_STATE": "mongodb://db/edgeops"}, ["history", "wearable-activity"], "EDGEOPS_STATE: mongodb://...: not a state backend"),
    ({"EDGEOPS_STATE": "postgresql://ops@db:five/edgeops"}, ["history", "wearable-activity"], "EDGEOPS_STATE: postgresql://ops@db:five/edgeops: the port is not a number"),
    ({"EDGEOPS_STATE": "sqlite:///{root}/manifests/wearable.yaml"}, ["history", "wearable-activity"], "EDGEOPS_STATE: {root}/manifests/wearable.yaml is not an edgeops ledger"),
    ({}, ["state", "migrate", "--to", "mongodb://db/x"], "--to: mongodb://...: not a state backend"),
    ({}, ["report", "wearable-activity", "--rollout", "99"], "--rollout: no rollout #99 of wearable-activity"),
    ({}, ["report", "wearable-activity", "--rollout", "-1"], "-1 is not in the range x>=1"),
], ids=["signing-key", "state-scheme", "state-port", "state-not-a-ledger", "migrate-to", "report-99", "report-negative"])
def test_environment_and_argument_errors_exit_3_and_name_the_variable_or_option(
        repo_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], args: list[str],
        words: str) -> None:
    monkeypatch.chdir(repo_copy)
    monkeypatch.setenv("EDGEOPS_LEDGER", str(tmp_path / "ledger.sqlite"))
    monkeypatch.setenv("EDGEOPS_SECRETS_DIR", str(tmp_path / "secrets"))
    if "EDGEOPS_SIGNING_KEY" in env:  # past the fleets' own trust files: only the variable is wrong
        _mutate(repo_copy, LAB, "  trust:\n    allowed_signers: ../../.edgeops/lab/allowed_signers\n"
                "    signing_key: lab/release_ed25519\n", "")
    for name, value in env.items():
        monkeypatch.setenv(name, value.replace("{root}", str(repo_copy.resolve())))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 3, result.output
    assert words.replace("{root}", str(repo_copy.resolve())) in result.stderr, result.stderr
    assert "//" + str(repo_copy.resolve()) not in result.stderr


def test_plan_with_every_device_unreachable_fails_and_a_selector_that_matches_nothing_is_an_error(
        repo_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _mutate(repo_copy, LAB, "  trust:\n    allowed_signers: ../../.edgeops/lab/allowed_signers\n"
            "    signing_key: lab/release_ed25519\n", "")
    _mutate(repo_copy, LAB, "connect_timeout_s: 5", "connect_timeout_s: 2\n    connect_retries: 0")
    for port, free in zip(range(22201, 22205), free_ports(4)):  # nothing listens: every device refuses
        _mutate(repo_copy, LAB, f"port: {port}", f"port: {free}")
    monkeypatch.chdir(repo_copy)
    monkeypatch.setenv("EDGEOPS_LEDGER", str(tmp_path / "ledger.sqlite"))
    monkeypatch.setenv("EDGEOPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEOPS_SECRETS_DIR", str(tmp_path / "secrets"))
    (tmp_path / "secrets" / "lab").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "secrets/lab/client_ed25519")],
                   check=True)
    typo = CliRunner().invoke(main, ["plan", W, "-l", "ring=canry"])
    assert typo.exit_code == 3 and "error: --selector: 'ring=canry' matches none of the 4 device(s)" in typo.stderr
    result = CliRunner().invoke(main, ["plan", W])
    assert result.exit_code == 1, result.output
    assert "every device of wearable-activity was unreachable: the plan checked nothing" in result.stderr
