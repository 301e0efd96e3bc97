"""Pydantic models of the three kinds users write: Deployment, Fleet, DeviceProfile.

These only describe shape and local rules (types, ranges, one-of). Rules that
need other files (a fleet that must exist, a model file that must be ONNX)
live in ``edgeops.manifest.workspace``.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgeops.selectors import LabelSelector, parse_selector

API_VERSION = "edgeops/v1"
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
PERCENT_PATTERN = re.compile(r"^(\d+(?:\.\d+)?)%$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # YAML reads 1e400 as infinity


Name = Annotated[str, Field(pattern=NAME_PATTERN, description="lower-case letters, digits and '-'")]
PositiveFloat = Annotated[float, Field(gt=0)]


class Metadata(Strict):
    name: Name
    labels: dict[str, str] = {}
    description: str = ""


# ---------------------------------------------------------------- counts and percentages


def parse_count(value: int | str) -> tuple[str, float]:
    """``3`` -> ("count", 3); ``"25%"`` -> ("percent", 25)."""
    if isinstance(value, bool):
        raise ValueError("must be a device count or a percentage such as '25%'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must be >= 0 (got {value})")
        return ("count", value)
    match = PERCENT_PATTERN.match(str(value).strip())
    if not match:
        raise ValueError(f"must be a device count or a percentage such as '25%' (got {value!r})")
    percent = float(match.group(1))
    if not 0 <= percent <= 100:
        raise ValueError(f"percentage must be between 0% and 100% (got {value})")
    return ("percent", percent)


def _check_count(value: int | str) -> int | str:
    parse_count(value)
    return value


CountOrPercent = Annotated[Union[int, str], Field(description="a device count (3) or a percentage ('25%')")]


# directories the system owns: edgeops deletes old releases under its root, so the root is never one of them
SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media", "/mnt",
               "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/bin", "/usr/lib",
               "/usr/local", "/usr/sbin", "/usr/share", "/var", "/var/lib", "/var/log", "/var/tmp")
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys", "/usr/bin",
                "/usr/lib", "/usr/sbin")


def _absolute_path(value: str) -> str:
    if any(c in value for c in "\0\n\r") or not value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"must be an absolute path without '..' or control characters (got {value!r})")
    path = "/" + "/".join(p for p in value.split("/") if p and p != ".")
    if path in SYSTEM_DIRS or any(path.startswith(tree + "/") for tree in SYSTEM_TREES):
        raise ValueError(f"{path} is a system directory: edgeops owns its root and deletes old releases in it; "
                         "use a directory of its own such as /opt/edgeops or /var/lib/edgeops")
    return path


# ---------------------------------------------------------------- Deployment


class TensorSpec(Strict):
    name: str
    shape: list[Annotated[int, Field(ge=1)] | str] = Field(
        description="dimensions; a string names a symbolic dimension such as 'batch'")
    dtype: Literal["float32", "float16", "int64", "int32", "uint8", "int8", "bool"] = "float32"


class ModelSource(Strict):
    path: str = Field(description="ONNX file, relative to the manifest")
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        default=None, description="pin the exact model bytes; validation fails on a mismatch")
    task: Literal["predict", "text-generation"] = Field(
        default="predict", description="predict: one forward pass per request (classifiers, encoders); "
                                       "text-generation: a decoder step with a KV cache in onnxruntime-genai's "
                                       "layout (input_ids, attention_mask, position_ids, past_key_values.N.key/value "
                                       "-> logits, present.N.key/value), measured in time to first token and "
                                       "tokens per second")
    inputs: list[TensorSpec] = Field(default=[], description="required for predict; text-generation reads the "
                                                             "decoder's inputs from the model")
    outputs: list[TensorSpec] = Field(default=[], description="required for predict")

    @model_validator(mode="after")
    def _io_declared(self) -> "ModelSource":
        if self.task == "predict" and (not self.inputs or not self.outputs):
            raise ValueError("declare the model's inputs and outputs (at least one each)")
        return self


class GenerationSpec(Strict):
    """How a text-generation deployment is measured: on the build host and on every device."""

    tokenizer: str = Field(description="the tokenizer file shipped with the release (relative to the manifest); "
                                       "a byte-level one is {kind: bytes, vocab_size, bos, eos, pad}")
    prompts: str = Field(description="golden prompts, one per line (relative): the fp32 model's greedy "
                                     "continuations of them are what agreement compares")
    prompt_tokens: Annotated[int, Field(ge=1, le=8192)] = Field(
        default=64, description="the prompt length time to first token is measured with")
    decode_tokens: Annotated[int, Field(ge=4, le=4096)] = Field(
        default=32, description="tokens decoded per measured generation (tokens/s is over these)")
    golden_tokens: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=32, description="greedy tokens per golden prompt that agreement compares")
    max_length: Annotated[int, Field(ge=8, le=131072)] = Field(
        default=256, description="the longest sequence (prompt + generated) devices serve: sizes the KV cache")
    head_dim: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="the attention head size, for models whose cache inputs leave it symbolic "
                                  "(onnxruntime-genai's builder output: its genai_config.json's head_size)")
    max_perplexity_increase_pct: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="besides quality: a stage whose perplexity on the evaluation text is this much "
                                  "(percent) above the original's fails the build")

    @model_validator(mode="after")
    def _fits(self) -> "GenerationSpec":
        if self.prompt_tokens + self.decode_tokens > self.max_length:
            raise ValueError(f"prompt_tokens + decode_tokens ({self.prompt_tokens + self.decode_tokens}) exceed "
                             f"max_length {self.max_length}")
        return self


class DataSpec(Strict):
    calibration: str = Field(description=".npz with one array per model input (first axis: samples); "
                                         "text-generation: a UTF-8 text file")
    training: str | None = Field(default=None, description="transfer set for distill steps (.npz like calibration, "
                                                           "optional 'labels'); default: the calibration data")
    evaluation: str = Field(description=".npz with one array per model input, plus 'labels' for accuracy; "
                                        "text-generation: held-out text, one passage per line (perplexity)")
    golden_samples: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        default=None, description="evaluation samples shipped with each release for the on-device check; default: "
                                  "for accuracy/top1_agreement enough that one differing sample is at most half of "
                                  "quality.max_drop (up to 1000), else 32")


class QuantizeOptions(Strict):
    mode: Literal["static", "dynamic", "weight_only", "fp16", "auto"]
    per_channel: bool = True
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    quant_format: Literal["qdq", "qoperator"] = Field(
        default="qdq", description="static: QDQ (QuantizeLinear/DequantizeLinear around float ops: what NPU "
                                   "toolchains read) or operator-oriented (QLinearConv, QLinearMatMul, ...)")
    percentile: Annotated[float, Field(gt=90, le=100)] = 99.999
    activation_type: Literal["uint8", "int8"] = Field(
        default="uint8", description="uint8 (U8S8) runs faster on x86 for MatMul-heavy models")
    weight_type: Literal["int8", "uint8"] = "int8"
    symmetric_activations: bool = False
    op_types: list[str] | None = Field(default=None, description="restrict to these op types; default all")
    exclude_op_types: list[str] | None = Field(
        default=None, description="static/dynamic: op types kept in float (e.g. [Mul, Sigmoid, HardSwish] for "
                                  "squeeze-excite blocks without fast int8 kernels)")
    exclude_nodes: list[str] | None = Field(
        default=None, description="static/dynamic: node names kept in float (the most sensitive layers)")
    search: bool = Field(
        default=True, description="auto (cpu): besides each mode as given, search the options that matter in the "
                                  "winning family (static: per-channel or per-tensor, compute ops only, depthwise "
                                  "convolutions in float, operator-oriented format, percentile calibration; "
                                  "dynamic: without pre-processing, activation smoothing), "
                                  "then mixed precision if nothing met the goal")
    calibration_samples: Annotated[int, Field(ge=1)] = 128
    preprocess: bool = Field(
        default=True, description="static/dynamic/weight_only: run onnxruntime's quantization pre-processing "
                                  "(shape inference, graph optimisation) first; auto also tries dynamic without "
                                  "it (faster on some encoders); NPU targets always pre-process; text-generation: "
                                  "only when set (a decoder's symbolic shapes defeat it)")
    smooth: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="static/dynamic: SmoothQuant strength alpha: move per-channel activation outliers "
                                  "of MatMul inputs into the weights before quantizing (exact in float); auto "
                                  "tries 0.5 when dynamic int8 is the winning family")
    split_outliers: Annotated[float, Field(ge=2, le=1000)] | None = Field(
        default=None, description="dynamic: the input channels of a MatMul whose calibration maximum exceeds this "
                                  "many times the median channel's (at most one in 16) are multiplied in float "
                                  "beside the int8 MatMul (LLM.int8()'s decomposition: exact in float, the int8 "
                                  "range then covers the ordinary channels); auto tries 6 for tight goals before "
                                  "keeping whole MatMuls float")
    rotate: Literal[16, 32, 64, 128] | None = Field(
        default=None, description="dynamic: rotate each MatMul input by block Hadamard matrices of this many "
                                  "channels at run time, the inverse folded into the weights (exact in float; an "
                                  "outlier channel is spread over its block, so the int8 range fits the others); "
                                  "auto tries 64 for tight goals before keeping whole MatMuls float")
    rounding: Literal["nearest", "gptq"] = Field(
        default="nearest", description="static/dynamic/weight_only: how MatMul weights get their integers. "
                                       "nearest: onnxruntime's; gptq: the rows of each weight rounded in turn, "
                                       "each row's error carried to the rows not yet rounded as the calibration "
                                       "activations weigh it (GPTQ: same scales, same graph, same speed); auto "
                                       "tries it for weight-only weights that miss the goal")
    bits: Literal[4, 8] = Field(default=4, description="weight_only: bits per MatMul weight (MatMulNBits)")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        default=4, description="weight_only: MatMulNBits compute type; 4 computes on int8 activations (fastest on "
                               "x86), 0 leaves it to the runtime, 1-3 compute in fp32/fp16/bf16")
    embeddings: bool = Field(
        default=False, description="weight_only with 4 bits: also quantize embedding lookups (Gather on a constant "
                                   "table) to GatherBlockQuantized; the model is converted to opset 21 first")
    block_size: Literal[16, 32, 64, 128, 256] = 32
    candidates: list[Literal["static", "dynamic", "weight_only", "fp16"]] | None = Field(
        default=None, description="auto: modes to try; default every mode that applies to the target")
    objective: Literal["latency", "size", "energy"] | None = Field(
        default=None, description="auto: among the candidates that meet the quality goal, keep the fastest "
                                  "(latency, the default), the smallest file (size), or the least energy per "
                                  "inference (energy: the build host has no power reading, so its latency stands "
                                  "in, which on one CPU core follows energy; the report says so)")
    decide_on: Literal["host", "device"] | None = Field(
        default=None, description="auto: where the choice is made. host (the default): on the build host. device: "
                                  "the build keeps its finalists (the best candidates meeting the goal, and the "
                                  "input), and apply measures them interleaved on one device of every hardware "
                                  "class before rolling out what was fastest there (devices that pull, and "
                                  "classes with no reachable device, keep the host's choice)")
    finalists: Annotated[int, Field(ge=1, le=5)] | None = Field(
        default=None, description="auto with decide_on: device: how many candidates meeting the goal go to the "
                                  "device besides the input (default 3)")
    min_speedup: Annotated[float, Field(ge=1)] | None = Field(
        default=None, description="auto: keep the model unquantized unless the fastest candidate that meets the "
                                  "quality goal is at least this much faster on the build host (default 1.1; "
                                  "not for gpu targets, which the host cannot time)")

    @model_validator(mode="after")
    def _auto_only(self) -> "QuantizeOptions":
        if self.op_types and self.exclude_op_types and set(self.op_types) & set(self.exclude_op_types):
            raise ValueError("an op type cannot be both in op_types and exclude_op_types")
        for name in ("candidates", "min_speedup", "objective", "decide_on", "finalists"):
            if getattr(self, name) is not None and self.mode != "auto":
                raise ValueError(f"{name} only applies to mode: auto")
        if self.finalists is not None and self.decide_on != "device":
            raise ValueError("finalists only applies with decide_on: device")
        if self.decide_on == "device" and self.objective == "size":
            raise ValueError("decide_on: device measures speed on the device; with objective: size the smallest "
                             "file wins wherever it is measured: leave decide_on out")
        if self.embeddings and (self.bits != 4 or self.mode not in ("weight_only", "auto")):
            raise ValueError("embeddings only applies to weight_only with bits: 4 (GatherBlockQuantized is 4-bit)")
        if self.smooth is not None and self.mode not in ("static", "dynamic", "auto"):
            raise ValueError(f"smooth only applies to mode: static or dynamic (it moves activation outliers into "
                             f"weights before int8 activations; {self.mode} keeps activations in float)")
        for name in ("exclude_nodes", "exclude_op_types"):
            if getattr(self, name) and self.mode in ("weight_only", "fp16"):
                raise ValueError(f"{name} only applies to mode: static, dynamic or auto")
        if self.split_outliers is not None and self.mode not in ("dynamic", "auto"):
            raise ValueError("split_outliers only applies to mode: dynamic (static ranges are calibrated per tensor "
                             "ahead of time; use smooth there)")
        if self.rotate is not None and self.mode not in ("dynamic", "auto"):
            raise ValueError("rotate only applies to mode: dynamic (static ranges are calibrated per tensor ahead "
                             "of time; use smooth there)")
        if self.rounding == "gptq" and self.mode == "fp16":
            raise ValueError("rounding: gptq only applies to integer weights (static, dynamic, weight_only, auto)")
        if self.quant_format == "qoperator" and self.mode not in ("static", "auto"):
            raise ValueError("quant_format: qoperator only applies to mode: static (dynamic is operator-oriented "
                             "already)")
        return self


class PruneOptions(Strict):
    method: Literal["magnitude", "structured"]
    sparsity: Annotated[float, Field(gt=0, lt=1)] = Field(
        description="magnitude: fraction of weights zeroed; structured: fraction of units removed")
    min_elements: Annotated[int, Field(ge=0)] = Field(
        default=4096, description="magnitude: tensors smaller than this are kept dense")


class ClusterOptions(Strict):
    """Weight sharing: each large weight tensor keeps ``centroids`` distinct values (k-means), stored as uint8
    indices plus a codebook; onnxruntime rebuilds the dense weight once, when it loads the model."""

    centroids: Annotated[int, Field(ge=2, le=256)] = Field(
        default=16, description="distinct values per tensor (per: tensor) or per output channel (per: channel); "
                                "16 compresses the indices to about 4 bits each under zstd")
    per: Literal["tensor", "channel"] = Field(
        default="tensor", description="one codebook per tensor, or one per output channel (closer, a larger "
                                      "codebook)")
    min_elements: Annotated[int, Field(ge=0)] = Field(
        default=4096, description="tensors smaller than this are kept as they are")
    keep_zeros: bool = Field(default=True, description="zeros (a prune step's) stay exactly zero: one centroid "
                                                       "is pinned at 0")
    iterations: Annotated[int, Field(ge=1, le=200)] = 25


class StudentSpec(Strict):
    family: Literal["mlp", "cnn1d", "cnn2d"] | None = None
    width: Annotated[int, Field(ge=1, le=4096)] = 32
    depth: Annotated[int, Field(ge=1, le=16)] = 2
    onnx: str | None = Field(default=None, description="a user-supplied student ONNX model (relative path)")
    factory: str | None = Field(default=None, description="'module:function' returning a torch.nn.Module for "
                                                         "(input shape, output size)")
    previous_step: bool = Field(default=False, description="fine-tune the model the previous step produced "
                                                          "(e.g. a pruned one) against the original teacher")

    @model_validator(mode="after")
    def _exactly_one(self) -> "StudentSpec":
        given = [k for k in ("family", "onnx", "factory") if getattr(self, k) is not None]
        given += ["previous_step"] if self.previous_step else []
        if len(given) != 1:
            raise ValueError("set exactly one of family, onnx, factory, previous_step")
        return self


class DistillOptions(Strict):
    student: StudentSpec
    temperature: PositiveFloat = 4.0
    soft_weight: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.7, description="weight of soft targets; 1 - soft_weight goes to hard labels")
    epochs: Annotated[int, Field(ge=1, le=10000)] = 30
    time_budget_s: PositiveFloat | None = None
    learning_rate: PositiveFloat = 0.003
    batch_size: Annotated[int, Field(ge=1)] = 64
    seed: int = 0
    early_stopping_patience: Annotated[int, Field(ge=1)] | None = 5


STEP_KINDS = ("quantize", "prune", "cluster", "distill")


class RecipeStep(Strict):
    """One step of a recipe: exactly one of quantize, prune, cluster, distill."""

    quantize: QuantizeOptions | None = None
    prune: PruneOptions | None = None
    cluster: ClusterOptions | None = None
    distill: DistillOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) != 1:
            raise ValueError("each recipe step has exactly one of quantize, prune, cluster, distill")
        if isinstance(data, dict) and next(iter(data.values())) is None:
            raise ValueError(f"{next(iter(data))}: is empty; write its options under it (e.g. quantize: "
                             "{mode: auto})")
        return data

    @property
    def kind(self) -> str:
        return next(k for k in STEP_KINDS if getattr(self, k) is not None)

    @property
    def options(self) -> QuantizeOptions | PruneOptions | ClusterOptions | DistillOptions:
        chosen = self.quantize or self.prune or self.cluster or self.distill
        assert chosen is not None  # the validator requires exactly one
        return chosen


GENERATIVE_METRICS = ("agreement", "perplexity")


class QualityGoal(Strict):
    metric: Literal["accuracy", "top1_agreement", "cosine", "max_abs_error", "agreement", "perplexity"] = Field(
        description="agreement (text-generation): % of greedy tokens equal to the original model's over the "
                    "golden prompts; perplexity (text-generation): on the evaluation text, lower is better")
    output: str | None = Field(default=None, description="model output the metric reads; default the first")
    max_drop: Annotated[float, Field(ge=0)] = Field(
        description="accuracy/top1_agreement/agreement: points (absolute) or percent of the baseline "
                    "(relative); cosine: drop from 1.0; max_abs_error: the largest error allowed; perplexity: "
                    "the increase allowed (relative: percent)")
    drop: Literal["absolute", "relative"] = "absolute"
    enforce: bool = Field(
        default=True, description="false: measure and report every stage against the goal, warn when it is missed, "
                                  "but do not fail the build (exploring a recipe); devices still check the golden set")

    @model_validator(mode="after")
    def _relative_needs_baseline(self) -> "QualityGoal":
        if self.metric == "max_abs_error" and self.drop == "relative":
            raise ValueError("max_abs_error has no baseline to be relative to; use drop: absolute")
        return self


class SLO(Strict):
    latency_p95_ms: PositiveFloat | None = Field(default=None, description="text-generation: per decoded token")
    energy_per_inference_mj: PositiveFloat | None = Field(default=None,
                                                          description="text-generation: per decoded token")
    average_power_mw: PositiveFloat | None = None
    peak_memory_mb: PositiveFloat | None = None
    ttft_ms: PositiveFloat | None = Field(default=None, description="text-generation: median time to first token "
                                                                    "for a generation.prompt_tokens prompt")
    tokens_per_s: PositiveFloat | None = Field(default=None, description="text-generation: the least median "
                                                                         "decode speed")


class Selector(Strict):
    match_labels: dict[str, str] = {}


class Target(Strict):
    fleet: Name
    selector: Selector = Selector()


class Timeouts(Strict):
    """How long each stage may take per device; connecting is the fleet's ``ssh.connect_timeout_s``."""

    push_s: PositiveFloat = Field(default=300, description="sending a release's files")
    verify_s: PositiveFloat = Field(default=300, description="one on-device measurement (doubled for each retry)")
    switch_s: PositiveFloat = Field(default=30, description="switching to the new release on the device")


