"""Error-compensating weight rounding (GPTQ, Frantar et al. 2023) on a model onnxruntime already quantized.

Round-to-nearest rounds each weight on its own. GPTQ rounds the rows of a MatMul weight ``W`` (one row per
input channel) one at a time and moves each row's rounding error onto the rows not yet rounded, weighted by
how the calibration activations ``X`` correlate (the inverse of ``H = XᵀX``), so that ``X @ Q`` stays close
to ``X @ W`` rather than each weight close to itself. Rows go in decreasing order of ``diag(H)`` ("act
order"), with 1% of the mean diagonal added for stability.

The scales, zero points and graph are onnxruntime's, unchanged: only the integers change, so an artifact is
what onnxruntime would write but with other integers, and every kernel runs it as before. Three stored forms
are rewritten: int8/uint8 ``{weight}_quantized`` initializers (dynamic int8, static Q/DQ and operator-oriented,
scales per output channel or per tensor) and ``MatMulNBits`` blocks (weight-only int4/int8, scales per block of
input channels, the default zero point).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from edgeops.compress.evaluate import probe_session
from edgeops.compress.smooth import smoothable_groups

DAMP = 0.01     # share of the mean Hessian diagonal added to it (GPTQ's default)
BLOCK = 128     # rows rounded before the error is carried to the rest at once (the same result, fewer passes)
GROUP = 8       # samples whose activations are multiplied at once (a tall product runs ~4x faster per row)
HESSIAN_BYTES = 512 << 20  # the Hessians one pass over the calibration data gathers; more passes beyond
BUFFER_BYTES = 256 << 20   # activation rows held before they are multiplied, whatever GROUP says


@dataclass(frozen=True)
class Factor:
    """What GPTQ needs of one activation's Hessian: the order rows are rounded in and the upper Cholesky factor
    of the damped inverse Hessian in that order (shared by every weight that multiplies the activation)."""

    order: np.ndarray
    upper: np.ndarray


def factor(hessian: np.ndarray) -> Factor:
    h = hessian.astype(np.float64)
    dead = np.diag(h) == 0  # a channel the calibration never drove: rounded to nearest, carries no error
    h[dead, :], h[:, dead] = 0, 0
    h[dead, dead] = 1
    order = np.argsort(-np.diag(h), kind="stable")
    h = h[np.ix_(order, order)]
    h[np.diag_indices(len(h))] += DAMP * float(np.mean(np.diag(h)))
    return Factor(order, np.linalg.cholesky(np.linalg.inv(h)).T)  # inverse Hessian = upperᵀ upper


def round_rows(weight: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int,
               inverse: Factor, reciprocal: bool = False) -> np.ndarray:
    """GPTQ's integers for ``weight`` (K input channels by N outputs), dequantized as ``(q - zero) * scale``
    (``scale`` and ``zero`` broadcast to K x N), given ``inverse``, the ``factor`` of XᵀX (K x K) of the
    calibration inputs.
    A weight is divided by its scale in float32 (``reciprocal``: multiplied by its inverse), as onnxruntime's
    quantizer does, so that a row no error reached gets onnxruntime's own integer."""
    rows, order, upper = weight.shape[0], inverse.order, inverse.upper
    work = weight.astype(np.float64)[order]
    scales = np.broadcast_to(scale, weight.shape).astype(np.float32)[order]
    inverses = np.float32(1) / scales
    zeros = np.broadcast_to(zero, weight.shape).astype(np.float64)[order]
    levels = np.empty(weight.shape, np.int64)
    for start in range(0, rows, BLOCK):
        end = min(start + BLOCK, rows)
        errors = np.empty((end - start, weight.shape[1]))
        for row in range(start, end):
            row32 = work[row].astype(np.float32)
            q = np.clip(np.rint(row32 * inverses[row] if reciprocal else row32 / scales[row]) + zeros[row], qmin, qmax)
            levels[row] = q
            error = (work[row] - (q - zeros[row]) * scales[row]) / upper[row, row]
            work[row + 1:end] -= upper[row, row + 1:end, None] * error
            errors[row - start] = error
        work[end:] -= upper[start:end, end:].T @ errors
    restored = np.empty_like(levels)
    restored[order] = levels
    return restored


