"""Outlier channels multiplied in float beside an int8 MatMul (LLM.int8()'s decomposition, Dettmers et al.
2022), as an exact float graph rewrite.

Dynamic int8 quantizes a MatMul's activation with one range per tensor at run time. A transformer's few
outlier channels (tens of times the median channel) set that range and leave every other channel a handful
of levels; keeping the whole MatMul float (mixed precision) gives up its int8 speed. Instead, for a MatMul
``X @ W`` with a constant weight, the channels of ``X`` whose calibration maximum exceeds ``ratio`` times
the median channel's (at most one in 16) are split off:

    X @ W = (X * mask) @ W_in  +  Gather(X, idx) @ W[idx]

``mask`` zeroes the outlier channels, so the int8 range of ``X * mask`` covers the ordinary ones; ``W_in`` is
``W`` with the outlier rows zeroed (tighter per-column weight scales); the second product is a float MatMul
over a few channels (``EdgeopsOutlierMatMul_*``, excluded from quantization). In float the model computes the
same function, to rounding (tests check it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeops.compress.smooth import activation_maxima

FLOAT_PREFIX = "EdgeopsOutlierMatMul_"
MAX_SHARE = 16  # at most one channel in 16 goes float: beyond that the float part costs what int8 saves


def float_parts(graph: onnx.GraphProto) -> list[str]:
    """Names of the float MatMuls a split or a rotation added (quantization must leave them float)."""
    from edgeops.compress.rotate import FLOAT_PREFIX as ROTATION

    return [n.name for n in graph.node if n.name.startswith((FLOAT_PREFIX, ROTATION))]


def outlier_channels(maxima: np.ndarray, ratio: float) -> list[int]:
    """The channels whose maximum exceeds ``ratio`` times the median channel's, largest first, at most one in
    ``MAX_SHARE`` (none for fewer than ``MAX_SHARE`` channels), in channel order."""
    count = maxima.size
    median = float(np.median(maxima)) if count else 0.0
    if count < MAX_SHARE or median <= 0:
        return []
    largest = np.argsort(-maxima, kind="stable")[:count // MAX_SHARE]
    return sorted(int(i) for i in largest if maxima[i] > ratio * median)


def split_outliers(src: Path, dst: Path, inputs: dict[str, np.ndarray], ratio: float = 6.0,
                   samples: int = 32) -> str:
    """Write ``src`` with the outlier channels of its MatMul activations split off to ``dst``; return a note."""
    model, groups, maxima = activation_maxima(src, inputs, samples)
    graph = model.graph
    if not groups:
        onnx.save(model, str(dst))
        return "outlier split: no MatMul with a constant weight"
    initializers = {i.name: i for i in graph.initializer}
    position = {id(node): index for index, node in enumerate(graph.node)}
    inserts: list[tuple[int, list[onnx.NodeProto]]] = []
    split, channels = 0, 0
    for number, (tensor, nodes) in enumerate(sorted(groups.items())):
        weights = {n.input[1]: numpy_helper.to_array(initializers[n.input[1]]) for n in nodes}
        if any(w.shape[0] != maxima[tensor].size for w in weights.values()):
            continue
        chosen = outlier_channels(maxima[tensor], ratio)
        if not chosen:
            continue
        mask = np.ones(maxima[tensor].size, np.float32)
        mask[chosen] = 0.0
        mask_name, index_name = f"edgeops_outlier_mask_{number}", f"edgeops_outlier_index_{number}"
        graph.initializer.extend([numpy_helper.from_array(mask, mask_name),
                                  numpy_helper.from_array(np.array(chosen, np.int64), index_name)])
        inliers, outliers = f"{tensor}_inliers", f"{tensor}_outliers"
        first = min(position[id(n)] for n in nodes)
        inserts.append((first, [
            onnx.helper.make_node("Mul", [tensor, mask_name], [inliers], name=f"EdgeopsOutlierMask_{number}"),
            onnx.helper.make_node("Gather", [tensor, index_name], [outliers], axis=-1,
                                  name=f"EdgeopsOutlierGather_{number}")]))
        for part, node in enumerate(nodes):
            weight = weights[node.input[1]]
            rows = f"{node.input[1]}_outlier_rows"
            graph.initializer.append(numpy_helper.from_array(weight[chosen, :].astype(weight.dtype), rows))
            kept = weight.copy()
            kept[chosen, :] = 0
            initializers[node.input[1]].CopyFrom(numpy_helper.from_array(kept, node.input[1]))
            output = node.output[0]
            node.input[0], node.output[0] = inliers, f"{output}_inliers"
            inserts.append((position[id(node)] + 1, [
                onnx.helper.make_node("MatMul", [outliers, rows], [f"{output}_outliers"],
                                      name=f"{FLOAT_PREFIX}{number}_{part}"),
                onnx.helper.make_node("Add", [f"{output}_inliers", f"{output}_outliers"], [output],
                                      name=f"EdgeopsOutlierAdd_{number}_{part}")]))
            split += 1
        channels += len(chosen)
    for index, new in sorted(inserts, key=lambda item: -item[0]):
        for node in reversed(new):
            graph.node.insert(index, node)
    _sort_topologically(graph)
    onnx.save(model, str(dst))
    return (f"outlier split (LLM.int8()): {channels} channel(s) above {ratio:g}x their activation's median maximum "
            f"multiplied in float beside {split} int8 MatMul(s), on "
            f"{min(samples, len(next(iter(inputs.values()))))} calibration samples")


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder the nodes so each comes after the producers of its inputs, keeping the given order otherwise
    (two inserts at one place may depend on each other: a MatMul output another split reads)."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    done: set[int] = set()
    order: list[int] = []

    def visit(i: int) -> None:
        stack = [(i, False)]
        while stack:
            current, expanded = stack.pop()
            if current in done:
                continue
            if expanded:
                done.add(current)
                order.append(current)
                continue
            stack.append((current, True))
            for name in reversed(nodes[current].input):
                before = producer.get(name)
                if before is not None and before not in done and before != current:
                    stack.append((before, False))

    for i in range(len(nodes)):
        visit(i)
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