class Regression(Strict):
    latency_p50_pct: Annotated[float, Field(ge=0)] = Field(
        default=10, description="fail when the new release's median latency is worse than the previous one's "
                                "by more than this (the stable signal)")
    latency_p95_pct: Annotated[float, Field(ge=0)] = Field(
        default=10, description="fail when the new release's p95 latency is worse by more than this (the tail)")
    energy_pct: Annotated[float, Field(ge=0)] = Field(
        default=10, description="fail when the new release's energy per inference is worse than the previous "
                                "one's by more than this (only where the profile reads a power sensor)")
    tokens_per_s_pct: Annotated[float, Field(ge=0, lt=100)] = Field(
        default=10, description="text-generation: fail when the new release decodes more than this much slower "
                                "(median time per token) than the previous one")
    ttft_pct: Annotated[float, Field(ge=0)] = Field(
        default=15, description="text-generation: fail when the new release's median time to first token is worse "
                                "by more than this")
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    quality_drop: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="plan refuses (exit 4) a release whose quality on the repository's evaluation "
                                  "data is lower than the running release's by more than this, in quality.max_drop's "
                                  "unit (default: quality.max_drop); --accept-quality-drop goes on")


class Verification(Strict):
    runs: Annotated[int, Field(ge=20, le=100000)] = Field(
        default=400, description="measured runs per release on the device (interleaved with the previous)")
    block: Annotated[int, Field(ge=1, le=1000)] = Field(default=10, description="runs per A/B block")
    retries: Annotated[int, Field(ge=0, le=5)] = Field(
        default=2, description="on_inconclusive: retry measures again up to this many times, pooled with what was "
                               "measured; a first Failed is always confirmed by one more measurement")
    budget_s: PositiveFloat | None = Field(
        default=60, description="device seconds an Inconclusive may spend measuring again: each new look takes as "
                                "many runs as the interval's width says would decide it, within what is left; "
                                "null: twice the runs each time")


