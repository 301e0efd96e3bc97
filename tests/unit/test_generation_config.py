"""What a decoder's devices are told: runtime.json's generation section, genai_config.json, the manifest rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgeops.generative.config import genai_config, generation_section, kv_cache_bytes
from edgeops.manifest.models import DeploymentSpec, GenerationRuntime, GenerationSpec

LAYOUT = {"layers": 4, "kv_heads": 2, "head_dim": 64, "hidden": 256, "heads": 4, "vocab": 259,
          "kv_dtype": "float32", "bos": 256, "eos": 257, "pad": 258}


def test_the_kv_cache_is_sized_from_the_layout_and_the_longest_sequence() -> None:
    assert kv_cache_bytes(LAYOUT, 256) == 2 * 4 * 2 * 64 * 256 * 4   # keys and values, every layer, fp32
    assert kv_cache_bytes({**LAYOUT, "kv_dtype": "float16"}, 256) == 2 * 4 * 2 * 64 * 256 * 2


def _runtime(providers: list[dict], threads: int = 2) -> dict:
    spec = GenerationSpec(tokenizer="t.json", prompts="p.txt", max_length=512)
    return {"deployment": "lm", "model": {"file": "model.onnx"}, "execution_providers": providers,
            "session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1},
            "generation": generation_section(spec, GenerationRuntime(runtime="onnxruntime-genai"), LAYOUT)}


def test_genai_config_carries_the_rendered_threads_lengths_and_layout() -> None:
    config = genai_config(_runtime([{"name": "CPUExecutionProvider", "options": {}}]))
    decoder = config["model"]["decoder"]
    assert config["model"]["context_length"] == 512 and config["search"]["max_length"] == 512
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (4, 2, 64)
    assert decoder["session_options"]["intra_op_num_threads"] == 2
    assert decoder["session_options"]["provider_options"] == []   # the CPU is onnxruntime-genai's default
    assert config["model"]["eos_token_id"] == 257 and config["search"]["do_sample"] is False


def test_genai_config_for_a_gpu_profile_names_cuda_with_its_options() -> None:
    config = genai_config(_runtime([{"name": "CUDAExecutionProvider", "options": {"device_id": 0}},
                                    {"name": "CPUExecutionProvider", "options": {}}]))
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {"device_id": "0"}}]


BASE = {"model": {"path": "m.onnx", "task": "text-generation"}, "data": {"calibration": "c.txt",
                                                                         "evaluation": "e.txt"},
        "generation": {"tokenizer": "t.json", "prompts": "p.txt"}, "quality": {"metric": "agreement", "max_drop": 5},
        "targets": [{"fleet": "lab"}]}


def test_a_text_generation_deployment_validates() -> None:
    spec = DeploymentSpec.model_validate(BASE)
    assert spec.generation is not None and spec.model.inputs == []


@pytest.mark.parametrize("change,message", [
    ({"generation": None}, "needs a generation: section"),
    ({"quality": {"metric": "accuracy", "max_drop": 1}}, "does not fit model.task text-generation"),
    ({"recipe": [{"quantize": {"mode": "static"}}]}, "static quantization is not offered for text-generation"),
    ({"generation": {"tokenizer": "t.json", "prompts": "p.txt", "prompt_tokens": 200, "decode_tokens": 100,
                     "max_length": 256}}, "exceed max_length 256"),
    ({"model": {"path": "m.onnx"}}, "declare the model's inputs and outputs"),
])
def test_what_does_not_fit_a_decoder_is_refused(change: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DeploymentSpec.model_validate({k: v for k, v in {**BASE, **change}.items() if v is not None})
