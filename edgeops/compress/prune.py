"""The prune step.

* ``magnitude``: zero the smallest weights of large tensors. The dense file and
  a dense runtime are unchanged; only the compressed size shrinks (the report says so).
* ``structured``: remove whole neurons/channels by L2 norm and rewrite both the
  producing and the consuming weight tensors, so the model really gets smaller
  and faster in plain onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeops.compress.steps import Step, StepContext, StepResult
from edgeops.errors import BuildError
from edgeops.manifest.models import PruneOptions

WEIGHTED = {"Conv", "Gemm", "MatMul"}
PASS_THROUGH = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "MaxPool", "AveragePool", "GlobalAveragePool",
                "GlobalMaxPool", "Flatten"}


class Prune(Step[PruneOptions]):
    """Magnitude (zeros that compress) or structured (channels removed) pruning."""

    kind = "prune"

    def run(self, model: Path, ctx: StepContext) -> StepResult:
        options = self.options
        proto = onnx.load(str(model))
        if options.method == "magnitude":
            notes = magnitude(proto, options)
        else:
            notes = structured(proto, options.sparsity)
        dst = ctx.path(f"prune-{options.method}")
        onnx.checker.check_model(proto)
        onnx.save(proto, str(dst))
        return StepResult(dst, notes)


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _replace(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, name))
            return
    raise KeyError(name)


def magnitude(model: onnx.ModelProto, options: PruneOptions) -> list[str]:
    inits = _initializers(model)
    weights = {n.input[1] for n in model.graph.node if n.op_type in WEIGHTED and len(n.input) > 1 and n.input[1] in inits}
    pruned, kept_small, zeroed, total = 0, 0, 0, 0
    for name in sorted(weights):
        array = numpy_helper.to_array(inits[name])
        if not np.issubdtype(array.dtype, np.floating):
            continue
        if array.size < options.min_elements:
            kept_small += 1
            continue
        threshold = np.quantile(np.abs(array), options.sparsity)
        mask = np.abs(array) <= threshold
        _replace(model, name, np.where(mask, 0, array).astype(array.dtype))
        pruned, zeroed, total = pruned + 1, zeroed + int(mask.sum()), total + array.size
    if not pruned:
        raise BuildError(f"magnitude pruning found no weight tensor with at least {options.min_elements} "
                         "elements", hint="lower prune.min_elements")
    return [f"unstructured magnitude pruning: {zeroed}/{total} weights zeroed in {pruned} tensor(s), "
            f"{kept_small} small tensor(s) kept dense",
            "unstructured sparsity shrinks only the compressed (zstd) size: the dense file size and a "
            "dense runtime's latency do not change"]


@dataclass
class Pair:
    producer: onnx.NodeProto
    consumer: onnx.NodeProto
    bias_add: onnx.NodeProto | None   # MatMul followed by Add(bias)
    spatial: int                      # features per unit at the consumer (after Flatten)


def _weight_axes(node: onnx.NodeProto) -> tuple[int, int]:
    """(output-unit axis, input-unit axis) of the node's weight tensor."""
    if node.op_type == "Conv":
        return 0, 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (0, 1) if trans_b else (1, 0)
    return 1, 0  # MatMul [K, N]


def _find_pairs(model: onnx.ModelProto) -> list[Pair]:
    inits = _initializers(model)
    graph_outputs = {o.name for o in model.graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
            uses[name] = uses.get(name, 0) + 1
    shapes = {}
    inferred = onnx.shape_inference.infer_shapes(model)
    for info in list(inferred.graph.value_info) + list(inferred.graph.input):
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]

    def weighted(node: onnx.NodeProto) -> bool:
        if node.op_type not in WEIGHTED or len(node.input) < 2 or node.input[1] not in inits:
            return False
        if uses[node.input[1]] != 1 or len(inits[node.input[1]].dims) < 2:
            return False
        if node.op_type == "Conv" and next((a.i for a in node.attribute if a.name == "group"), 1) != 1:
            return False
        if node.op_type == "Gemm" and next((a.i for a in node.attribute if a.name == "transA"), 0):
            return False
        return True

    pairs = []
    for node in model.graph.node:
        if not weighted(node):
            continue
        value, bias_add, spatial, flattened = node.output[0], None, 1, False
        while True:
            following = consumers.get(value, [])
            if value in graph_outputs or len(following) != 1:
                break
            nxt = following[0]
            if node.op_type == "MatMul" and bias_add is None and nxt.op_type == "Add" and \
                    nxt.input[1] in inits and len(inits[nxt.input[1]].dims) == 1 and nxt.input[0] == value:
                bias_add, value = nxt, nxt.output[0]
                continue
            if nxt.op_type in PASS_THROUGH and nxt.input[0] == value:
                if nxt.op_type == "Flatten":
                    dims = shapes.get(value)
                    known = [d for d in (dims or [])[2:] if d is not None]
                    if not dims or len(known) != len(dims[2:]):
                        break
                    spatial, flattened = (int(np.prod(known)) if len(dims) > 2 else 1), True
                value = nxt.output[0]
                continue
            if weighted(nxt) and nxt.input[0] == value:
                # channels feed a Conv directly; units (or flattened channels) feed a Gemm/MatMul
                fits = (nxt.op_type == "Conv") == (node.op_type == "Conv" and not flattened)
                if fits:
                    pairs.append(Pair(node, nxt, bias_add, spatial))
            break
    return pairs


def structured(model: onnx.ModelProto, sparsity: float) -> list[str]:
    pairs = _find_pairs(model)
    if not pairs:
        raise BuildError("structured pruning found no prunable layer pair (Conv/Gemm/MatMul feeding another "
                         "through only activations, pooling or Flatten)",
                         hint="use prune.method: magnitude, or distill into a smaller student")
    before = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    removed_units, total_units = 0, 0
    for pair in pairs:
        inits = _initializers(model)
        out_axis, _ = _weight_axes(pair.producer)
        weight = numpy_helper.to_array(inits[pair.producer.input[1]])
        units = weight.shape[out_axis]
        keep_count = max(1, int(round(units * (1 - sparsity))))
        norms = np.linalg.norm(np.moveaxis(weight, out_axis, 0).reshape(units, -1), axis=1)
        keep = np.sort(np.argsort(-norms, kind="stable")[:keep_count])
        _replace(model, pair.producer.input[1], np.take(weight, keep, axis=out_axis))
        bias_name = (pair.producer.input[2] if len(pair.producer.input) > 2 and pair.producer.input[2] else None)
        if pair.bias_add is not None:
            bias_name = pair.bias_add.input[1]
        if bias_name and bias_name in inits:
            _replace(model, bias_name, numpy_helper.to_array(inits[bias_name])[keep])
        _, in_axis = _weight_axes(pair.consumer)
        consumer_weight = numpy_helper.to_array(_initializers(model)[pair.consumer.input[1]])
        columns = (keep[:, None] * pair.spatial + np.arange(pair.spatial)[None, :]).reshape(-1)
        _replace(model, pair.consumer.input[1], np.take(consumer_weight, columns, axis=in_axis))
        removed_units += units - keep_count
        total_units += units
    del model.graph.value_info[:]  # shapes inside the graph are stale now
    after = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return [f"structured pruning: removed {removed_units} of {total_units} units/channels by L2 norm in "
            f"{len(pairs)} layer pair(s); parameters {before} -> {after} ({before / max(after, 1):.2f}x fewer)"]