class WaveSelector(Strict):
    """A wave of exactly the devices a label selector picks (that earlier waves did not take)."""

    selector: str = Field(description="labels as kubectl -l writes them: ring=canary,site!=lab,hw in (x86,arm)")

    @field_validator("selector")
    @classmethod
    def _parses(cls, value: str) -> str:
        parse_selector(value)
        return value

    @property
    def parsed(self) -> LabelSelector:
        return parse_selector(self.selector)


Wave = Union[WaveSelector, CountOrPercent]


def _default_waves() -> list[Wave]:
    return [1, "25%", "100%"]


class RolloutPolicy(Strict):
    waves: list[Wave] = Field(default_factory=lambda: _default_waves(), min_length=1,
                              description="cumulative device counts or percentages, or {selector: ...} waves")
    canary_per_hardware_class: bool = True
    max_failed_devices: CountOrPercent = 0
    max_unreachable_devices: CountOrPercent = "10%"
    bake_time_s: Annotated[float, Field(ge=0)] = 0
    timeouts: Timeouts = Timeouts()
    regression: Regression = Regression()
    verification: Verification = Verification()
    on_inconclusive: Literal["retry", "pause", "rollback"] = "retry"
    on_failure: Literal["rollback", "pause"] = "rollback"
    parallelism: Annotated[int, Field(ge=1, le=256)] = 4

    @field_validator("waves")
    @classmethod
    def _waves(cls, waves: list[Wave]) -> list[Wave]:
        previous: tuple[str, float] | None = None
        for wave in waves:
            if isinstance(wave, WaveSelector):
                continue
            kind, amount = parse_count(wave)
            if amount == 0:
                raise ValueError(f"a wave of {wave!r} would deploy to no device")
            if previous and previous[0] == kind and amount <= previous[1]:
                raise ValueError(f"waves are cumulative and must grow: {wave!r} after "
                                 f"{previous[1]:g}{'%' if kind == 'percent' else ''} adds no device")
            previous = (kind, amount)
        return waves

    @field_validator("max_failed_devices", "max_unreachable_devices")
    @classmethod
    def _budget(cls, value: int | str) -> int | str:
        return _check_count(value)


