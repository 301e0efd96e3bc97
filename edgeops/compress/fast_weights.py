"""onnxruntime's per-channel weight quantization, vectorized: the same bytes, without a Python loop per channel.

onnxruntime quantizes each output channel of each weight in a Python loop: in ``quantize_dynamic`` (and the
operator-oriented static format) ``BaseQuantizer.quantize_weight_per_channel_impl``, 1.5 of the 1.8 s a 55 MB
encoder takes, paid by every dynamic candidate of a search; in the Q/DQ static format the scales
(``QDQQuantizer._calc_initializer_quant_params``) and the integers (``quantize_onnx_initializer``), 1.9 of the
5 s. ``vectorized()`` replaces these, for the duration of a block, by code that computes the same scales, zero
points and integers for all channels at once with the same float32/float64 arithmetic. Anything it does not
cover (overrides, 4-bit, 16-bit or float 8 types, blocks, a minimum range, float weights kept) goes to
onnxruntime's own code. Applied only on the onnxruntime versions whose output it was checked to match byte for
byte (``VERIFIED``; tests/unit/test_fast_weights.py compares the installed one's).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx
import onnxruntime

VERIFIED = ("1.32",)  # onnxruntime major.minor versions whose loops this reproduces (the test compares bytes)
COVERED_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
_LOCK = threading.Lock()
_active = 0
_originals: dict[str, Any] = {}


def applies() -> bool:
    return ".".join(onnxruntime.__version__.split(".")[:2]) in VERIFIED


def scales(weights: np.ndarray, axis: int, qmin: np.ndarray, qmax: np.ndarray,
           symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(zero points, scales) per channel along ``axis``, as onnxruntime's ``compute_scale_zp`` computes them one
    channel at a time (the range widened to hold 0; symmetric: around 0; a range too small to divide: scale 1)."""
    moved = np.moveaxis(weights, axis, 0).reshape(weights.shape[axis], -1)
    dtype = weights.dtype
    rmin = np.minimum(moved.min(axis=1), np.array(0, dtype=dtype))
    rmax = np.maximum(moved.max(axis=1), np.array(0, dtype=dtype))
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin, rmax = -absmax, absmax
    scale64 = (rmax.astype(np.float64) - rmin.astype(np.float64)) / (np.float64(qmax) - np.float64(qmin))
    tiny = scale64 < np.finfo(dtype).tiny
    if symmetric:
        zero = np.full(len(scale64), np.round((qmin + qmax) / np.array(2.0, dtype=np.float64)))
    else:
        zero = np.round(qmin - rmin / np.where(tiny, 1.0, scale64))
    return (np.where(tiny, 0, zero).astype(qmin.dtype),
            np.where(tiny, np.array(1.0, dtype=dtype), scale64.astype(dtype)))


def integers(weights: np.ndarray, axis: int, zero: np.ndarray, scale: np.ndarray, qtype: int) -> np.ndarray:
    """``weights`` quantized per channel, as onnxruntime's ``quantize_nparray`` does one channel at a time."""
    from onnxruntime.quantization import quant_utils as qu

    low, high = qu.get_qmin_qmax_for_qType(qtype)
    shape = [1] * weights.ndim
    shape[axis] = -1
    values = (weights.astype(np.float32) / scale.reshape(shape)).round() + zero.reshape(shape)
    np.clip(values, low, high, out=values)
    quantized: np.ndarray = values.astype(zero.dtype)
    return quantized


def _per_channel_impl(self: Any, weight_name: str, weight_qType: int, channel_axis: int, reduce_range: bool = True,
                      keep_float_weight: bool = False) -> Any:
    """``BaseQuantizer.quantize_weight_per_channel_impl``, vectorized where covered."""
    from onnxruntime.quantization import quant_utils as qu

    original = _originals["per_channel_impl"]
    initializer = qu.find_by_name(weight_name, self.model.initializer())
    if initializer is None or keep_float_weight or self.min_real_range is not None or \
            weight_qType not in COVERED_TYPES or self.tensor_quant_overrides.get_per_channel_overrides(weight_name):
        return original(self, weight_name, weight_qType, channel_axis, reduce_range, keep_float_weight)
    weights = qu.tensor_proto_to_array(initializer)
    valid, axis = qu.normalize_axis(channel_axis, weights.ndim)
    if not valid or weights.dtype != np.float32:
        return original(self, weight_name, weight_qType, channel_axis, reduce_range, keep_float_weight)
    symmetric = self.is_weight_symmetric(weight_qType)
    qmin, qmax = qu.get_qmin_qmax_for_qType(weight_qType, self.reduce_range and reduce_range, symmetric=symmetric)
    zero, scale = scales(weights, axis, qmin, qmax, symmetric)
    names = weight_name + "_quantized", weight_name + "_zero_point", weight_name + "_scale"
    self.model.initializer_extend([
        onnx.helper.make_tensor(names[2], initializer.data_type, [initializer.dims[axis]], scale.tolist()),
        onnx.helper.make_tensor(names[1], weight_qType, [initializer.dims[axis]], zero.tolist()),
        onnx.numpy_helper.from_array(integers(weights, axis, zero, scale, weight_qType).reshape(initializer.dims),
                                     names[0])])
    return names


