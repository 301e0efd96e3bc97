"""The quantize step: static (QDQ), dynamic, weight-only int4, fp16, and auto.

Quality is never assumed from a mode's name: every candidate is measured, and
``auto`` keeps the fastest one on the host that meets the quality goal.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeops.compress.steps import Candidate, Step, StepContext, StepResult
from edgeops.errors import BuildError
from edgeops.manifest.models import QuantizeOptions

DEFAULT_MIN_SPEEDUP = 1.1
AUTO_CANDIDATES = {"cpu": ["static", "dynamic", "weight_only"], "gpu": ["fp16", "static"], "tpu": ["static"]}


def _quant() -> Any:  # imported lazily: onnxruntime.quantization is slow to import (and has no type stubs)
    import onnxruntime.quantization as quantization

    return quantization


def preprocess(src: Path, dst: Path, notes: list[str]) -> Path:
    """Shape inference and graph clean-up before quantizing; falls back when symbolic inference fails."""
    # symbolic shape inference writes its failures to the working directory: run it in a child
    # process that starts in ours (no chdir in this threaded program)
    script = ("import sys\nfrom onnxruntime.quantization.shape_inference import quant_pre_process\n"
              "quant_pre_process(sys.argv[1], sys.argv[2])")
    done = subprocess.run([sys.executable, "-c", script, str(src), str(dst)], cwd=dst.parent,
                          capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return dst
    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
    notes.append(f"symbolic shape inference failed ({last[:80]}); pre-processed with skip_symbolic_shape")
    try:
        _quant().quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as second:  # noqa: BLE001 - onnxruntime raises bare Exceptions here
        notes.append(f"pre-processing skipped ({str(second).splitlines()[0][:80]})")
        shutil.copyfile(src, dst)
    return dst


def fix_batch_dimension(src: Path, dst: Path) -> list[str]:
    """NPU/TPU runtimes want static shapes: pin every symbolic first dimension to 1."""
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    model = onnx.load(str(src))
    params = {i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input
              if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].dim_param}
    for param in params:
        make_dim_param_fixed(model.graph, param, 1)
    onnx.save(model, str(dst))
    return [f"symbolic dimension '{p}' fixed to 1 (static shapes for the NPU)" for p in sorted(params)]


class CalibrationReader:
    """Feeds calibration samples one at a time to onnxruntime's calibrator."""

    def __init__(self, inputs: dict[str, np.ndarray], count: int) -> None:
        self.samples = [{k: v[i:i + 1] for k, v in inputs.items()} for i in range(min(count, len(next(iter(inputs.values())))))]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.samples):
            return None
        self.position += 1
        return self.samples[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def has_matmul_weights(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    constants = {i.name for i in model.graph.initializer if len(i.dims) == 2}
    return any(n.op_type == "MatMul" and n.input[1] in constants for n in model.graph.node)


COMPUTE_OPS = ["Conv", "MatMul", "Gemm"]  # the ops whose int8 kernels pay; the rest mostly adds Q/DQ pairs


def quantizable_op_types(path: Path, options: QuantizeOptions, static: bool) -> list[str] | None:
    """``op_types_to_quantize`` for onnxruntime: the options' list (default every type onnxruntime quantizes in
    this model) without ``exclude_op_types``; None leaves onnxruntime's default."""
    if not options.exclude_op_types:
        return options.op_types
    registry = _quant().registry
    known = set(registry.QLinearOpsRegistry) | (set(registry.QDQRegistry) if static else set())
    present = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    return sorted(set(options.op_types or (known & present)) - set(options.exclude_op_types))


def depthwise_convs(path: Path) -> list[str]:
    """Names of the depthwise convolutions (group > 1): int8 often has no fast kernel for them."""
    found = []
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1 and node.name:
            found.append(node.name)
    return found


def quantize_static(src: Path, dst: Path, options: QuantizeOptions, ctx: StepContext, notes: list[str]) -> None:
    q = _quant()
    method = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
              "percentile": q.CalibrationMethod.Percentile}[options.calibration_method]
    qtype = {"uint8": q.QuantType.QUInt8, "int8": q.QuantType.QInt8}
    extra = {"ActivationSymmetric": options.symmetric_activations, "CalibPercentile": options.percentile}
    if ctx.accelerator == "tpu" and options.op_types:
        notes.append("op_types is set: ops outside it stay float, which an NPU may reject")
    reader = CalibrationReader(ctx.calibration.inputs, options.calibration_samples)
    op_types = quantizable_op_types(src, options, static=True)

    def run(extra_options: dict[str, Any]) -> None:
        reader.rewind()
        q.quantize_static(str(src), str(dst), reader, quant_format=q.QuantFormat.QDQ,
                          op_types_to_quantize=op_types, nodes_to_exclude=options.exclude_nodes,
                          per_channel=options.per_channel,
                          activation_type=qtype[options.activation_type],
                          weight_type=qtype[options.weight_type], calibrate_method=method,
                          extra_options=extra_options)

    try:
        run(extra)
    except Exception as exc:  # noqa: BLE001
        # per-channel on some exporters' graphs trips the int32-bias weight adjustment
        notes.append(f"static quantization retried without bias weight adjustment ({str(exc)[:60]})")
        run({**extra, "QDQDisableWeightAdjustForInt32Bias": True})
    notes.append(f"static QDQ int8: {options.calibration_method} calibration on "
                 f"{len(reader.samples)} samples, activations {options.activation_type}, "
                 f"{'per-channel' if options.per_channel else 'per-tensor'} weights{_kept_float(options, op_types)}")


def _kept_float(options: QuantizeOptions, op_types: list[str] | None) -> str:
    parts = [f"only {', '.join(op_types)}"] if op_types and options.exclude_op_types else []
    parts += [f"{len(options.exclude_nodes)} node(s) kept float"] if options.exclude_nodes else []
    return f" ({'; '.join(parts)})" if parts else ""


def quantize_dynamic(src: Path, dst: Path, options: QuantizeOptions, notes: list[str]) -> None:
    q = _quant()
    qtype = {"uint8": q.QuantType.QUInt8, "int8": q.QuantType.QInt8}[options.weight_type]
    q.quantize_dynamic(str(src), str(dst), op_types_to_quantize=quantizable_op_types(src, options, static=False),
                       nodes_to_exclude=options.exclude_nodes, per_channel=options.per_channel, weight_type=qtype)
    notes.append(f"dynamic int8: {'per-channel' if options.per_channel else 'per-tensor'} weights, "
                 "activations quantized at run time")


def quantize_weight_only(src: Path, dst: Path, options: QuantizeOptions, notes: list[str]) -> None:
    if not has_matmul_weights(src):
        raise BuildError("weight_only quantization needs MatMul nodes with constant 2-D weights; "
                         "this model has none", hint="use static or dynamic for conv nets")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=options.bits, block_size=options.block_size,
                                     is_symmetric=True, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    notes.append(f"int{options.bits} weight-only MatMulNBits, block {options.block_size}, accuracy_level 4")


def quantize_fp16(src: Path, dst: Path, notes: list[str]) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    notes.append("fp16 weights and activations, float32 inputs/outputs; host latency is the CPU's, not the GPU's")


def prepared_for(mode: str, src: Path, ctx: StepContext, notes: list[str]) -> Path:
    """The pre-processed input of a mode, made once per step (candidates of one mode share it)."""
    path = ctx.path(f"pre-{mode}")
    if not path.exists():
        preprocess(src, path, notes)
        if ctx.accelerator == "tpu":
            notes.extend(fix_batch_dimension(path, path))
    return path


def run_mode(mode: str, src: Path, options: QuantizeOptions, ctx: StepContext, notes: list[str],
             label: str = "") -> Path:
    """Quantize ``src`` with one concrete mode; returns the output path."""
    dst = ctx.path(f"quantize-{label or mode}")
    if mode == "fp16":
        quantize_fp16(src, dst, notes)
        return dst
    prepared = prepared_for(mode, src, ctx, notes)
    if mode == "static":
        quantize_static(prepared, dst, options, ctx, notes)
    elif mode == "dynamic":
        quantize_dynamic(prepared, dst, options, notes)
    elif mode == "weight_only":
        quantize_weight_only(prepared, dst, options, notes)
    else:
        raise AssertionError(mode)
    return dst


class Quantize(Step[QuantizeOptions]):
    """Static, dynamic, weight-only or fp16 quantization, or ``auto``: try several, keep the best that passes."""

    kind = "quantize"

    def run(self, model: Path, ctx: StepContext) -> StepResult:
        options = self.options
        if options.mode != "auto":
            notes: list[str] = []
            ctx.progress(f"quantize {options.mode}")
            return StepResult(run_mode(options.mode, model, options, ctx, notes), notes)
        return _auto(model, options, ctx)


def static_variants(options: QuantizeOptions, prepared: Path) -> list[tuple[str, QuantizeOptions]]:
    """The static int8 options worth trying besides those given: the other weight granularity; only the
    compute ops (no Q/DQ pairs around activations, squeeze-excite gates and residual adds); and that
    with depthwise convolutions kept float. Each is (label, options)."""
    flipped = "per-tensor" if options.per_channel else "per-channel"
    variants = [(f"static {flipped}", options.model_copy(update={"per_channel": not options.per_channel}))]
    if options.op_types is None:
        compute = options.model_copy(update={"op_types": COMPUTE_OPS, "exclude_op_types": None})
        variants.append(("static compute-ops", compute))
        depthwise = depthwise_convs(prepared)
        if depthwise:
            kept = sorted({*depthwise, *(options.exclude_nodes or [])})
            variants.append(("static compute-ops depthwise-float", compute.model_copy(update={"exclude_nodes": kept})))
    return variants


def quantized_nodes(path: Path) -> list[str]:
    """Names of the nodes a QDQ model runs on dequantized inputs (what static int8 changed)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    return [n.name for n in graph.node if n.name and n.input and n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and made_by.get(n.input[0]) == "DequantizeLinear"]


def sensitivity_order(prepared: Path, quantized: Path, nodes: list[str], inputs: dict[str, np.ndarray],
                      samples: int = 16) -> list[str]:
    """``nodes`` most harmful first: the relative error (quantized against float) each adds between its
    input and its output, on the first ``samples`` evaluation samples. One run of each model."""
    import onnxruntime as ort

    graph = onnx.load(str(prepared), load_external_data=False).graph
    by_name = {n.name: n for n in graph.node}
    graph_inputs = {i.name for i in graph.input}
    tensors = sorted({t for name in nodes for t in (by_name[name].input[0], by_name[name].output[0])} - graph_inputs)

    def run(path: Path) -> dict[str, np.ndarray]:
        model = onnx.load(str(path))
        present = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in present)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feed = {name: array[:samples] for name, array in inputs.items()}
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))

    exact, approximate = run(prepared), run(quantized)

    def error(tensor: str) -> float:
        if tensor in graph_inputs or tensor not in exact:
            return 0.0
        reference = exact[tensor].astype(np.float64)
        return float(np.linalg.norm(approximate[tensor] - reference) / (np.linalg.norm(reference) + 1e-12))

    added = {name: error(by_name[name].output[0]) - error(by_name[name].input[0]) for name in nodes}
    return sorted(nodes, key=lambda name: -added[name])


def mixed_precision(src: Path, ctx: StepContext, found: dict[str, tuple[Path, list[str], QuantizeOptions]],
                    base: Candidate) -> list[Candidate]:
    """Static int8 missed the goal: from its closest variant, keep the most sensitive quantized nodes float,
    1, 2, 4, ... of them, until a configuration meets the goal (NNCF's accuracy-aware idea, by measured
    sensitivity); the fastest passing candidate wins as usual."""
    quantized, _, options = found[base.mode]
    prepared = ctx.path("pre-static")
    if not prepared.exists():
        return []
    nodes = quantized_nodes(quantized)
    if len(nodes) < 2:
        return []
    ctx.progress(f"quantize auto: measuring the sensitivity of {len(nodes)} quantized node(s)")
    order = sensitivity_order(prepared, quantized, nodes, ctx.evaluator.data.inputs)
    tried: list[Candidate] = []
    count = 1
    while count < len(nodes):
        kept = sorted({*order[:count], *(options.exclude_nodes or [])})
        variant = options.model_copy(update={"exclude_nodes": kept})
        candidate = _try(f"{base.mode} mixed {count}-float", "static", src, variant, ctx, found)
        tried.append(candidate)
        if candidate.measurement is not None and candidate.measurement.quality.passed:
            found[candidate.mode][1].append(f"kept float by sensitivity: {', '.join(order[:count])}")
            break
        count *= 2
    return tried


def _try(label: str, mode: str, src: Path, options: QuantizeOptions, ctx: StepContext,
         found: dict[str, tuple[Path, list[str], QuantizeOptions]]) -> Candidate:
    """One candidate: quantize, check quality, and time it only if the quality goal is met (early stop)."""
    ctx.progress(f"quantize auto: trying {label}")
    notes: list[str] = []
    try:
        path = run_mode(mode, src, options, ctx, notes, label=label.replace(" ", "-"))
        measurement = ctx.evaluator.measure(path, notes, latency=False)
        if measurement.quality.passed:
            measurement = ctx.evaluator.with_latency(measurement, path)
    except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is recorded, not fatal
        return Candidate(label, None, error=str(exc).splitlines()[0][:200])
    found[label] = (path, notes, options)
    return Candidate(label, measurement)


def _auto(src: Path, options: QuantizeOptions, ctx: StepContext) -> StepResult:
    modes = list(options.candidates or AUTO_CANDIDATES[ctx.accelerator])
    if "weight_only" in modes and not has_matmul_weights(src):
        modes.remove("weight_only")
    found: dict[str, tuple[Path, list[str], QuantizeOptions]] = {}
    candidates = [_try(mode, mode, src, options, ctx, found) for mode in modes]
    if options.search and "static" in modes and ctx.accelerator == "cpu":
        prepared = ctx.path("pre-static")
        if prepared.exists():
            candidates += [_try(label, "static", src, variant, ctx, found)
                           for label, variant in static_variants(options, prepared)]
    passing = [c for c in candidates if c.measurement and c.measurement.quality.passed]
    statics = [c for c in candidates if c.mode.startswith("static") and c.measurement is not None]
    if options.search and not passing and statics and ctx.accelerator == "cpu":
        closest = min(statics, key=lambda c: c.measurement.quality.drop)  # type: ignore[union-attr]
        candidates += mixed_precision(src, ctx, found, closest)
        passing = [c for c in candidates if c.measurement and c.measurement.quality.passed]
    if not passing:
        summary = "; ".join(f"{c.mode}: " + (c.error or c.measurement.quality.describe()) for c in candidates)  # type: ignore[union-attr]
        return StepResult(src, [f"auto: no candidate met the quality goal ({summary})"], candidates)

    def rank(c: Candidate) -> tuple[float, float]:
        m = c.measurement
        assert m is not None
        if ctx.accelerator == "gpu":  # the host CPU cannot time a GPU: prefer the given order, then size
            return (modes.index(c.mode), m.size_bytes)
        return (m.latency_p50_ms, m.size_bytes)

    best = min(passing, key=rank)
    if ctx.accelerator != "gpu" and ctx.before is not None and best.measurement is not None:
        needed = options.min_speedup or DEFAULT_MIN_SPEEDUP
        speedup = ctx.before.latency_p50_ms / best.measurement.latency_p50_ms
        if speedup < needed:
            kept = Candidate("keep", ctx.before, chosen=True)
            warning = (f"auto kept the model unquantized: the fastest candidate that meets the goal, {best.mode}, "
                       f"is {speedup:.2f}x the input's speed (p50, host CPU, 1 thread), below min_speedup "
                       f"{needed:g}")
            return StepResult(src, [warning], [*candidates, kept], measurement=ctx.before, warnings=[warning])
    best.chosen = True
    why = "fastest on the host" if ctx.accelerator != "gpu" else "first passing in GPU preference order"
    rejected = ", ".join(f"{c.mode} ({_short(c)})" for c in candidates if not c.chosen)
    path, notes, _ = found[best.mode]
    return StepResult(path, [f"auto chose {best.mode}: {why} among candidates meeting the goal; rejected: "
                             f"{rejected or 'none'}", *notes], candidates, measurement=best.measurement)


def _short(c: Candidate) -> str:
    if c.error:
        return f"failed: {c.error[:60]}"
    m = c.measurement
    assert m is not None
    verdict = "passes" if m.quality.passed else "misses goal (not timed)"
    latency = "" if math.isnan(m.latency_p50_ms) else f", p50 {m.latency_p50_ms:.3f} ms"
    return f"{m.quality.describe()} {verdict}{latency}"
