"""Make a model deliberately slower without changing its outputs (for rollout tests and benchmarks).

A side branch reads the input, runs a chain of dense MatMuls, is multiplied by
zero and added to the first output: the answers stay the same, the work grows
with ``width`` and ``depth``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _with_slow_branch(src: Path, dst: Path, flatten: list[onnx.NodeProto], features: int, width: int, depth: int,
                      seed: int) -> Path:
    """``src`` with a branch from ``flatten``'s output ``slow_flat`` [*, features] through ``depth`` dense layers,
    summed, times zero, added to the first output."""
    model = onnx.load(str(src))
    graph = model.graph
    rng = np.random.default_rng(seed)
    output = graph.output[0].name
    inner = output + "_before_slow_branch"
    for node in graph.node:
        node.output[:] = [inner if o == output else o for o in node.output]
    nodes = [*flatten, helper.make_node("MatMul", ["slow_flat", "slow_w0"], ["slow_h0"])]
    inits = [numpy_helper.from_array(rng.standard_normal((features, width)).astype(np.float32) * 0.01, "slow_w0")]
    current = "slow_h0"
    for layer in range(1, depth):
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) * 0.01,
                                             f"slow_w{layer}"))
        nodes.append(helper.make_node("MatMul", [current, f"slow_w{layer}"], [f"slow_h{layer}"]))
        current = f"slow_h{layer}"
    inits.append(numpy_helper.from_array(np.zeros((1,), np.float32), "slow_zero"))
    nodes += [helper.make_node("ReduceSum", [current], ["slow_sum"], keepdims=1),
              helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nothing"]),
              helper.make_node("Add", [inner, "slow_nothing"], [output])]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    del graph.value_info[:]
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def make_slower(src: Path, dst: Path, width: int, depth: int = 1, seed: int = 0) -> Path:
    first = onnx.load(str(src), load_external_data=False).graph.input[0]
    features = int(np.prod([d.dim_value for d in first.type.tensor_type.shape.dim[1:]]))
    flatten = [helper.make_node("Flatten", [first.name], ["slow_flat"], axis=1)]
    return _with_slow_branch(src, dst, flatten, features, width, depth, seed)


def make_slower_decoder(src: Path, dst: Path, width: int, depth: int, seed: int = 0) -> Path:
    """A decoder (``input_ids`` first, ``logits`` first out) with the same tokens but slower steps: the branch
    starts from the sum of the input ids."""
    ids = onnx.load(str(src), load_external_data=False).graph.input[0].name
    flatten = [helper.make_node("Cast", [ids], ["slow_ids"], to=onnx.TensorProto.FLOAT),
               helper.make_node("ReduceSum", ["slow_ids"], ["slow_flat"], keepdims=1)]
    return _with_slow_branch(src, dst, flatten, 1, width, depth, seed)


def make_heavier(src: Path, dst: Path, megabytes: int, seed: int = 0) -> Path:
    """``src`` with the same outputs and almost the same speed, but ``megabytes`` more weights that a session
    must hold in memory (a table read one row at a time): a model too big for a small device."""
    model = onnx.load(str(src))
    graph = model.graph
    output = graph.output[0].name
    inner = output + "_before_heavy_branch"
    for node in graph.node:
        node.output[:] = [inner if o == output else o for o in node.output]
    rows = megabytes * 2**20 // (64 * 4)
    table = np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)  # random: not compressible
    graph.initializer.extend([numpy_helper.from_array(table, "heavy_table"),
                              numpy_helper.from_array(np.zeros((1,), np.int64), "heavy_row"),
                              numpy_helper.from_array(np.zeros((1,), np.float32), "heavy_zero")])
    graph.node.extend([helper.make_node("Gather", ["heavy_table", "heavy_row"], ["heavy_picked"], axis=0),
                       helper.make_node("ReduceSum", ["heavy_picked"], ["heavy_sum"], keepdims=0),
                       helper.make_node("Mul", ["heavy_sum", "heavy_zero"], ["heavy_nothing"]),
                       helper.make_node("Add", [inner, "heavy_nothing"], [output])])
    del graph.value_info[:]
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def make_memory_hungry(src: Path, dst: Path, megabytes: int) -> Path:
    """``src`` with the same outputs, a file as small as before, but a tensor of ``megabytes`` made while it
    runs (ConstantOfShape): a model that does not fit a small device's memory yet crosses a slow link quickly."""
    model = onnx.load(str(src))
    graph = model.graph
    output = graph.output[0].name
    inner = output + "_before_hungry_branch"
    for node in graph.node:
        node.output[:] = [inner if o == output else o for o in node.output]
    graph.initializer.extend([numpy_helper.from_array(np.array([megabytes * 2**20 // 256, 64], np.int64),
                                                      "hungry_shape"),
                              numpy_helper.from_array(np.zeros((1,), np.float32), "hungry_zero")])
    graph.node.extend([helper.make_node("ConstantOfShape", ["hungry_shape"], ["hungry_block"],
                                        value=numpy_helper.from_array(np.ones((1,), np.float32))),
                       helper.make_node("ReduceSum", ["hungry_block"], ["hungry_sum"], keepdims=0),
                       helper.make_node("Mul", ["hungry_sum", "hungry_zero"], ["hungry_nothing"]),
                       helper.make_node("Add", [inner, "hungry_nothing"], [output])])
    del graph.value_info[:]
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


if __name__ == "__main__":
    import sys
    import time

    import onnxruntime as ort

    base = Path(sys.argv[1])
    for width, depth in [(256, 1), (512, 2), (1024, 4)]:
        out = make_slower(base, Path(f"/tmp/slow-{width}-{depth}.onnx"), width, depth)
        for path in (base, out):
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            x = {s.get_inputs()[0].name: np.random.rand(1, 3, 128).astype(np.float32)}
            for _ in range(50):
                s.run(None, x)
            t = time.perf_counter()
            for _ in range(500):
                s.run(None, x)
            print(path.name, f"{(time.perf_counter() - t) / 500 * 1e3:.4f} ms")


def make_mislabelled(src: Path, dst: Path, shift: int = 1) -> Path:
    """The same model with its last layer's classes rotated by ``shift``: as fast, as large, and as close to
    itself after quantization as the original, but wrong on nearly every labelled sample (a model swapped for
    a worse one that every build gate passes)."""
    model = onnx.load(str(src))
    graph = model.graph
    last = next(n for n in reversed(graph.node) if n.op_type in ("Gemm", "MatMul"))
    inits = {i.name: i for i in graph.initializer}
    for name in last.input[1:]:
        if name not in inits:
            continue
        array = numpy_helper.to_array(inits[name])
        transposed = last.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in last.attribute)
        axis = 0 if array.ndim == 1 or transposed else array.ndim - 1
        inits[name].CopyFrom(numpy_helper.from_array(np.roll(array, shift, axis=axis), name))
    onnx.save(model, str(dst))
    return dst