class AdaptSampling(Strict):
    fraction: Annotated[float, Field(gt=0, le=1)] = Field(default=1.0, description="share of the eligible devices "
                                                                                    "asked in each round")
    min_devices: Annotated[int, Field(ge=1)] = Field(default=2, description="fewer updates than this by the "
                                                                            "deadline: the round is void")


class AdaptOutliers(Strict):
    max_norm_ratio: Annotated[float, Field(gt=1)] = Field(
        default=6.0, description="an update longer than this many times the round's median length is excluded")
    min_cosine: Annotated[float, Field(ge=-1, le=1)] = Field(
        default=-0.8, description="an update whose cosine to the others' median is below this is excluded (devices "
                                  "with different classes point apart honestly: keep it low for non-IID data)")


class AdaptPrivacy(Strict):
    noise_multiplier: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="Gaussian noise on the aggregate, in units of clip_norm per device (DP-FedAvg); "
                                 "0: no noise and no privacy claim")
    delta: Annotated[float, Field(gt=0, lt=0.1)] = Field(default=1e-5, description="the δ of the (ε, δ) reported")
    max_epsilon: PositiveFloat | None = Field(default=None, description="no round starts that would spend more")


def _relative_path(value: str) -> str:
    if value.startswith("/") or ".." in value.split("/") or "\n" in value or "\0" in value or not value.strip("/"):
        raise ValueError(f"must be a path relative to the device root, without '..' (got {value!r})")
    return value.strip("/")


