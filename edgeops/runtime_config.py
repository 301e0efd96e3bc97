"""The runtime config a template renders for one device: its schema and its digest.

Both the on-device agent and the user's own inference service load this JSON;
the agent reads it as a plain dict (it never imports edgeops), so the field
names here are the contract.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RUNTIME_SCHEMA = "edgeops.runtime/v1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Tensor(_Strict):
    name: str
    shape: list[int | str]
    dtype: str


class ModelRef(_Strict):
    file: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[Tensor]
    outputs: list[Tensor]


class Provider(_Strict):
    name: str
    options: dict[str, str | int | float | bool] = {}


class SessionOptions(_Strict):
    intra_op_num_threads: int = Field(ge=0)
    inter_op_num_threads: int = Field(ge=0)
    graph_optimization_level: Literal["ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"]
    execution_mode: Literal["ORT_SEQUENTIAL", "ORT_PARALLEL"]
    enable_cpu_mem_arena: bool
    enable_mem_pattern: bool


class Golden(_Strict):
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    metric: Literal["accuracy", "top1_agreement", "cosine", "max_abs_error", "agreement", "perplexity"]
    output: str


class Power(_Strict):
    source: Literal["none", "rapl", "hwmon", "ina3221", "command", "estimate"]
    boundary: str | None = None
    interval_ms: float = Field(gt=0)
    path: str | None = None
    channel: int | None = None
    argv: list[str] | None = None
    sysfs_root: str | None = None
    active_mw_per_core: float | None = None
    idle_mw: float | None = None


class Generation(_Strict):
    """Text generation: how the device's generation runtime is set up and how the agent measures it."""

    runtime: Literal["onnxruntime", "onnxruntime-genai"]
    tokenizer: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    prompt_tokens: int = Field(ge=1)
    decode_tokens: int = Field(ge=1)
    max_length: int = Field(ge=2)
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    vocab_size: int = Field(ge=1)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    hidden: int = Field(ge=1)
    kv_dtype: Literal["float32", "float16"]
    kv_cache_bytes: int = Field(ge=0, description="the KV cache at max_length, batch 1")
    position_ids: bool = Field(default=True, description="the model takes position_ids (else it derives them)")


class RuntimeConfig(_Strict):
    schema_: Literal["edgeops.runtime/v1"] = Field(alias="schema")
    deployment: str
    device: str
    accelerator: Literal["cpu", "gpu", "tpu"]
    model: ModelRef
    execution_providers: list[Provider] = Field(min_length=1)
    require_accelerator: bool = Field(description="fail when any node runs on the CPU provider")
    session_options: SessionOptions
    session_config_entries: dict[str, str]
    golden: Golden | None = None
    power: Power
    generation: Generation | None = None


def canonical_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