def _qdq_initializer_params(self: Any) -> dict[str, Any]:
    """``QDQQuantizer._calc_initializer_quant_params``: onnxruntime's for what it is not covered here, the
    per-channel weights without overrides vectorized."""
    from onnxruntime.quantization import quant_utils as qu
    from onnxruntime.quantization.base_quantizer import QuantizationParams
    from onnxruntime.quantization.qdq_quantizer import QDQQuantTensorType

    ours: dict[str, tuple[np.ndarray, int, int]] = {}
    if self.min_real_range is None and not self.block_size:
        for name, info in self.tensors_to_quantize.items():
            initializer = qu.find_by_name(name, self.model.initializer())
            if initializer is None or info.axis is None or name in self.tensor_quant_overrides.overrides or \
                    info.tensor_type is not QDQQuantTensorType.WEIGHT or self.weight_qType not in COVERED_TYPES:
                continue
            data = qu.tensor_proto_to_array(initializer)
            valid, axis = qu.normalize_axis(info.axis, data.ndim)
            if valid and data.dtype == np.float32:
                ours[name] = (data, axis, self.weight_qType)
    everything = self.tensors_to_quantize
    self.tensors_to_quantize = {k: v for k, v in everything.items() if k not in ours}
    try:
        params = _originals["qdq_params"](self)
    finally:
        self.tensors_to_quantize = everything
    for name, (data, axis, qtype) in ours.items():  # per-channel weights are always symmetric there
        qmin, qmax = qu.get_qmin_qmax_for_qType(qtype, self.reduce_range, symmetric=True)
        zero, scale = scales(data, axis, qmin, qmax, symmetric=True)
        params[name] = QuantizationParams(zero_point=zero, scale=scale, quant_type=qtype, axis=axis)
    order = {name: index for index, name in enumerate(everything)}  # onnxruntime's own order, as it would give
    return dict(sorted(params.items(), key=lambda item: order[item[0]]))


def _qdq_initializer(weight: onnx.TensorProto, quant_type: int, zero_point: np.ndarray, scale: np.ndarray,
                     axis: int | None = None, quant_weight_name: str | None = None,
                     block_size: int = 0) -> Any:
    """``quantize_onnx_initializer`` as the Q/DQ quantizer calls it, vectorized for per-channel 8-bit weights."""
    from onnxruntime.quantization import quant_utils as qu

    if axis is None or block_size or quant_type not in COVERED_TYPES or scale.dtype != np.float32:
        return _originals["qdq_initializer"](weight, quant_type, zero_point, scale, axis, quant_weight_name,
                                             block_size=block_size)
    data = qu.tensor_proto_to_array(weight)
    return onnx.numpy_helper.from_array(integers(data, axis, zero_point, scale, quant_type).reshape(weight.dims),
                                        quant_weight_name or f"{weight.name}_quantized")


def _swap(install: bool) -> None:
    from onnxruntime.quantization import qdq_quantizer
    from onnxruntime.quantization.base_quantizer import BaseQuantizer

    if install:
        _originals.update(per_channel_impl=BaseQuantizer.quantize_weight_per_channel_impl,
                          qdq_params=qdq_quantizer.QDQQuantizer._calc_initializer_quant_params,
                          qdq_initializer=qdq_quantizer.quantize_onnx_initializer)
        BaseQuantizer.quantize_weight_per_channel_impl = _per_channel_impl
        qdq_quantizer.QDQQuantizer._calc_initializer_quant_params = _qdq_initializer_params
        qdq_quantizer.quantize_onnx_initializer = _qdq_initializer
    else:
        BaseQuantizer.quantize_weight_per_channel_impl = _originals["per_channel_impl"]
        qdq_quantizer.QDQQuantizer._calc_initializer_quant_params = _originals["qdq_params"]
        qdq_quantizer.quantize_onnx_initializer = _originals["qdq_initializer"]


@contextmanager
def vectorized() -> Iterator[None]:
    """onnxruntime's per-channel weight loops replaced by the vectorized ones for the block (where ``applies()``;
    blocks may nest and run in threads: the last one out restores onnxruntime's)."""
    global _active
    if not applies():
        yield
        return
    with _LOCK:
        _active += 1
        if _active == 1:
            _swap(install=True)
    try:
        yield
    finally:
        with _LOCK:
            _active -= 1
            if _active == 0:
                _swap(install=False)