class AdaptSpec(Strict):
    """Federated adaptation: devices train the classification head on their own samples; only clipped updates
    leave them, the controller aggregates, and a better head becomes a release through the gate."""

    train: Literal["head"] = Field(default="head", description="head: the Gemm or MatMul(+Add) that makes the "
                                                               "quality output from the features before it")
    tensors: list[str] | None = Field(default=None, min_length=2, max_length=2,
                                      description="[weight, bias]: the head's initializers, when it is not found")
    data: str | None = Field(default=None, description="where each device's application writes labelled .npz "
                                                       "samples, relative to the device root (default "
                                                       "data/<deployment>)")
    rounds: Annotated[int, Field(ge=1, le=1000)] = Field(default=10, description="rounds per `edgeops adapt`")
    devices_per_round: AdaptSampling = AdaptSampling()
    local_epochs: Annotated[int, Field(ge=1, le=100)] = 5
    learning_rate: PositiveFloat = 0.05
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    clip_norm: PositiveFloat = Field(default=1.0, description="the longest update a device sends (L2 over the "
                                                              "trained tensors); the controller clips again")
    aggregation: Literal["fedavg", "fedprox", "trimmed_mean", "median"] = "fedavg"
    proximal_mu: Annotated[float, Field(ge=0)] = Field(default=0.01, description="fedprox: the pull towards the "
                                                                                  "round's starting tensors")
    trim_fraction: Annotated[float, Field(ge=0, lt=0.5)] = Field(
        default=0.2, description="trimmed_mean: share of the largest and of the smallest values dropped per "
                                 "coordinate")
    outliers: AdaptOutliers = AdaptOutliers()
    privacy: AdaptPrivacy = AdaptPrivacy()
    min_improvement: Annotated[float, Field(ge=0)] = Field(
        default=0.5, description="points of accuracy on spec.data.evaluation a round's head must gain over the "
                                 "released one to become a release")
    round_deadline_s: PositiveFloat = Field(default=120, description="updates later than this are not waited for")
    validation_fraction: Annotated[float, Field(ge=0, le=0.5)] = Field(
        default=0.2, description="share of each device's samples kept for its local validation")
    personalize: bool = Field(default=False, description="in a round whose head is released, a device whose own "
                                                         "trained head beats the head it was sent on its held-out "
                                                         "samples by min_improvement keeps its own: a release of its "
                                                         "own, verified like any")
    every_s: PositiveFloat | None = Field(default=None, description="`edgeops reconcile` runs `rounds` rounds this "
                                                                    "often (seconds) while the fleet is in sync; "
                                                                    "null: only `edgeops adapt` runs them")
    seed: int = 0

    _data = field_validator("data")(lambda cls, v: v if v is None else _relative_path(v))

    def data_dir(self, deployment: str) -> str:
        return self.data or f"data/{deployment}"