@dataclass
class Rounded:
    """One quantized MatMul weight: where its integers live and how they dequantize."""

    weight: str       # the float weight's name in the float graph
    activation: str   # the tensor it multiplies
    scale: np.ndarray   # broadcastable to K x N
    zero: np.ndarray
    qmin: int
    qmax: int
    store: Callable[[np.ndarray], None]  # writes K x N integers (zero point included) into the quantized model
    reciprocal: bool = False  # the quantizer multiplied by 1/scale (MatMulNBits, in C++) rather than divided


def _int8_weights(graph: onnx.GraphProto, floats: dict[str, tuple[str, np.ndarray]]) -> list[Rounded]:
    """The ``{weight}_quantized`` int8/uint8 initializers of dynamic, Q/DQ and operator-oriented models."""
    initializers = {i.name: i for i in graph.initializer}
    axes = {n.input[0]: next((a.i for a in n.attribute if a.name == "axis"), 1) for n in graph.node
            if n.op_type == "DequantizeLinear"}  # Q/DQ: the axis a per-channel scale runs along
    found = []
    for weight, (activation, w) in floats.items():
        stored, scale, zero = (initializers.get(f"{weight}_{s}") for s in ("quantized", "scale", "zero_point"))
        if stored is None or scale is None or zero is None or tuple(stored.dims) != w.shape or \
                stored.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            continue
        levels, scales, zeros = (numpy_helper.to_array(t) for t in (stored, scale, zero))
        if scales.size not in (1, w.shape[1]) or zeros.size != scales.size or \
                (scales.size > 1 and axes.get(stored.name, 1) not in (1, -1)):
            continue  # a scale per row or per block: not what onnxruntime writes for a MatMul weight
        signed = stored.data_type == onnx.TensorProto.INT8
        # onnxruntime's symmetric int8 weights use -127..127; an asymmetric range that reaches -128 keeps it
        qmin = (-128 if levels.min() == -128 else -127) if signed else 0
        found.append(Rounded(weight, activation, scales.reshape(1, -1).astype(np.float64),
                             zeros.reshape(1, -1).astype(np.float64), qmin, 127 if signed else 255,
                             _setter(stored, levels.dtype)))
    return found


def _setter(tensor: onnx.TensorProto, dtype: np.dtype) -> Callable[[np.ndarray], None]:
    def store(levels: np.ndarray) -> None:
        tensor.CopyFrom(numpy_helper.from_array(levels.astype(dtype), tensor.name))
    return store


def _nbits_weights(graph: onnx.GraphProto, floats: dict[str, tuple[str, np.ndarray]],
                   outputs: dict[str, str]) -> list[Rounded]:
    """``MatMulNBits`` blocks (onnxruntime's weight-only format) with the default zero point."""
    initializers = {i.name: i for i in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) > 3 or node.output[0] not in outputs:
            continue
        weight = outputs[node.output[0]]
        activation, w = floats[weight]
        attrs = {a.name: a.i for a in node.attribute}
        bits, block, k, n = attrs.get("bits", 4), attrs["block_size"], attrs["K"], attrs["N"]
        packed, scales = initializers.get(node.input[1]), initializers.get(node.input[2])
        if packed is None or scales is None or bits not in (4, 8) or (k, n) != w.shape or \
                activation != node.input[0]:
            continue
        shape = tuple(packed.dims)
        blocks = shape[1]
        scale = numpy_helper.to_array(scales).reshape(n, blocks).astype(np.float64)
        rows = np.repeat(scale.T, block, axis=0)[:k]  # K x N: each input channel's block scale
        found.append(Rounded(weight, activation, rows,
                             np.full((1, 1), 2.0 ** (bits - 1)), 0, 2 ** bits - 1,
                             _nbits_setter(packed, shape, bits, block), reciprocal=True))
    return found


