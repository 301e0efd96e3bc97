"""Runtime configs rendered from templates: every profile, real onnxruntime, located template errors."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from edgeops.errors import RenderError
from edgeops.manifest.workspace import load_workspace
from edgeops.render import render_device
from edgeops.targets import TargetDevice, target_devices
from labkit.artifacts import agent_module, build_for
from labkit.repo import REPO

DEPLOYMENT_FOR = {"cpu": "wearable-activity", "gpu": "meter-digits", "tpu": "vehicle-assistant"}


def all_configs(root: Path):
    """Every device of every fleet, rendered with an example deployment that suits its accelerator."""
    ws = load_workspace(root)
    for fleet in ws.fleets.values():
        for device in fleet.obj.spec.devices:
            target = TargetDevice(fleet, device, ws.profiles[device.profile or fleet.obj.spec.profile])
            doc = ws.deployments[DEPLOYMENT_FOR[target.accelerator]]
            artifact = build_for(ws, doc.name, target.accelerator).artifact
            yield target, artifact, render_device(ws, doc, target, artifact.report["artifact"])


def test_every_profile_renders_a_valid_config(repo_copy: Path) -> None:
    seen_profiles = set()
    for target, artifact, config in all_configs(repo_copy):
        seen_profiles.add(target.profile.name)
        data = config.data
        assert data["schema"] == "edgeops.runtime/v1"
        assert data["model"]["sha256"] == artifact.model_sha256
        assert [p["name"] for p in data["execution_providers"]] == \
            [p.name for p in target.profile.obj.spec.execution_providers]
        if target.accelerator == "cpu":
            assert data["require_accelerator"] is False
        else:
            assert data["require_accelerator"] is True
            assert data["session_config_entries"]["session.disable_cpu_ep_fallback"] == "1"
    profiles_in_use = {p.stem for p in (REPO / "device_profiles").glob("*.yaml")}
    assert seen_profiles == profiles_in_use


def test_gpu_and_npu_configs_use_real_provider_option_names(repo_copy: Path) -> None:
    configs = {t.profile.name: c.data for t, _, c in all_configs(repo_copy)}
    trt, cuda = configs["jetson-orin"]["execution_providers"]
    assert {"trt_fp16_enable", "trt_int8_enable", "trt_engine_cache_enable", "trt_engine_cache_path",
            "trt_max_workspace_size"} <= set(trt["options"])
    assert {"device_id", "gpu_mem_limit", "cudnn_conv_algo_search", "enable_cuda_graph"} <= set(cuda["options"])
    qnn = configs["npu-edge"]["execution_providers"][0]
    assert qnn["name"] == "QNNExecutionProvider" and qnn["options"]["htp_performance_mode"] == "burst"


def test_cpu_configs_load_in_onnxruntime_with_their_options(repo_copy: Path, tmp_path: Path) -> None:
    agent = agent_module()
    loaded = 0
    for target, artifact, config in all_configs(repo_copy):
        if target.accelerator != "cpu":
            continue
        release = tmp_path / target.key.replace("/", "_")
        release.mkdir()
        (release / "model.onnx").write_bytes(artifact.model.read_bytes())
        options = agent._session_options(ort, config.data)
        assert options.intra_op_num_threads == target.profile.obj.spec.session.intra_op_num_threads
        session = agent.open_session(str(release), config.data)
        assert session.get_providers() == ["CPUExecutionProvider"]
        loaded += 1
    assert loaded >= 5


def _break_template(root: Path, old: str, new: str) -> None:
    path = root / "templates" / "cpu.json.j2"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _render_first_cpu(root: Path):
    ws = load_workspace(root)
    doc = ws.deployments["wearable-activity"]
    target = target_devices(ws, doc.name)[0]
    artifact = build_for(ws, doc.name, "cpu").artifact
    return render_device(ws, doc, target, artifact.report["artifact"])


def _line(root: Path, text: str, template: str = "cpu.json.j2") -> int:
    lines = (root / "templates" / template).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


@pytest.mark.parametrize("case", ["undefined", "syntax", "invalid-json", "schema", "sandbox"])
def test_template_errors_are_located(repo_copy: Path, case: str) -> None:
    if case == "undefined":
        _break_template(repo_copy, '"require_accelerator": false,', '"require_accelerator": {{ device.nmae | tojson }},')
        expected = f"templates/cpu.json.j2:{_line(repo_copy, 'device.nmae')}: "
        words = "has no attribute 'nmae'"
    elif case == "syntax":
        _break_template(repo_copy, '"require_accelerator": false,', '"require_accelerator": {% if %},')
        expected = f"templates/cpu.json.j2:{_line(repo_copy, '{% if %}')}: "
        words = "template syntax error"
    elif case == "invalid-json":
        _break_template(repo_copy, '"require_accelerator": false,', '"require_accelerator": false')
        expected, words = "templates/cpu.json.j2: ", "not valid JSON"
    elif case == "schema":
        _break_template(repo_copy, '"require_accelerator": false,', '"require_accelerator": "maybe",')
        expected, words = "templates/cpu.json.j2: require_accelerator: ", "does not match edgeops.runtime/v1"
    else:
        _break_template(repo_copy, '"require_accelerator": false,',
                        '"require_accelerator": {{ device.__class__.__mro__ | length > 0 }},')
        expected, words = "templates/cpu.json.j2:", "unsafe"
    with pytest.raises(RenderError) as caught:
        _render_first_cpu(repo_copy)
    line = caught.value.lines()[0]
    assert line.startswith(expected), line
    assert words in line


def test_nan_from_a_template_is_an_error_not_a_coercion(repo_copy: Path) -> None:
    _break_template(repo_copy, '"require_accelerator": false,', '"require_accelerator": false, "x": NaN,')
    with pytest.raises(RenderError, match="not valid JSON"):
        _render_first_cpu(repo_copy)


def test_render_is_deterministic(repo_copy: Path) -> None:
    assert _render_first_cpu(repo_copy).text == _render_first_cpu(repo_copy).text
    assert json.loads(_render_first_cpu(repo_copy).text)["device"] == "lab-01"


def test_devices_of_one_profile_share_the_config_their_fleet_wide_release_is_named_by(repo_copy: Path) -> None:
    by_profile: dict[str, set[str]] = {}
    texts: set[str] = set()
    for target, _, config in all_configs(repo_copy):
        assert "{device}" not in config.text and '"device": "{device}"' in config.generic_text
        assert f"\"{target.name}\"" not in config.generic_text
        by_profile.setdefault(target.profile.name, set()).add(config.generic_digest)
        texts.add(config.text)
    assert all(len(digests) == 1 for digests in by_profile.values())
    assert len(texts) > len(by_profile)  # while every device's own config differs


def test_a_decoder_for_a_gpu_profile_renders_fp16_and_cuda_for_onnxruntime_genai(repo_copy: Path) -> None:
    """The GPU path, rendered and checked here although no GPU runs it: the gpu recipe's fp16 artifact, the
    profile's providers in runtime.json, CUDA with its options in genai_config.json."""
    from edgeops.release import make_release

    (repo_copy / "manifests" / "fleets" / "orin-gateways.yaml").write_text(
        "apiVersion: edgeops/v1\nkind: Fleet\nmetadata: {name: orin-gateways}\nspec:\n  profile: jetson-orin\n"
        "  devices:\n    - {name: orin-01, host: 10.0.0.5}\n")
    manifest = repo_copy / "manifests" / "assistant-lm.yaml"
    manifest.write_text(manifest.read_text().replace("    - fleet: lab\n", "    - fleet: lab\n    - fleet: orin-gateways\n"))
    ws = load_workspace(repo_copy)
    doc = ws.deployments["assistant-lm"]
    target = next(t for t in target_devices(ws, "assistant-lm") if t.name == "orin-01")
    artifact = build_for(ws, "assistant-lm", "gpu").artifact
    assert artifact.report["stages"][-1]["options"]["mode"] == "fp16"
    config = render_device(ws, doc, target, artifact.report["artifact"])
    data = config.data
    assert [p["name"] for p in data["execution_providers"]] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert data["require_accelerator"] is True and data["generation"]["max_length"] == 256
    genai = json.loads(next(f.content for f in make_release(doc.name, artifact, config).files
                            if f.name == "genai_config.json"))
    providers = genai["model"]["decoder"]["session_options"]["provider_options"]
    assert providers == [{"cuda": {"device_id": "0", "gpu_mem_limit": "2147483648",
                                   "cudnn_conv_algo_search": "HEURISTIC", "enable_cuda_graph": "0"}}]