class DeploymentSpec(Strict):
    model: ModelSource
    data: DataSpec
    generation: GenerationSpec | None = Field(default=None, description="text-generation: how it is measured")
    recipe: list[RecipeStep] = []
    recipe_for: dict[Literal["cpu", "gpu", "tpu"], list[RecipeStep]] = Field(
        default={}, description="a different recipe for targets with this accelerator")
    quality: QualityGoal
    slo: SLO = SLO()
    targets: list[Target] = Field(min_length=1)
    rollout: RolloutPolicy = RolloutPolicy()
    adapt: AdaptSpec | None = Field(default=None, description="federated adaptation of the head on the devices' "
                                                              "own samples (docs/federated.md)")

    @model_validator(mode="after")
    def _task_fits(self) -> "DeploymentSpec":
        generative = self.model.task == "text-generation"
        if generative and self.generation is None:
            raise ValueError("model.task text-generation needs a generation: section (tokenizer, prompts)")
        if not generative and self.generation is not None:
            raise ValueError("generation: applies to model.task: text-generation only")
        if generative != (self.quality.metric in GENERATIVE_METRICS):
            wanted = "agreement or perplexity" if generative else "accuracy, top1_agreement, cosine or max_abs_error"
            raise ValueError(f"quality.metric {self.quality.metric} does not fit model.task {self.model.task}: "
                             f"use {wanted}")
        if generative:
            for steps in [self.recipe, *self.recipe_for.values()]:
                for step in steps:
                    if step.quantize and step.quantize.mode == "static":
                        raise ValueError("static quantization is not offered for text-generation (a decoder's "
                                         "activations change with every position); use weight_only, dynamic, "
                                         "fp16 or auto")
                    if step.distill:
                        raise ValueError("distill steps are not offered for text-generation yet")
        if self.adapt is not None and (generative or self.quality.metric != "accuracy"):
            raise ValueError("adapt: trains a classification head: it needs model.task predict and quality.metric "
                             "accuracy (labelled evaluation data)")
        deciding = any(step.quantize is not None and step.quantize.decide_on == "device"
                       for steps in [self.recipe, *self.recipe_for.values()] for step in steps)
        if deciding and self.adapt is not None:
            raise ValueError("adapt: learns a head on the artifact git builds; quantize.decide_on: device chooses "
                             "among several: use one or the other")
        if deciding and generative:
            raise ValueError("quantize.decide_on: device is not offered for text-generation yet (its finalists "
                             "would be measured per token; untested): decoders decide on the build host")
        return self

    def recipe_for_accelerator(self, accelerator: str) -> list[RecipeStep]:
        for name, steps in self.recipe_for.items():
            if name == accelerator:
                return steps
        return self.recipe


class Deployment(Strict):
    """A model, how to compress it, what it must achieve, and where it goes."""

    apiVersion: Literal["edgeops/v1"]
    kind: Literal["Deployment"]
    metadata: Metadata
    spec: DeploymentSpec


# ---------------------------------------------------------------- Fleet


class SSHSettings(Strict):
    user: str = "root"
    identity_file: str | None = Field(default=None, description="the deploy key: its name in the controller's secrets "
                                                                "directory (EDGEOPS_SECRETS_DIR), e.g. lab/client_ed25519")
    use_agent: bool = False
    known_hosts: str | None = Field(default=None, description="relative to the fleet file; default ~/.ssh/known_hosts")
    trust_on_first_use: bool = Field(
        default=False, description="record unknown host keys instead of refusing them (not recommended)")
    jump_host: str | None = Field(default=None, description="user@host:port of a bastion")
    use_ssh_config: bool = True
    connect_timeout_s: PositiveFloat = 10
    command_timeout_s: PositiveFloat = 300
    keepalive_s: Annotated[float, Field(ge=0)] = 15
    stall_timeout_s: PositiveFloat = Field(
        default=60, description="an upload that moves nothing for this long has lost its link: the device is "
                                "Unreachable, and the next apply resumes the upload from what arrived")
    connect_retries: Annotated[int, Field(ge=0, le=10)] = 2


