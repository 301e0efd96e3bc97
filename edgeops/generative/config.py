"""What a device's generation runtime is told: the ``generation`` section of runtime.json, and the
``genai_config.json`` onnxruntime-genai reads, derived from it (pure)."""

from __future__ import annotations

from typing import Any

from edgeops.manifest.models import GenerationRuntime, GenerationSpec

TOKENIZER_FILE = "tokenizer.json"
GENAI_CONFIG_FILE = "genai_config.json"


def kv_cache_bytes(layout: dict[str, Any], max_length: int) -> int:
    """Keys and values of every layer at ``max_length`` positions, batch 1."""
    width = 2 if layout["kv_dtype"] == "float16" else 4
    return int(2 * layout["layers"] * layout["kv_heads"] * layout["head_dim"] * max_length * width)


def generation_section(spec: GenerationSpec, runtime: GenerationRuntime, layout: dict[str, Any]) -> dict[str, Any]:
    """runtime.json's ``generation``: how to generate on this device and how the agent measures it."""
    return {"runtime": runtime.runtime, "tokenizer": TOKENIZER_FILE, "prompt_tokens": spec.prompt_tokens,
            "decode_tokens": spec.decode_tokens, "max_length": spec.max_length,
            "bos_token_id": layout["bos"], "eos_token_id": layout["eos"], "pad_token_id": layout["pad"],
            "vocab_size": layout["vocab"], "layers": layout["layers"], "heads": layout["heads"],
            "kv_heads": layout["kv_heads"], "head_dim": layout["head_dim"], "hidden": layout["hidden"],
            "kv_dtype": layout["kv_dtype"], "kv_cache_bytes": kv_cache_bytes(layout, spec.max_length),
            "position_ids": layout.get("position_ids", True)}


# onnxruntime-genai's names for the providers it can run a decoder on (TensorRT is not one: a profile's
# TensorrtExecutionProvider is skipped and the CUDA that follows it runs the decoder)
PROVIDER_NAMES = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml", "QNNExecutionProvider": "qnn",
                  "OpenVINOExecutionProvider": "OpenVINO", "CoreMLExecutionProvider": "coreml",
                  "WebGpuExecutionProvider": "webgpu"}


def _option(value: Any) -> str:
    """A provider option as onnxruntime takes it (the agent writes booleans the same way)."""
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


def genai_config(runtime: dict[str, Any]) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for a rendered runtime config with a ``generation`` section: the
    same providers (CPU is onnxruntime-genai's default, never listed), threads and lengths."""
    generation = runtime["generation"]
    session = runtime["session_options"]
    providers = [{PROVIDER_NAMES[p["name"]]: {str(k): _option(v) for k, v in p.get("options", {}).items()}}
                 for p in runtime["execution_providers"] if p["name"] in PROVIDER_NAMES]
    return {
        "model": {
            "type": "llama", "bos_token_id": generation["bos_token_id"], "eos_token_id": generation["eos_token_id"],
            "pad_token_id": generation["pad_token_id"], "vocab_size": generation["vocab_size"],
            "context_length": generation["max_length"],
            "decoder": {
                "filename": runtime["model"]["file"], "hidden_size": generation["hidden"],
                "num_attention_heads": generation["heads"], "num_key_value_heads": generation["kv_heads"],
                "num_hidden_layers": generation["layers"], "head_size": generation["head_dim"],
                "session_options": {"intra_op_num_threads": session["intra_op_num_threads"],
                                    "inter_op_num_threads": session["inter_op_num_threads"],
                                    "log_id": f"edgeops-{runtime['deployment']}",
                                    "provider_options": providers},
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           **({"position_ids": "position_ids"} if generation.get("position_ids", True) else {}),
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"max_length": generation["max_length"], "do_sample": False, "num_beams": 1,
                   "past_present_share_buffer": False},
    }
