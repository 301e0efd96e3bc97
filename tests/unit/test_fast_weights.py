"""The vectorized per-channel weight quantization writes the bytes onnxruntime's own loops write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from edgeops.compress import fast_weights

applied_here = pytest.mark.skipif(not fast_weights.applies(), reason="not applied on this onnxruntime version")

CHANNEL = st.one_of(
    arrays(np.float32, 6, elements=st.floats(-4, 4, width=32)),
    arrays(np.float32, 6, elements=st.floats(-2**-10, 2**-10, width=32)),        # a tiny range
    arrays(np.float32, 6, elements=st.floats(0, 3, width=32)),               # one sign only
    arrays(np.float32, 6, elements=st.floats(-3, 0, width=32)),
    st.just(np.zeros(6, np.float32)),                                        # a channel of zeros: scale 1
    st.just(np.full(6, 1e-39, np.float32)),                                  # subnormal: below the smallest scale
)
WEIGHTS = st.lists(CHANNEL, min_size=1, max_size=5).map(lambda channels: np.stack(channels, axis=1))  # [6, out]


class Reader:
    def __init__(self, inputs: list[np.ndarray]) -> None:
        self.inputs, self.index = inputs, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.index += 1
        return {"x": self.inputs[self.index - 1]} if self.index <= len(self.inputs) else None

    def rewind(self) -> None:
        self.index = 0


def _matmul_then_conv(weights: np.ndarray, folder: Path) -> Path:
    """x [1, 6] @ W [6, out], then a 1x1 Conv from out to out channels with W's first rows as weights: per-channel
    axis 1, then axis 0."""
    out = weights.shape[1]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("Reshape", ["y", "shape"], ["y4"]),
         helper.make_node("Conv", ["y4", "c"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array([1, out, 1, 1]), "shape"),
         numpy_helper.from_array(np.ascontiguousarray(weights.T[:, :out]).reshape(out, out, 1, 1), "c")])
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _both(quantize) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
    """What onnxruntime's own code writes, then what it writes inside ``vectorized()``."""
    theirs = quantize()
    with fast_weights.vectorized():
        ours = quantize()
    return theirs, ours


@applied_here
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weights=WEIGHTS, weight_type=st.sampled_from(["QInt8", "QUInt8"]), reduce_range=st.booleans(),
       symmetric=st.sampled_from([None, True, False]))
def test_dynamic_quantization_writes_the_same_bytes(tmp_path: Path, weights: np.ndarray, weight_type: str,
                                                    reduce_range: bool, symmetric: bool | None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = _matmul_then_conv(weights, tmp_path), tmp_path / "q.onnx"
    extra = {} if symmetric is None else {"WeightSymmetric": symmetric}

    def quantize() -> bytes:
        quantize_dynamic(src, dst, per_channel=True, weight_type=getattr(QuantType, weight_type),
                         reduce_range=reduce_range, op_types_to_quantize=["MatMul", "Conv"], extra_options=extra)
        return dst.read_bytes()

    theirs, ours = _both(quantize)
    assert ours == theirs


@applied_here
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weights=WEIGHTS, weight_type=st.sampled_from(["QInt8", "QUInt8"]),
       quant_format=st.sampled_from(["QDQ", "QOperator"]), reduce_range=st.booleans())
def test_static_quantization_writes_the_same_bytes(tmp_path: Path, weights: np.ndarray, weight_type: str,
                                                   quant_format: str, reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src, dst = _matmul_then_conv(weights, tmp_path), tmp_path / "q.onnx"
    calibration = [np.random.default_rng(i).standard_normal((1, 6)).astype(np.float32) for i in range(4)]

    def quantize() -> bytes:
        quantize_static(src, dst, Reader(calibration), quant_format=getattr(QuantFormat, quant_format),
                        per_channel=True, weight_type=getattr(QuantType, weight_type), reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, op_types_to_quantize=["MatMul", "Conv"])
        return dst.read_bytes()

    theirs, ours = _both(quantize)
    assert ours == theirs


@applied_here
def test_onnxruntime_is_restored_after_the_block_even_when_nested_or_failing() -> None:
    from onnxruntime.quantization import qdq_quantizer
    from onnxruntime.quantization.base_quantizer import BaseQuantizer

    own = (BaseQuantizer.quantize_weight_per_channel_impl, qdq_quantizer.quantize_onnx_initializer,
           qdq_quantizer.QDQQuantizer._calc_initializer_quant_params)
    with pytest.raises(RuntimeError), fast_weights.vectorized():
        with fast_weights.vectorized():
            assert BaseQuantizer.quantize_weight_per_channel_impl is not own[0]
        assert qdq_quantizer.quantize_onnx_initializer is not own[1]  # the outer block still holds it
        raise RuntimeError("a quantizer failed")
    assert (BaseQuantizer.quantize_weight_per_channel_impl, qdq_quantizer.quantize_onnx_initializer,
            qdq_quantizer.QDQQuantizer._calc_initializer_quant_params) == own


def test_onnxruntime_is_left_alone_on_a_version_not_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxruntime.quantization.base_quantizer import BaseQuantizer

    monkeypatch.setattr(fast_weights, "VERIFIED", ())
    own = BaseQuantizer.quantize_weight_per_channel_impl
    with fast_weights.vectorized():
        assert BaseQuantizer.quantize_weight_per_channel_impl is own


@applied_here
@pytest.mark.parametrize("name", ["assistant_encoder.onnx", "mobile_cnn.onnx", "tiny_lm/model.onnx"])
def test_the_example_models_quantize_to_the_same_bytes(tmp_path: Path, name: str) -> None:
    """Real weights: tens of thousands of channels, where a rounding that differs once shows."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(__file__).parents[2] / "examples" / "models" / name, tmp_path / "q.onnx"

    def quantize() -> bytes:
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm", "Conv"])
        return dst.read_bytes()

    theirs, ours = _both(quantize)
    assert ours == theirs