class LabSettings(Strict):
    cpus: str | None = Field(default=None, pattern=r"^[0-9]+(,[0-9]+)*$",
                             description="CPUs the lab device's sshd is pinned to, e.g. '0' or '0,1'")
    power_mw: PositiveFloat | None = Field(default=None, description="what the lab device's simulated power "
                                                                     "sensor reads while busy")
    cpu: Annotated[float, Field(gt=0, le=256)] | None = Field(
        default=None, description="the lab device's CPU budget in cores (0.25: a quarter of one core), enforced by "
                                  "a cgroup on its sshd and everything it starts")
    memory_mb: Annotated[int, Field(ge=16)] | None = Field(
        default=None, description="the lab device's memory limit (cgroup): a model or bench that needs more is "
                                  "killed there, as on a small device")
    link_mbit: Annotated[float, Field(gt=0, le=10000)] | None = Field(
        default=None, description="the lab device lives in a network namespace of its own, reached over a veth "
                                  "pair held to this many Mbit/s each way (tc tbf); `edgeops lab link DEVICE "
                                  "down|up` cuts and heals it (SSH fleets)")


class DeviceEntry(Strict):
    name: Name = Field(description="lower-case letters, digits and '-' (it becomes a path, a host label and a metric "
                                   "label)")
    host: str | None = Field(default=None, min_length=1, description="how SSH reaches it (required unless the "
                                                                    "fleet pulls)")
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    labels: dict[str, str] = {}
    profile: Name | None = Field(default=None, description="overrides the fleet's profile for this device")
    root: str | None = Field(default=None, description="overrides the profile's device.root for this device")
    lab: LabSettings = Field(default_factory=lambda: LabSettings(), description="lab-only settings (edgeops lab up)")


    @field_validator("root")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return None if value is None else _absolute_path(value)


class Trust(Strict):
    """Signed releases: devices enrolled with ``allowed_signers`` run only releases signed by one of its keys."""

    allowed_signers: str = Field(description="OpenSSH allowed-signers file (principal release@edgeops), relative "
                                             "to the fleet file, inside the repository; `edgeops enroll` installs it")
    signing_key: str | None = Field(default=None, description="the private release key that signs (OpenSSH): its "
                                                              "name in the secrets directory, like ssh.identity_file; "
                                                              "EDGEOPS_SIGNING_KEY overrides it")
    release_ttl_s: PositiveFloat = Field(default=7 * 24 * 3600, description="signed metadata expires after this: "
                                                                            "devices refuse to start it later")