def _nbits_setter(tensor: onnx.TensorProto, shape: tuple[int, ...], bits: int,
                  block: int) -> Callable[[np.ndarray], None]:
    def store(levels: np.ndarray) -> None:
        n, blocks = shape[0], shape[1]
        full = np.full((n, blocks * block), 2 ** (bits - 1), np.uint8)  # padding rows: zero weights
        full[:, :levels.shape[0]] = levels.T
        if bits == 4:
            pairs = full.reshape(n, blocks, block // 2, 2)
            full = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
        tensor.CopyFrom(numpy_helper.from_array(full.reshape(shape), tensor.name))
    return store


def hessians(model: onnx.ModelProto, tensors: list[str], inputs: dict[str, np.ndarray],
             samples: int) -> dict[str, np.ndarray]:
    """XᵀX over the last axis of each tensor, summed over the first ``samples`` samples (one run each)."""
    session = probe_session(model, tensors)
    names = [o.name for o in session.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    held = 0
    count = min(samples, len(next(iter(inputs.values()))))
    for i in range(count):
        outputs = dict(zip(names, session.run(None, {k: v[i:i + 1] for k, v in inputs.items()})))
        for tensor in tensors:
            rows[tensor].append(outputs[tensor].reshape(-1, outputs[tensor].shape[-1]).astype(np.float32))
            held += rows[tensor][-1].nbytes
        if (i + 1) % GROUP == 0 or i + 1 == count or held > BUFFER_BYTES:
            for tensor in tensors:
                x = np.concatenate(rows[tensor])
                sums[tensor] = sums.get(tensor, 0) + (x.T @ x).astype(np.float64)
                rows[tensor].clear()
            held = 0
    return sums


def passes(widths: dict[str, int]) -> list[list[str]]:
    """The activations (name -> channels) split into passes over the calibration data whose Hessians fit in
    ``HESSIAN_BYTES`` together (one pass for an edge-sized model; a wide decoder takes several)."""
    groups: list[list[str]] = [[]]
    used = 0
    for tensor, width in widths.items():
        size = width * width * 8
        if groups[-1] and used + size > HESSIAN_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(tensor)
        used += size
    return [g for g in groups if g]


def gptq(float_model: Path, quantized: Path, inputs: dict[str, np.ndarray], samples: int = 128) -> str:
    """Rewrite the integers of ``quantized`` (onnxruntime's quantization of ``float_model``) with GPTQ's, on
    ``samples`` calibration samples, in place; return a note."""
    source = onnx.load(str(float_model))
    constants = {i.name: i for i in source.graph.initializer}
    floats: dict[str, tuple[str, np.ndarray]] = {}  # weight -> (its activation, its values)
    outputs: dict[str, str] = {}                    # MatMul output -> its weight
    for activation, nodes in smoothable_groups(source.graph).items():  # a shared weight has no one Hessian
        for node in nodes:
            floats[node.input[1]] = (activation, numpy_helper.to_array(constants[node.input[1]]))
            outputs[node.output[0]] = node.input[1]
    model = onnx.load(str(quantized))
    found = _int8_weights(model.graph, floats) + _nbits_weights(model.graph, floats, outputs)
    if not found:
        return "GPTQ rounding: no quantized MatMul weight to round"
    count = min(samples, len(next(iter(inputs.values()))))
    readers: dict[str, list[Rounded]] = {}
    for rounded in found:
        readers.setdefault(rounded.activation, []).append(rounded)
    widths = {tensor: floats[group[0].weight][1].shape[0] for tensor, group in readers.items()}
    for group in passes(widths):  # Hessians and factors held one pass at a time: a decoder's can be GBs
        for tensor, hessian in hessians(source, group, inputs, count).items():
            inverse = factor(hessian)
            for rounded in readers[tensor]:
                rounded.store(round_rows(floats[rounded.weight][1], rounded.scale, rounded.zero, rounded.qmin,
                                         rounded.qmax, inverse, rounded.reciprocal))
    onnx.save(model, str(quantized))
    return f"GPTQ rounding: {len(found)} MatMul weight(s) rounded against {count} calibration samples"
