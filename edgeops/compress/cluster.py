"""The cluster step: weight sharing by k-means (cf. Deep Compression's trained quantization, without the
retraining).

Each large float weight of a Conv, Gemm or MatMul keeps ``centroids`` distinct values. It is stored as a
uint8 index per weight plus a float codebook, and rebuilt by ``Gather(codebook, Cast(indices))`` — constant
inputs only, so onnxruntime folds it into the dense weight once, when it loads the model: the file is about
4x smaller (more under zstd: 16 centroids leave about 4 bits of information per index), inference runs the
dense weight at the same speed. Zeros from a prune step stay exactly zero (one centroid is pinned there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeops.compress.steps import Step, StepContext, StepResult
from edgeops.errors import BuildError
from edgeops.manifest.models import ClusterOptions

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def kmeans_1d(values: npt.NDArray[np.float32], k: int, iterations: int,
              pinned_zero: bool) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """(codebook, index per value): Lloyd's algorithm in one dimension, started from quantiles (dense where
    the weights are), each assignment by the midpoints between sorted centroids."""
    flat = values.astype(np.float64).ravel()
    distinct = np.unique(flat)
    if distinct.size <= k:  # already few values: the codebook is exact
        codebook = distinct
    else:
        codebook = np.unique(np.quantile(flat, (np.arange(k) + 0.5) / k))
        for _ in range(iterations):
            if pinned_zero:
                codebook[np.argmin(np.abs(codebook))] = 0.0
            codebook = np.sort(codebook)
            index = np.searchsorted((codebook[1:] + codebook[:-1]) / 2, flat)
            sums = np.bincount(index, weights=flat, minlength=codebook.size)
            counts = np.bincount(index, minlength=codebook.size)
            moved = np.where(counts > 0, sums / np.maximum(counts, 1), codebook)
            if np.allclose(moved, codebook, rtol=0, atol=1e-12):
                break
            codebook = moved
        if pinned_zero:
            codebook[np.argmin(np.abs(codebook))] = 0.0
        codebook = np.sort(codebook)
    index = np.searchsorted((codebook[1:] + codebook[:-1]) / 2, flat)
    return codebook.astype(np.float32), index.astype(np.uint8).reshape(values.shape)


def _weights(model: onnx.ModelProto, min_elements: int) -> list[str]:
    """Float initializers that are the weight of a Conv, Gemm or MatMul, used only there, large enough."""
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    found = []
    for node in model.graph.node:
        if node.op_type not in WEIGHTED:
            continue
        for name in node.input[:2]:
            tensor = inits.get(name)
            if tensor is None or tensor.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
                continue
            size = int(np.prod(tensor.dims)) if tensor.dims else 1
            if size >= max(min_elements, 1) and len(tensor.dims) >= 2 and name not in found:
                found.append(name)
    return found


def cluster(model: onnx.ModelProto, options: ClusterOptions) -> tuple[int, int, float]:
    """Rewrite ``model`` in place; (tensors clustered, weights shared, worst relative error of a tensor)."""
    names = _weights(model, options.min_elements)
    inits = {t.name: t for t in model.graph.initializer}
    kept = [t for t in model.graph.initializer if t.name not in names]
    nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    shared, worst = 0, 0.0
    for name in names:
        array = numpy_helper.to_array(inits[name])
        dtype = array.dtype
        weights = array.astype(np.float32)
        pinned = options.keep_zeros and bool((weights == 0).any())
        if options.per == "channel":
            rows = weights.reshape(weights.shape[0], -1)
            books, indices = zip(*(kmeans_1d(row, options.centroids, options.iterations, pinned) for row in rows))
            width = max(b.size for b in books)
            codebook = np.stack([np.pad(b, (0, width - b.size), mode="edge") for b in books])
            index = np.stack(indices).reshape(weights.shape)
            rebuilt = codebook[np.arange(rows.shape[0])[:, None], np.stack(indices)].reshape(weights.shape)
            offsets = (np.arange(weights.shape[0], dtype=np.int64) * width).reshape(
                (-1,) + (1,) * (weights.ndim - 1))
            flat_book = codebook.ravel()
        else:
            flat_book, index = kmeans_1d(weights, options.centroids, options.iterations, pinned)
            rebuilt = flat_book[index]
            offsets = None
        scale = float(np.linalg.norm(weights)) or 1.0
        worst = max(worst, float(np.linalg.norm(rebuilt - weights)) / scale)
        base = f"{name}__shared"
        new_inits += [numpy_helper.from_array(flat_book.astype(dtype), f"{base}_codebook"),
                      numpy_helper.from_array(index.astype(np.uint8), f"{base}_indices")]
        position = f"{base}_positions"
        nodes.append(helper.make_node("Cast", [f"{base}_indices"], [position], to=TensorProto.INT64,
                                      name=f"{base}_cast"))
        if offsets is not None:
            new_inits.append(numpy_helper.from_array(offsets, f"{base}_offsets"))
            nodes.append(helper.make_node("Add", [position, f"{base}_offsets"], [f"{base}_rows"],
                                          name=f"{base}_offset"))
            position = f"{base}_rows"
        nodes.append(helper.make_node("Gather", [f"{base}_codebook", position], [name], axis=0,
                                      name=f"{base}_gather"))
        shared += weights.size
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_inits)
    inputs = [i for i in model.graph.input if i.name not in names]  # old IRs list initializers as inputs too
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    graph_nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + graph_nodes)  # the rebuilt weights come before every use
    return len(names), shared, worst


class Cluster(Step[ClusterOptions]):
    """Weight sharing by k-means; see the module docstring."""

    kind = "cluster"

    def run(self, model: Path, ctx: StepContext) -> StepResult:
        proto = onnx.load(str(model))
        tensors, shared, worst = cluster(proto, self.options)
        if not tensors:
            raise BuildError(f"weight sharing found no float weight tensor of a Conv, Gemm or MatMul with at least "
                             f"{self.options.min_elements} elements", hint="lower cluster.min_elements")
        onnx.checker.check_model(proto)
        dst = ctx.path(f"cluster-{self.options.centroids}")
        onnx.save(proto, str(dst))
        codebook = "one codebook per tensor" if self.options.per == "tensor" else "one codebook per output channel"
        return StepResult(dst, [f"weight sharing: {shared:,} weights in {tensors} tensor(s) take "
                                f"{self.options.centroids} values each ({codebook}), stored as uint8 indices; "
                                f"worst relative error of a tensor {worst:.3g}",
                                "onnxruntime rebuilds the dense weights when it loads the model: the file and "
                                "the release shrink, memory and speed at inference do not change"])