class PullSettings(Strict):
    """Devices that pull: an agent daemon on each device follows its desired state on an MQTT broker and fetches
    release blobs by digest from an OCI registry; no inbound connection to the device is needed."""

    broker: str = Field(pattern=r"^mqtts?://[^/:]+(:[0-9]+)?/?$",
                        description="mqtt://host:port, or mqtts:// for TLS (any MQTT 3.1.1/5 broker)")
    registry: str = Field(pattern=r"^https?://[^/]+/?$", description="the OCI registry's base URL")
    repository: str | None = Field(default=None, pattern=r"^[a-z0-9]+([._/-][a-z0-9]+)*$",
                                   description="where releases are pushed; default edgeops/<fleet name>")
    topic_prefix: str = Field(default="edgeops", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
    username: str = Field(default="edgeops-controller", description="the controller's broker user")
    password_file: str | None = Field(default=None, description="the controller's broker password: its name in the "
                                                                "secrets directory (EDGEOPS_BROKER_PASSWORD "
                                                                "overrides it)")
    ca_file: str | None = Field(default=None, description="CA bundle for mqtts:// and https://")
    insecure: bool = Field(default=False, description="allow the controller's broker password over plain mqtt:// to "
                                                      "a host other than this machine (never in an untrusted plan)")
    report_deadline_s: PositiveFloat = Field(default=900, description="a device that has not reported its verdict "
                                                                      "this long after its desired state was "
                                                                      "published counts as unreachable")
    heartbeat_s: PositiveFloat = Field(default=30, description="how often devices say they are alive; a device "
                                                              "silent for 3 heartbeats shows as stale")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: traffic that never leaves this machine."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def plaintext_host(url: str) -> str | None:
    """The host a plain (not TLS) mqtt:// or http:// URL sends to, unless it is this machine."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("mqtt", "http"):
        return None
    host = parsed.hostname or ""
    return None if is_loopback(host) else host


class FleetSpec(Strict):
    profile: Name
    ssh: SSHSettings = SSHSettings()
    pull: PullSettings | None = Field(default=None, description="devices pull their releases (MQTT + OCI registry) instead of the controller pushing over SSH")
    trust: Trust | None = Field(default=None, description="sign every release to these devices; devices verify "
                                                          "before they run it")
    devices: list[DeviceEntry] = Field(min_length=1)
    max_parallel: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="at most this many of this fleet's devices change at once, whatever a "
                                  "deployment's rollout.parallelism: devices behind one shared slow link (a site's "
                                  "uplink) get it one or two at a time instead of ten uploads sharing it")
    lab: LabSettings = Field(default_factory=lambda: LabSettings(),
                             description="lab-only defaults for every device (a device's own lab: overrides them)")

    @model_validator(mode="after")
    def _reachable(self) -> FleetSpec:
        if self.pull is None:
            missing = [d.name for d in self.devices if d.host is None]
            if missing:
                raise ValueError(f"device(s) {', '.join(missing)} have no host: an SSH fleet reaches every device "
                                 "by host (or give the fleet a pull: section, and its devices pull)")
        return self



class Fleet(Strict):
    """Devices, how to reach them, and the profile they share."""

    apiVersion: Literal["edgeops/v1"]
    kind: Literal["Fleet"]
    metadata: Metadata
    spec: FleetSpec


# ---------------------------------------------------------------- DeviceProfile


class ExecutionProvider(Strict):
    name: Literal[
        "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
        "QNNExecutionProvider", "OpenVINOExecutionProvider", "CoreMLExecutionProvider",
        "XnnpackExecutionProvider", "ROCMExecutionProvider", "NnapiExecutionProvider",
    ]
    options: dict[str, str | int | float | bool] = {}


class SessionSettings(Strict):
    intra_op_num_threads: Annotated[int, Field(ge=0)] = 1
    inter_op_num_threads: Annotated[int, Field(ge=0)] = 1
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    enable_cpu_mem_arena: bool = True
    enable_mem_pattern: bool = True
    config_entries: dict[str, str] = Field(
        default={}, description="onnxruntime session config entries, e.g. session.intra_op.allow_spinning: '0'")


class Limits(Strict):
    max_model_bytes: Annotated[int, Field(ge=1)] | None = None
    max_memory_mb: PositiveFloat | None = Field(
        default=None, description="a release whose peak memory on the device is above this fails verification")


class PowerNone(Strict):
    source: Literal["none"]


class PowerRapl(Strict):
    source: Literal["rapl"]
    boundary: Literal["package"] = "package"
    path: str = Field(default="/sys/class/powercap/intel-rapl:0",
                      description="powercap zone directory with energy_uj and max_energy_range_uj")
    sysfs_root: str = "/"


class PowerHwmon(Strict):
    source: Literal["hwmon"]
    boundary: Literal["package", "module", "board"]
    path: str = Field(description="a power*_input (uW) or energy*_input (uJ) file")
    sysfs_root: str = "/"


class PowerIna3221(Strict):
    source: Literal["ina3221"]
    boundary: Literal["module", "board"] = "module"
    path: str = Field(description="directory holding in_power<N>_input or in<N>_input + curr<N>_input")
    channel: Annotated[int, Field(ge=0, le=3)] = 1
    sysfs_root: str = "/"


class PowerCommand(Strict):
    source: Literal["command"]
    boundary: Literal["package", "module", "board"]
    argv: list[str] = Field(min_length=1, description="prints milliwatts on stdout")


class PowerEstimate(Strict):
    source: Literal["estimate"]
    boundary: Literal["estimate"] = "estimate"
    active_mw_per_core: PositiveFloat = Field(description="extra power per fully busy core")
    idle_mw: Annotated[float, Field(ge=0)] = 0


PowerSource = Annotated[
    Union[PowerNone, PowerRapl, PowerHwmon, PowerIna3221, PowerCommand, PowerEstimate],
    Field(discriminator="source"),
]


class PowerSettings(Strict):
    sensor: PowerSource = PowerNone(source="none")
    interval_ms: Annotated[float, Field(gt=0)] = 50


class OnDevice(Strict):
    python: str = Field(default="python3", description="interpreter that runs the agent (needs numpy and "
                        "onnxruntime); prefer an absolute path: a bare name is looked up on the PATH the device's "
                        "login shell sets; '{device}' and '{root}' are filled in")
    root: str = Field(default="/opt/edgeops", description="absolute directory edgeops owns on the device; "
                      "'{device}' is replaced by the device name")
    keep_releases: Annotated[int, Field(ge=2, le=100)] = 3
    disk_budget_mb: PositiveFloat | None = None
    trial_window_s: Annotated[float, Field(ge=5, le=86400)] = Field(
        default=1800, description="after a switch the device reverts to its committed release by itself unless "
                                  "the controller commits within this time; longer than a verification with retries")

    @field_validator("root")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return _absolute_path(value)


class GenerationRuntime(Strict):
    runtime: Literal["onnxruntime", "onnxruntime-genai"] = Field(
        default="onnxruntime", description="what generates on these devices: onnxruntime-genai (its own "
                                           "generation loop, genai_config.json; the agent measures with it and "
                                           "preflight refuses a device without it), or the agent's own greedy loop "
                                           "over a plain onnxruntime session")
    version: str | None = Field(default=None, description="onnxruntime-genai: the version devices must have "
                                                          "(default: the controller's)")


class DeviceProfileSpec(Strict):
    hardware_class: Name = Field(description="devices of one class share a canary (a name: it labels metrics)")
    accelerator: Literal["cpu", "gpu", "tpu"]
    execution_providers: list[ExecutionProvider] = Field(min_length=1)
    session: SessionSettings = SessionSettings()
    limits: Limits = Limits()
    power: PowerSettings = PowerSettings()
    device: OnDevice = OnDevice()
    template: str = Field(description="file under templates/ that renders the runtime config")
    generation: GenerationRuntime = Field(default_factory=lambda: GenerationRuntime(),
                                          description="text-generation deployments on these devices")

    @field_validator("execution_providers")
    @classmethod
    def _unique_providers(cls, providers: list[ExecutionProvider]) -> list[ExecutionProvider]:
        names = [p.name for p in providers]
        if len(set(names)) != len(names):
            raise ValueError("an execution provider is listed twice")
        return providers


ACCELERATOR_PROVIDERS = {
    "gpu": {"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider"},
    "tpu": {"QNNExecutionProvider", "OpenVINOExecutionProvider", "NnapiExecutionProvider", "CoreMLExecutionProvider"},
}


class DeviceProfile(Strict):
    """What a class of devices can run and how to talk to its runtime."""

    apiVersion: Literal["edgeops/v1"]
    kind: Literal["DeviceProfile"]
    metadata: Metadata
    spec: DeviceProfileSpec


KINDS: dict[str, type[Strict]] = {"Deployment": Deployment, "Fleet": Fleet, "DeviceProfile": DeviceProfile}
