"""The quantize step: static (QDQ), dynamic, weight-only int4, fp16, and auto.

Quality is never assumed from a mode's name: every candidate is measured, and
``auto`` keeps the fastest one on the host that meets the quality goal.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from edgeops.compress import ahead
from edgeops.compress.ahead import Ahead, Job
from edgeops.compress.data import Dataset
from edgeops.compress.evaluate import probe_session, run_all
from edgeops.compress.fast_weights import vectorized
from edgeops.compress.hostload import Watch, watching
from edgeops.compress.steps import Candidate, QuantizeContext, Step, StepContext, StepResult
from edgeops.errors import BuildError
from edgeops.manifest.models import QuantizeOptions

DEFAULT_MIN_SPEEDUP = 1.1
AUTO_CANDIDATES = {"cpu": ["static", "dynamic", "weight_only"], "gpu": ["fp16", "static"], "tpu": ["static"]}


def _quant() -> Any:  # imported lazily: onnxruntime.quantization is slow to import (and has no type stubs)
    import onnxruntime.quantization as quantization

    return quantization


class Preprocessing:
    """onnxruntime's quantization pre-processing (symbolic shape inference, graph clean-up) in a child process,
    which may start early (while the original model is evaluated) and is awaited where its output is needed."""

    # symbolic shape inference writes its failures to the working directory: the child starts in the
    # build's scratch directory (no chdir in this threaded program)
    SCRIPT = ("import sys\nfrom onnxruntime.quantization.shape_inference import quant_pre_process\n"
              "quant_pre_process(sys.argv[1], sys.argv[2])")

    def __init__(self, src: Path, dst: Path) -> None:
        self.src, self.dst = src, dst
        self.process = subprocess.Popen([sys.executable, "-c", self.SCRIPT, str(src), str(dst)], cwd=dst.parent,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.stderr: str | None = None

    def wait(self) -> None:
        if self.stderr is None:  # communicate, not wait: a long traceback must not fill the pipe and block
            self.stderr = self.process.communicate()[1]

    def result(self, notes: list[str]) -> Path:
        """The pre-processed model; falls back to ``skip_symbolic_shape`` when symbolic inference fails."""
        self.wait()
        if self.process.returncode != 0:
            _without_symbolic_shapes(self.src, self.dst, (self.stderr or "").strip(), notes)
        return self.dst


def _without_symbolic_shapes(src: Path, dst: Path, failure: str, notes: list[str]) -> None:
    last = (failure.splitlines() or ["no message"])[-1]
    notes.append(f"symbolic shape inference failed ({last[:80]}); pre-processed with skip_symbolic_shape")
    try:
        _quant().quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as second:  # noqa: BLE001 - onnxruntime raises bare Exceptions here
        notes.append(f"pre-processing skipped ({str(second).splitlines()[0][:80]})")
        shutil.copyfile(src, dst)


_STARTED: dict[Path, Preprocessing] = {}  # by output path: unique per build's scratch directory
PREPROCESS = "preprocess"  # the mode of the job that has a child quantizing ahead pre-process its input


def preprocess(src: Path, dst: Path, notes: list[str], here: bool = False) -> Path:
    """Shape inference and graph clean-up before quantizing: awaiting a pre-processing started early, or (``here``)
    in this process, written under a scratch name and renamed since the build waits for the file."""
    if not here:
        return (_STARTED.pop(dst, None) or Preprocessing(src, dst)).result(notes)
    scratch = dst.with_name(f"{dst.stem}.{os.getpid()}.onnx")
    try:
        _quant().quant_pre_process(str(src), str(scratch))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises bare Exceptions here
        _without_symbolic_shapes(src, scratch, str(exc), notes)
    os.replace(scratch, dst)
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


def quantize_static(src: Path, dst: Path, options: QuantizeOptions, ctx: QuantizeContext, notes: list[str]) -> None:
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
        quant_format = {"qdq": q.QuantFormat.QDQ, "qoperator": q.QuantFormat.QOperator}[options.quant_format]
        with vectorized():  # the operator-oriented format's weights go through the loop dynamic's do
            q.quantize_static(str(src), str(dst), reader, quant_format=quant_format,
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
    notes.append(f"static {'QDQ' if options.quant_format == 'qdq' else 'operator-oriented'} int8: "
                 f"{options.calibration_method} calibration on "
                 f"{len(reader.samples)} samples, activations {options.activation_type}, "
                 f"{'per-channel' if options.per_channel else 'per-tensor'} weights{_kept_float(options, op_types)}")


def _kept_float(options: QuantizeOptions, op_types: list[str] | None) -> str:
    parts = [f"only {', '.join(op_types)}"] if op_types and options.exclude_op_types else []
    parts += [f"{len(options.exclude_nodes)} node(s) kept float"] if options.exclude_nodes else []
    return f" ({'; '.join(parts)})" if parts else ""


def quantize_dynamic(src: Path, dst: Path, options: QuantizeOptions, notes: list[str]) -> None:
    q = _quant()
    qtype = {"uint8": q.QuantType.QUInt8, "int8": q.QuantType.QInt8}[options.weight_type]
    from edgeops.compress.outliers import float_parts

    kept_float = [*(options.exclude_nodes or []), *float_parts(onnx.load(str(src), load_external_data=False).graph)]
    with vectorized():
        q.quantize_dynamic(str(src), str(dst), op_types_to_quantize=quantizable_op_types(src, options, static=False),
                           nodes_to_exclude=kept_float or None, per_channel=options.per_channel, weight_type=qtype)
    notes.append(f"dynamic int8: {'per-channel' if options.per_channel else 'per-tensor'} weights, "
                 "activations quantized at run time")


def quantize_weight_only(src: Path, dst: Path, options: QuantizeOptions, notes: list[str]) -> None:
    if not has_matmul_weights(src):
        raise BuildError("weight_only quantization needs MatMul nodes with constant 2-D weights; "
                         "this model has none", hint="use static or dynamic for conv nets")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    if options.embeddings:  # GatherBlockQuantized needs opset 21 throughout, or onnxruntime rejects the mix
        from onnx import version_converter

        model = version_converter.convert_version(model, 21)
    quantizer = MatMulNBitsQuantizer(model, bits=options.bits, block_size=options.block_size, is_symmetric=True,
                                     accuracy_level=options.accuracy_level,
                                     op_types_to_quantize=("MatMul", "Gather") if options.embeddings else None,
                                     quant_axes=(("MatMul", 0), ("Gather", 1)) if options.embeddings else None)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    embedded = "; embedding lookups GatherBlockQuantized (opset 21)" if options.embeddings else ""
    notes.append(f"int{options.bits} weight-only MatMulNBits, block {options.block_size}, "
                 f"accuracy_level {options.accuracy_level}{embedded}")


def quantize_fp16(src: Path, dst: Path, notes: list[str]) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    notes.append("fp16 weights and activations, float32 inputs/outputs; host latency is the CPU's, not the GPU's")


def prepared_for(src: Path, ctx: QuantizeContext, notes: list[str]) -> Path:
    """The pre-processed input, made once per step (every candidate shares it)."""
    path = ctx.path("pre")
    if not path.exists():
        preprocess(src, path, notes, here=ctx.preprocess_here)
        if ctx.accelerator == "tpu":
            notes.extend(fix_batch_dimension(path, path))
    return path


def preprocesses(options: QuantizeOptions, ctx: QuantizeContext) -> bool:
    """Whether quantizing runs onnxruntime's pre-processing first (NPU targets always: static shapes). Decoders
    only when asked: their symbolic shapes defeat its shape inference, and it cost more than the rest of an auto
    build of the tiny LM (docs/generative.md)."""
    if ctx.generative and "preprocess" not in options.model_fields_set:
        return ctx.accelerator == "tpu"
    return options.preprocess or ctx.accelerator == "tpu"


def _rewritten(prepared: Path, tag: str, doing: str, rewrite: Callable[[Path, Path], str], ctx: QuantizeContext,
               notes: list[str]) -> Path:
    """``prepared`` rewritten by ``rewrite(src, dst) -> note`` (made once per step and ``tag``; the note kept).
    Written under a scratch name and renamed, note first: a child quantizing ahead may make or read the same
    graph, and a graph that exists is whole."""
    path, note = prepared.with_name(f"{prepared.stem}-{tag}.onnx"), prepared.with_name(f"{prepared.stem}-{tag}.txt")
    if not path.exists():
        ctx.progress(f"quantize: {doing}")
        scratch = path.with_name(f"{path.stem}.{os.getpid()}-{threading.get_ident()}.onnx")
        scratch.with_suffix(".txt").write_text(rewrite(prepared, scratch))
        os.replace(scratch.with_suffix(".txt"), note)
        os.replace(scratch, path)
    notes.append(note.read_text())
    return path


def smoothed(prepared: Path, alpha: float, ctx: QuantizeContext, notes: list[str]) -> Path:
    """``prepared`` with its MatMul activations smoothed (SmoothQuant)."""
    from edgeops.compress.smooth import smooth

    return _rewritten(prepared, f"smooth-{alpha:g}", f"smoothing activations (alpha {alpha:g})",
                      lambda src, dst: smooth(src, dst, ctx.calibration.inputs, alpha), ctx, notes)


def outliers_split(prepared: Path, ratio: float, ctx: QuantizeContext, notes: list[str]) -> Path:
    """``prepared`` with the outlier channels of its MatMul activations split off into float MatMuls."""
    from edgeops.compress.outliers import split_outliers

    return _rewritten(prepared, f"split-{ratio:g}", f"splitting outlier channels off (above {ratio:g}x the median)",
                      lambda src, dst: split_outliers(src, dst, ctx.calibration.inputs, ratio), ctx, notes)


def rotated(prepared: Path, block: int, ctx: QuantizeContext, notes: list[str]) -> Path:
    """``prepared`` with its MatMul activations rotated by block Hadamard matrices."""
    from edgeops.compress.rotate import rotate

    return _rewritten(prepared, f"rotate-{block}", f"rotating activations (Hadamard blocks of {block})",
                      lambda src, dst: rotate(src, dst, block), ctx, notes)


def rewritten_input(src: Path, mode: str, options: QuantizeOptions, ctx: QuantizeContext, notes: list[str]) -> Path:
    """The float graph a candidate quantizes: ``src`` pre-processed, smoothed, split and rotated as its options
    say (each rewrite exact in float)."""
    prepared = prepared_for(src, ctx, notes) if preprocesses(options, ctx) else src
    if options.smooth is not None and mode in ("static", "dynamic"):
        prepared = smoothed(prepared, options.smooth, ctx, notes)
    if options.split_outliers is not None and mode == "dynamic":
        prepared = outliers_split(prepared, options.split_outliers, ctx, notes)
    if options.rotate is not None and mode == "dynamic":
        prepared = rotated(prepared, options.rotate, ctx, notes)
    return prepared


def run_mode(mode: str, src: Path, options: QuantizeOptions, ctx: QuantizeContext, notes: list[str],
             label: str = "") -> Path:
    """Quantize ``src`` with one concrete mode; returns the output path."""
    dst = ctx.path(f"quantize-{label or mode}")
    if mode == "fp16":
        quantize_fp16(src, dst, notes)
        return dst
    prepared = ctx.own_copy(rewritten_input(src, mode, options, ctx, notes))
    if mode == "static":
        quantize_static(prepared, dst, options, ctx, notes)
    elif mode == "dynamic":
        quantize_dynamic(prepared, dst, options, notes)
    elif mode == "weight_only":
        quantize_weight_only(prepared, dst, options, notes)
    else:
        raise AssertionError(mode)
    if options.rounding == "gptq":
        from edgeops.compress.gptq import gptq

        ctx.progress(f"quantize: GPTQ rounding ({label or mode})")
        notes.append(gptq(prepared, dst, ctx.calibration.inputs, options.calibration_samples))
    return dst


class Quantize(Step[QuantizeOptions]):
    """Static, dynamic, weight-only or fp16 quantization, or ``auto``: try several, keep the best that passes."""

    kind = "quantize"
    started_ahead: Path | None = None  # the key of the child ``start`` began quantizing ahead in

    def start(self, model: Path, ctx: StepContext) -> Callable[[], None]:
        """Begin pre-processing ``model`` in a child process, or an ``auto`` search's quantizing ahead (whose
        child pre-processes first); returns what waits for the pre-processing (nothing for the child: every
        timing stops it)."""
        options = self.options
        if options.mode == "auto" and _ahead_for(model, options, ctx) is not None:
            self.started_ahead = ctx.path("ahead")
            return lambda: None
        if options.mode == "fp16" or not preprocesses(options, ctx):
            return lambda: None
        dst = ctx.path("pre")
        _STARTED[dst] = started = Preprocessing(model, dst)
        return started.wait

    def run(self, model: Path, ctx: StepContext) -> StepResult:
        options = self.options
        try:
            if options.mode != "auto":
                notes: list[str] = []
                ctx.progress(f"quantize {options.mode}")
                return StepResult(run_mode(options.mode, model, options, ctx, notes), notes)
            return _auto(model, options, ctx)
        finally:
            _STARTED.pop(ctx.path("pre"), None)  # started early but never needed (every candidate was cached)
            _close_ahead(ctx.path("ahead"))

    def close(self) -> None:
        if self.started_ahead is not None:
            _close_ahead(self.started_ahead)


_AHEAD: dict[Path, "Search"] = {}  # the search that started a child quantizing ahead, by the step's scratch path


def _close_ahead(key: Path) -> None:
    if (started := _AHEAD.pop(key, None)) is not None and started.ahead is not None:
        started.ahead.close()


def _ahead_for(model: Path, options: QuantizeOptions, ctx: StepContext) -> "Search | None":
    """The search that started the step's child quantizing candidates ahead (its ``ahead``), where a second
    core can do so: CPU searches of models big enough to pay for starting it (never a GPU or NPU class, whose
    candidates are few, nor a decoder's search); ``Quantize.run`` closes it. Started with its work:
    pre-processing, then the ``ahead_jobs`` not in the candidate cache. When every mode's candidate and the
    pre-processed input are cached (a rebuild after a changed goal) no child starts: it would hold the
    evaluations to one core, and the variants the search reaches take a fraction of a second each to quantize
    in the build."""
    key = ctx.path("ahead")
    if key in _AHEAD:
        return _AHEAD[key]
    if ctx.accelerator != "cpu" or ctx.generative or not options.search or len(os.sched_getaffinity(0)) < 2 or \
            model.stat().st_size < ahead.MIN_MODEL_BYTES:
        return None
    _AHEAD[key] = search = Search(model, ctx)
    if not search.not_cached([(mode, mode, options) for mode in auto_modes(options, ctx, search.matmul_weights)]) \
            and (not preprocesses(options, ctx) or search.restore_preprocessed()):
        return search
    search.ahead = child = Ahead(ctx.work_dir, ctx.index, ctx.accelerator, ctx.generative, ctx.calibration.inputs)
    if preprocesses(options, ctx):
        child.submit(search.preprocessing)
    search.quantize_ahead(ahead_jobs(options, ctx, search.matmul_weights))
    return search


def static_variants(options: QuantizeOptions, prepared: Path) -> list[tuple[str, QuantizeOptions]]:
    """The static int8 options worth trying besides those given: the other weight granularity; only the
    compute ops (no Q/DQ pairs around activations, squeeze-excite gates and residual adds); and that
    with depthwise convolutions kept float; the operator-oriented format (QLinear* kernels, no Q/DQ pairs);
    percentile calibration (ranges that ignore extremes such as an attention mask's float32 minimum).
    Each is (label, options)."""
    flipped = "per-tensor" if options.per_channel else "per-channel"
    variants = [(f"static {flipped}", options.model_copy(update={"per_channel": not options.per_channel}))]
    if options.quant_format == "qdq":
        variants.append(("static qoperator", options.model_copy(update={"quant_format": "qoperator"})))
    if options.calibration_method == "minmax":
        variants.append(("static percentile", options.model_copy(update={"calibration_method": "percentile"})))
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


def weighted_matmuls(prepared: Path, quantized: Path) -> list[str]:
    """Names of the MatMuls with a constant weight in ``prepared`` that dynamic quantization replaced."""
    graph = onnx.load(str(prepared), load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    kept = {n.name for n in onnx.load(str(quantized), load_external_data=False).graph.node}
    return [n.name for n in graph.node
            if n.op_type == "MatMul" and n.name and n.input[1] in constants and n.name not in kept]


def sensitivity_order(prepared: Path, quantized: Path, nodes: list[str], inputs: dict[str, np.ndarray],
                      samples: int = 16) -> list[str]:
    """``nodes`` most harmful first: the relative error (quantized against float) each adds between its
    input and its output, on the first ``samples`` evaluation samples. One run of each model."""
    graph = onnx.load(str(prepared), load_external_data=False).graph
    by_name = {n.name: n for n in graph.node}
    graph_inputs = {i.name for i in graph.input}
    tensors = sorted({t for name in nodes for t in (by_name[name].input[0], by_name[name].output[0])} - graph_inputs)

    def run(path: Path) -> dict[str, np.ndarray]:
        session = probe_session(onnx.load(str(path)), tensors)
        sample = Dataset({name: array[:samples] for name, array in inputs.items()}, None, "")
        return dict(zip([o.name for o in session.get_outputs()], run_all(session, sample)))

    exact, approximate = run(prepared), run(quantized)

    def error(tensor: str) -> float:
        if tensor in graph_inputs or tensor not in exact or tensor not in approximate:
            return 0.0
        reference = exact[tensor].astype(np.float64)
        return float(np.linalg.norm(approximate[tensor] - reference) / (np.linalg.norm(reference) + 1e-12))

    added = {name: error(by_name[name].output[0]) - error(by_name[name].input[0]) for name in nodes}
    return sorted(nodes, key=lambda name: -added[name])


def mixed_precision(search: "Search", base: Candidate) -> None:
    """int8 missed the goal: from its closest variant (static or dynamic), keep the most sensitive quantized
    nodes float, 1, 2, 4, ... of them, until a configuration meets the goal (NNCF's accuracy-aware idea, by
    measured sensitivity); the fastest passing candidate wins as usual."""
    ctx = search.ctx
    quantized, _, options = search.found[base.mode]
    mode = family(base.mode)
    prepared = rewritten_input(search.src, mode, options, ctx, [])
    nodes = quantized_nodes(quantized) if mode == "static" else weighted_matmuls(prepared, quantized)
    if len(nodes) < 2:
        return
    ctx.progress(f"quantize auto: measuring the sensitivity of {len(nodes)} quantized node(s)")
    order = sensitivity_order(prepared, quantized, nodes, ctx.evaluator.data.inputs)

    def variant(count: int) -> Attempt:
        kept = sorted({*order[:count], *(options.exclude_nodes or [])})
        return f"{base.mode} mixed {count}-float", mode, options.model_copy(update={"exclude_nodes": kept})

    count = 1
    while count < len(nodes):
        if count * 2 < len(nodes):  # the next count is quantized while this one is evaluated
            search.quantize_ahead([variant(count * 2)])
        candidate = search.attempt(*variant(count))
        if _passes(candidate):
            search.found[candidate.mode][1].append(f"kept float by sensitivity: {', '.join(order[:count])}")
            break
        count *= 2


SEARCH_CALIBRATION = 32  # static candidates are calibrated on this many samples; the chosen one on all of them
CANNOT_WIN = 1.25    # a candidate this much slower than a passing one (quick timing) is not evaluated further
SAME_SPEED = 1.05    # candidates within this of the fastest count as equally fast: the higher fidelity wins
CLOSE_CALL = 1.5     # a speedup within this factor of min_speedup is timed again side by side before deciding


def searched(mode: str, options: QuantizeOptions) -> QuantizeOptions:
    """The options a candidate is quantized with while searching: static ones calibrated on fewer samples."""
    if mode == "static" and options.calibration_samples > SEARCH_CALIBRATION:
        return options.model_copy(update={"calibration_samples": SEARCH_CALIBRATION})
    return options


Attempt = tuple[str, str, QuantizeOptions]  # (label, mode, options): one candidate a search tries


class Search:
    """The candidates one ``auto`` step tries, what each produced, and the early stops between them."""

    def __init__(self, src: Path, ctx: StepContext, like: "Search | None" = None) -> None:
        """``like``: a search of the same input begun earlier (it started the child), whose reads are reused."""
        self.src, self.ctx = src, ctx
        self.found: dict[str, tuple[Path, list[str], QuantizeOptions]] = {}
        self.candidates: list[Candidate] = []
        self.recalibrate: set[str] = set()  # static candidates calibrated on fewer samples while searching
        self.src_sha256: str | None = like.src_sha256 if like else None
        # read once: the model may be tens of MB
        self.matmul_weights: bool = like.matmul_weights if like else has_matmul_weights(src)
        self.started = time.monotonic()
        self.objective = "latency"
        self.min_speedup = DEFAULT_MIN_SPEEDUP
        self.ahead: Ahead | None = None
        # about the search, not one candidate (pre-processing's fallback)
        self.notes: list[str] = list(like.notes) if like else []

    @property
    def preprocessing(self) -> Job:
        """The child's job of pre-processing the input (candidates quantized ahead from it follow)."""
        return Job(PREPROCESS, PREPROCESS, self.src, {})

    def not_cached(self, jobs: list[Attempt]) -> list[Attempt]:
        """The (label, mode, options) candidates the candidate cache does not hold."""
        cache = self.ctx.candidates
        return [(label, mode, options) for label, mode, options in jobs
                if not (cache and cache.get(self._key(mode, searched(mode, options))))]

    def quantize_ahead(self, jobs: list[Attempt]) -> None:
        """Have the child quantize these (label, mode, options) candidates while the search evaluates others (those
        not cached already)."""
        if self.ahead is None:
            return
        for label, mode, options in self.not_cached(jobs):
            self.ahead.submit(Job(label, mode, self.src, searched(mode, options).model_dump(mode="json")))

    def passing(self) -> list[Candidate]:
        return [c for c in self.candidates if _passes(c)]

    def fastest_passing_ms(self) -> float | None:
        timed = [c.measurement.latency_p50_ms for c in self.passing()  # type: ignore[union-attr]
                 if not math.isnan(c.measurement.latency_p50_ms)]  # type: ignore[union-attr]
        return min(timed) if timed else None

    def attempt(self, label: str, mode: str, options: QuantizeOptions) -> Candidate:
        """One candidate: quantize; stop early if a quick timing shows it cannot beat a passing candidate or a
        sample of the evaluation set shows it clearly misses the goal; else measure quality on everything,
        and time it only if it meets the goal."""
        ctx = self.ctx
        done = len(self.candidates)
        pace = f", {(time.monotonic() - self.started) / done:.0f} s per candidate so far" if done else ""
        ctx.progress(f"quantize auto: candidate {done + 1}, {label}{pace}")
        notes: list[str] = []
        built = searched(mode, options)
        if built is not options:
            self.recalibrate.add(label)
        try:
            path = self._quantized(label, mode, built, notes)
            candidate = self._early_stop(label, path) or self._measured(label, path, notes)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is recorded, not fatal
            candidate = Candidate(label, None, error=str(exc).splitlines()[0][:200])
        if candidate.error is None:
            self.found[label] = (path, notes, options)
        self.candidates.append(candidate)
        return candidate

    def _quantized(self, label: str, mode: str, options: QuantizeOptions, notes: list[str]) -> Path:
        """The candidate's model: from the candidate cache, or quantized now (and cached)."""
        ctx, cache, name = self.ctx, self.ctx.candidates, label.replace(" ", "-")
        key = self._key(mode, options) if cache else ""
        if cache and (hit := cache.get(key)):
            path = ctx.path(f"quantize-{name}")
            shutil.copyfile(hit[0], path)
            notes.extend([*hit[1], "quantized by an earlier build (candidate cache)"])
            return path
        taken = self.ahead.take(Job(label, mode, self.src, options.model_dump(mode="json"))) if self.ahead else None
        if taken is not None:
            made, made_notes = taken
            notes.extend(made_notes)
        else:
            made = run_mode(mode, self.src, options, ctx, notes, label=name)
        if cache:
            cache.put(key, made, notes)
        return made

    def _key(self, mode: str, options: QuantizeOptions | None) -> str:
        """The candidate cache's key of a candidate, or (``options`` None) of the pre-processed input."""
        import onnxruntime

        from edgeops import __version__
        from edgeops.compress.cache import cache_key
        from edgeops.compress.data import file_sha256

        if self.src_sha256 is None:
            self.src_sha256 = file_sha256(self.src)
        made: dict[str, Any] = {"input": self.src_sha256, "mode": mode, "accelerator": self.ctx.accelerator,
                                "versions": [__version__, onnx.__version__, onnxruntime.__version__]}
        if options is not None:
            made.update(options=options.model_dump(mode="json", exclude={"candidates", "min_speedup", "search",
                                                                         "objective", "decide_on", "finalists"}),
                        calibration=self.ctx.calibration.sha256, preprocessed=preprocesses(options, self.ctx))
        return cache_key(made)

    def restore_preprocessed(self) -> bool:
        """The pre-processed input from the candidate cache, where ``prepared_for`` finds it (its notes the
        search's); False when the cache does not hold it."""
        path, cache = self.ctx.path("pre"), self.ctx.candidates
        if not path.exists():
            if cache is None or (hit := cache.get(self._key(PREPROCESS, None))) is None:
                return False
            shutil.copyfile(hit[0], path)
            self.notes.extend(hit[1])
        return True

    def keep_preprocessed(self) -> None:
        """Put the pre-processed input this search made in the candidate cache (a rebuild need not make it)."""
        path, cache = self.ctx.path("pre"), self.ctx.candidates
        if cache is not None and path.exists() and cache.get(key := self._key(PREPROCESS, None)) is None:
            cache.put(key, path, self.notes)

    def _early_stop(self, label: str, path: Path) -> Candidate | None:
        best = self.fastest_passing_ms()
        if best is None or self.ctx.accelerator == "gpu" or self.objective == "size":  # slow may still be smallest
            return None
        quick = self.ctx.evaluator.quick_p50_ms(path)
        if quick <= best * CANNOT_WIN:
            return None
        return Candidate(label, None, skipped=f"cannot win: quick timing p50 {quick:.3f} ms against {best:.3f} ms "
                                              "for a candidate that meets the goal; quality not evaluated")

    def _slower_than_the_input(self, label: str, path: Path) -> Candidate | None:
        """A candidate too slow to replace the input (quick timing): ``auto`` keeps the input over anything less
        than ``min_speedup`` faster, so a near miss this slow is not evaluated on the whole set."""
        before = self.ctx.before
        if before is None or math.isnan(before.latency_p50_ms) or self.ctx.accelerator == "gpu" or \
                self.objective not in ("latency", "energy"):
            return None
        bar = before.latency_p50_ms / self.min_speedup
        quick = self.ctx.evaluator.quick_p50_ms(path)
        if quick <= bar * CANNOT_WIN:
            return None
        return Candidate(label, None, skipped=f"cannot win: near the goal on the screening sample, but its quick "
                                              f"timing p50 {quick:.3f} ms is over {CANNOT_WIN:g}x the {bar:.3f} ms it "
                                              f"must beat to replace the input (min_speedup {self.min_speedup:g})")

    def _measured(self, label: str, path: Path, notes: list[str]) -> Candidate:
        """Quality on a sample of the evaluation set first: a clear miss stops there; a pass is timed and
        confirmed on the whole set only if it is chosen (``confirm``); anything in between is measured whole."""
        evaluator = self.ctx.evaluator
        screened = evaluator.screen(path)
        if screened is not None and evaluator.clearly_missed(screened):
            error = screened.extra.get("drop_standard_error")
            notes.append(f"screened on {screened.extra['screened_samples']:.0f} evaluation samples: drop "
                         f"{screened.drop:.4g}" + (f" (standard error {error:.2g})" if error is not None else "") +
                         f" against {evaluator.goal.max_drop:g} allowed, a clear miss; not evaluated further")
        elif screened is not None and not screened.passed:
            if (slow := self._slower_than_the_input(label, path)) is not None:
                return slow  # measuring the whole set would decide nothing: the input would be kept over it
            screened = None
        measurement = evaluator.measure(path, notes, latency=False, known=screened)
        if measurement.quality.passed:
            measurement = evaluator.with_latency(measurement, path)
        return Candidate(label, measurement)

    def confirm(self, candidate: Candidate) -> bool:
        """The chosen candidate as it will ship: calibrated on every calibration sample (static) and measured on
        the whole evaluation set; False if it misses the goal there."""
        m = candidate.measurement
        label = candidate.mode
        if m is None or ("screened_samples" not in m.quality.extra and label not in self.recalibrate):
            return _passes(candidate)
        path, notes, options = self.found[label]
        if label in self.recalibrate:
            self.ctx.progress(f"quantize auto: calibrating {label} on all {options.calibration_samples} samples")
            notes = []
            path = self._quantized(f"{label} final", "static", options, notes)
            self.found[label] = (path, notes, options)
            self.recalibrate.discard(label)
        self.ctx.progress(f"quantize auto: confirming {label} on the whole evaluation set")
        full = self.ctx.evaluator.quality_of(path)
        candidate.measurement = replace(m, quality=full, size_bytes=path.stat().st_size)
        return full.passed


def dynamic_variants(search: Search, options: QuantizeOptions) -> None:
    """The dynamic int8 options worth trying: without pre-processing (its graph optimisations made an encoder's
    int8 graph slower here, see docs/build.md), and activation smoothing on whichever graph was faster."""
    if options.preprocess:
        search.attempt("dynamic unprocessed", "dynamic", options.model_copy(update={"preprocess": False}))
    if options.smooth is not None or not search.matmul_weights:
        return
    timed = [c for c in search.candidates if family(c.mode) == "dynamic" and _passes(c)]
    fastest = min(timed, key=lambda c: c.measurement.latency_p50_ms) if timed else None  # type: ignore[union-attr]
    graph = search.found[fastest.mode][2].preprocess if fastest else options.preprocess  # the faster one's
    search.attempt(*smoothed_variant(options, graph))
    tight_variants(search, options)


def smoothed_variant(options: QuantizeOptions, preprocess: bool) -> Attempt:
    """(label, mode, options) of the smoothed dynamic candidate on the graph with or without pre-processing."""
    return ("dynamic smoothed" + ("" if preprocess else " unprocessed"), "dynamic",
            options.model_copy(update={"smooth": 0.5, "preprocess": preprocess}))


def ahead_jobs(options: QuantizeOptions, ctx: StepContext, matmul_weights: bool) -> list[Attempt]:
    """What a child quantizes ahead, in the order the search takes them: every mode; then the dynamic variants
    on the graph without pre-processing, the plain one and the smoothed one (on the encoders measured that graph
    ran faster, docs/build.md: a guess, and if pre-processing's graph runs faster the search smooths that one
    itself and the child's is not used)."""
    modes = auto_modes(options, ctx, matmul_weights)
    jobs = [(mode, mode, options) for mode in modes]
    if "dynamic" in modes and options.preprocess and options.smooth is None and options.split_outliers is None:
        jobs.append(("dynamic unprocessed", "dynamic", options.model_copy(update={"preprocess": False})))
        if matmul_weights:
            jobs.append(smoothed_variant(options, preprocess=False))
    return jobs



TIGHT_TOOLS = (("rotated", {"rotate": 64}), ("split", {"split_outliers": 6.0}))  # tried in this order


def tight_variants(search: Search, options: QuantizeOptions) -> None:
    """A tight goal no dynamic candidate met: the two closest ones with their activations rotated (block
    Hadamard), then with their outlier channels multiplied in float (LLM.int8()'s split), before mixed precision
    keeps whole MatMuls float; stops at the first that meets the goal."""
    dynamic = [c for c in search.candidates if family(c.mode) == "dynamic" and c.measurement is not None]
    if options.split_outliers is not None or options.rotate is not None or not dynamic or \
            any(_passes(c) for c in dynamic):
        return
    for closest in sorted(dynamic, key=lambda c: c.measurement.quality.drop)[:2]:  # type: ignore[union-attr]
        base = search.found[closest.mode][2]
        for tool, update in TIGHT_TOOLS:
            label = f"dynamic {tool}" + (" smoothed" if base.smooth is not None else "") + \
                ("" if base.preprocess else " unprocessed")
            if label not in search.found and _passes(search.attempt(label, "dynamic", base.model_copy(update=update))):
                return


def weight_only_variants(search: Search, options: QuantizeOptions) -> None:
    """The weight-only options worth trying once int4 weights won (decoders: always). When int4 as given meets
    the goal: bigger blocks (smaller, faster, coarser; with GPTQ rounding if they miss) and the embedding table in
    int4 too (a decoder's largest tensor, often); when it misses: GPTQ rounding (the same speed), then float
    activations (int8 ones cost a decoder agreement here). Either way int8 weights, the most faithful."""
    base = next((c for c in search.candidates if c.mode == "weight_only"), None)
    gptq = {"rounding": "gptq"} if options.rounding == "nearest" else None
    if base is not None and _passes(base):
        if options.block_size != 128:
            coarse = options.model_copy(update={"block_size": 128})
            if not _passes(search.attempt("weight_only block128", "weight_only", coarse)) and gptq:
                search.attempt("weight_only block128 gptq", "weight_only", coarse.model_copy(update=gptq))
        if options.bits == 4 and not options.embeddings:
            search.attempt("weight_only embeddings", "weight_only", options.model_copy(update={"embeddings": True}))
    else:
        rounded = search.attempt("weight_only gptq", "weight_only", options.model_copy(update=gptq)) \
            if gptq and base is not None and base.measurement is not None else None
        if options.accuracy_level == 4 and not (rounded and _passes(rounded)):
            search.attempt("weight_only fp32-compute", "weight_only", options.model_copy(update={"accuracy_level": 1}))
    if options.bits == 4:
        search.attempt("weight_only int8", "weight_only", options.model_copy(update={"bits": 8, "embeddings": False}))


def family(label: str) -> str:
    return label.split(" ")[0]


def auto_modes(options: QuantizeOptions, ctx: StepContext, matmul_weights: bool) -> list[str]:
    """The modes an ``auto`` step tries first, in order."""
    modes = list(options.candidates or AUTO_CANDIDATES[ctx.accelerator])
    if ctx.generative:  # a decoder's activations change with each position: no static calibration
        modes = [m for m in modes if m != "static"] or ["weight_only"]
    if "weight_only" in modes and not matmul_weights:
        modes.remove("weight_only")
    return modes


def _auto(src: Path, options: QuantizeOptions, ctx: StepContext) -> StepResult:
    """Try each mode; search the options that matter in the winning family (the fastest mode that met the goal,
    or every int8 family when none did); keep the fastest that meets the goal, the original unless it is
    ``min_speedup`` faster."""
    started = _ahead_for(src, options, ctx)
    search = Search(src, ctx, like=started)
    search.objective = options.objective or "latency"
    search.min_speedup = options.min_speedup or DEFAULT_MIN_SPEEDUP
    search.ahead = started.ahead if started else None
    modes = auto_modes(options, ctx, search.matmul_weights)
    with watching() as load:
        _search(search, modes, options, ctx)
    search.keep_preprocessed()
    fallback = ""
    if load.busy and ctx.accelerator != "gpu" and search.objective != "size" and len(search.passing()) > 1:
        fallback = _time_again(search, ctx, load)
    return _choose(search, src, modes, options, ctx, fallback)


def _time_again(search: Search, ctx: StepContext, load: Watch) -> str:
    """The candidates that meet the goal, timed again because other processes kept the host busy while they
    were timed; "" when the host was quiet this time, else why auto chooses by quality and size instead."""
    ctx.progress(f"quantize auto: the host was busy while timing ({load.describe()}): timing the candidates again")
    with watching() as again:
        timed = {c.mode: ctx.evaluator.quick_p50_ms(search.found[c.mode][0]) for c in search.passing()}
    if not again.busy:
        for candidate in search.passing():
            assert candidate.measurement is not None
            candidate.measurement = replace(candidate.measurement, latency_p50_ms=timed[candidate.mode],
                                            latency_p50_ci_ms=(math.nan, math.nan))  # the quick timing's alone
        return ""
    search.objective = "quality"
    return (f"the host was too busy to time candidates ({load.describe()}, then {again.foreign_cores or 0:.2f} cores busy "
            "when timed again): chose by quality, then size, not speed, and kept no float fallback on speed")


FAMILY_REACH = 10  # a family whose closest candidate missed by this many times the closest's miss is not searched


def closest_families(search: Search, families: set[str]) -> set[str]:
    """When no mode met the goal: the families worth searching, those whose closest candidate came within
    ``FAMILY_REACH`` times the closest candidate's miss (or the allowed drop). A family that missed by far more
    (static int8 at cosine 0.86 where dynamic reached 0.9996) has variants that trade a point here and there;
    they cost the search most of its time and do not close such a gap."""
    drops: dict[str, float] = {}
    for c in search.candidates:
        if c.measurement is not None and family(c.mode) in families:
            drops[family(c.mode)] = min(drops.get(family(c.mode), math.inf), c.measurement.quality.drop)
    if not drops:
        return families
    reach = FAMILY_REACH * max(min(drops.values()), search.ctx.evaluator.goal.max_drop)
    return {f for f in families if f not in drops or drops[f] <= reach}


def _search(search: Search, modes: list[str], options: QuantizeOptions, ctx: StepContext) -> None:
    """Every mode, then the variants of the winning family, then mixed precision if nothing met the goal."""
    if search.ahead is not None and preprocesses(options, ctx):  # the child pre-processes: wait for it
        search.notes.extend((search.ahead.take(search.preprocessing) or (None, []))[1])
    for mode in modes:
        search.attempt(mode, mode, options)
    if options.search and ctx.accelerator == "cpu":
        best = _best(search.passing(), modes, ctx, search.objective)
        families = {family(best.mode)} if best else closest_families(search, {"static", "dynamic"} & set(modes))
        if "static" in families:
            for label, variant in static_variants(options, prepared_for(search.src, ctx, [])):
                search.attempt(label, "static", variant)
        if "dynamic" in families and not ctx.request.generative:  # encoder findings (docs/build.md)
            dynamic_variants(search, options)
        if "weight_only" in families or (ctx.request.generative and "weight_only" in modes):
            weight_only_variants(search, options)
        int8 = [c for c in search.candidates if family(c.mode) in ("static", "dynamic") and c.measurement
                and search.found[c.mode][2].quant_format == "qdq"]  # mixed precision reads Q/DQ pairs
        if not search.passing() and int8:
            closest = min(int8, key=lambda c: c.measurement.quality.drop)  # type: ignore[union-attr]
            mixed_precision(search, closest)


AUTO_ONLY = ("candidates", "min_speedup", "objective", "decide_on", "finalists")
DEFAULT_FINALISTS = 3


def concrete_step(label: str, options: QuantizeOptions) -> dict[str, Any]:
    """The ``quantize`` step that builds candidate ``label`` of an auto search by itself (a finalist)."""
    fields = options.model_dump(mode="json", exclude_none=True, exclude=set(AUTO_ONLY))
    return QuantizeOptions.model_validate({**fields, "mode": family(label)}).model_dump(mode="json",
                                                                                         exclude_none=True)


def finalists(search: Search, modes: list[str], options: QuantizeOptions, ctx: StepContext) -> list[dict[str, Any]]:
    """``decide_on: device``: the best passing candidates in the objective's order, each with the step that
    builds it alone and what the host measured, then the input (a device may find no candidate faster)."""
    left, picked = list(search.passing()), []  # type: list[Candidate], list[dict[str, Any]]
    while left and len(picked) < (options.finalists or DEFAULT_FINALISTS):
        best = _best(left, modes, ctx, search.objective)
        if best is None:
            break
        left.remove(best)
        m = best.measurement
        assert m is not None
        picked.append({"label": best.mode, "step": concrete_step(best.mode, search.found[best.mode][2]),
                       "host_p50_ms": round(m.latency_p50_ms, 4), "size_bytes": m.size_bytes,
                       "quality": m.quality.value})
    before = ctx.before
    picked.append({"label": "original", "step": None,
                   "host_p50_ms": round(before.latency_p50_ms, 4) if before else None,
                   "size_bytes": before.size_bytes if before else None,
                   "quality": before.quality.value if before else None})
    return picked


def _choose(search: Search, src: Path, modes: list[str], options: QuantizeOptions, ctx: StepContext,
            fallback: str) -> StepResult:
    """The passing candidate the objective prefers, confirmed on everything; the input unless it is
    ``min_speedup`` faster (latency and energy objectives, on a host quiet enough to tell). With
    ``decide_on: device`` the report also lists the finalists a device will choose among."""
    result = _chosen(search, src, modes, options, ctx, fallback)
    if options.decide_on == "device":
        result.extra["finalists"] = finalists(search, modes, options, ctx)
        result.notes.append("decide_on: device: finalists " + ", ".join(f["label"] for f in result.extra["finalists"])
                            + "; apply measures them on one device of each hardware class")
    return result


def _chosen(search: Search, src: Path, modes: list[str], options: QuantizeOptions, ctx: StepContext,
            fallback: str) -> StepResult:
    """The host's choice (see ``_choose``)."""
    best = _best(search.passing(), modes, ctx, search.objective)
    while best is not None and not search.confirm(best):
        best = _best(search.passing(), modes, ctx, search.objective)
    candidates = search.candidates
    if best is None:
        summary = "; ".join(f"{c.mode}: {_short(c)}" for c in candidates)
        return StepResult(src, [f"auto: no candidate met the quality goal ({summary})"], candidates,
                          measurement=ctx.before)
    if ctx.accelerator != "gpu" and ctx.before is not None and best.measurement is not None and \
            search.objective in ("latency", "energy"):  # size: smaller than the input by construction
        needed = options.min_speedup or DEFAULT_MIN_SPEEDUP
        speedup = ctx.before.latency_p50_ms / best.measurement.latency_p50_ms
        how = "p50, host CPU, 1 thread"
        if needed / CLOSE_CALL <= speedup <= needed * CLOSE_CALL:
            # two measurements taken seconds apart on a shared host: decide a close call on an A/B instead
            ctx.progress(f"quantize auto: timing the input and {best.mode} side by side")
            input_ms, best_ms = ctx.evaluator.side_by_side_p50(src, search.found[best.mode][0])
            speedup, how = input_ms / best_ms, "p50 timed side by side, host CPU, 1 thread"
        if speedup < needed:
            kept = Candidate("keep", ctx.before, chosen=True)
            warning = (f"auto kept the model unquantized: the fastest candidate that meets the goal, {best.mode}, "
                       f"is {speedup:.2f}x the input's speed ({how}), below min_speedup {needed:g}")
            return StepResult(src, [warning], [*candidates, kept], measurement=ctx.before, warnings=[warning])
    best.chosen = True
    why = (f"fastest on the host (candidates within {SAME_SPEED - 1:.0%} of the fastest p50, or whose p50 interval "
           "reaches its, count as equally fast; the most faithful of those wins)" if ctx.accelerator != "gpu"
           else "first passing in GPU preference order")
    if search.objective == "size":
        why = "smallest file (objective: size; ties: the most faithful, then the fastest)"
    elif search.objective == "quality":
        why = fallback
    elif search.objective == "energy":
        why += ("; objective: energy, for which the host's latency stands in (it has no power reading; devices "
                "measure energy when they verify)")
    rejected = ", ".join(f"{c.mode} ({_short(c)})" for c in candidates if not c.chosen)
    path, notes, _ = search.found[best.mode]
    return StepResult(path, [f"auto chose {best.mode}: {why} among candidates meeting the goal; rejected: "
                             f"{rejected or 'none'}", *notes, *search.notes], candidates,
                      measurement=best.measurement)


def _best(passing: list[Candidate], modes: list[str], ctx: StepContext,
          objective: str = "latency") -> Candidate | None:
    """The fastest passing candidate on the host; among those within ``SAME_SPEED`` of it, the smallest quality
    drop, then the smallest file. GPU classes (the host cannot time a GPU): the given order, then size.
    ``objective: size``: the smallest file, then the smallest drop, then the fastest."""
    timed = [c for c in passing if c.measurement is not None]
    if not timed:
        return None
    if objective == "size":
        return min(timed, key=lambda c: (c.measurement.size_bytes, c.measurement.quality.drop,  # type: ignore[union-attr]
                                         c.measurement.latency_p50_ms))  # type: ignore[union-attr]
    if objective == "quality":  # the host was too busy to time them
        return min(timed, key=lambda c: (c.measurement.quality.drop, c.measurement.size_bytes))  # type: ignore[union-attr]
    if ctx.accelerator == "gpu":
        return min(timed, key=lambda c: (modes.index(family(c.mode)) if family(c.mode) in modes else len(modes),
                                         c.measurement.size_bytes))  # type: ignore[union-attr]
    measured = [c.measurement for c in timed if c.measurement is not None]
    fastest = min(measured, key=lambda m: m.latency_p50_ms)
    high = fastest.latency_p50_ci_ms[1]
    high = fastest.latency_p50_ms if math.isnan(high) else high
    near = [c for c in timed if c.measurement is not None and (  # timings taken seconds apart on a shared host:
        c.measurement.latency_p50_ms <= fastest.latency_p50_ms * SAME_SPEED  # a few percent say nothing, and
        or c.measurement.latency_p50_ci_ms[0] <= high)]                       # neither do overlapping intervals
    return min(near, key=lambda c: (c.measurement.quality.drop, c.measurement.size_bytes))  # type: ignore[union-attr]


def _passes(c: Candidate) -> bool:
    return c.measurement is not None and c.measurement.quality.passed


def _short(c: Candidate) -> str:
    if c.error:
        return f"failed: {c.error[:60]}"
    if c.skipped:
        return c.skipped
    m = c.measurement
    assert m is not None
    verdict = "passes" if m.quality.passed else "misses goal (not timed)"
    if sample := m.quality.extra.get("screened_samples"):
        verdict += f" on a {sample:.0f}-sample screen"
    latency = "" if math.isnan(m.latency_p50_ms) else f", p50 {m.latency_p50_ms:.3f} ms"
    return f"{m.quality.describe()} {verdict}{latency}"
