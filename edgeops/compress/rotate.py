"""Activations rotated before int8 (block Hadamard, after QuaRot, Ashkboos et al. 2024), as an exact float rewrite.

A MatMul ``X @ W`` equals ``(X @ R) @ (Rᵀ @ W)`` for any orthogonal ``R``. With ``R`` block-diagonal, each
block a normalised Hadamard matrix of size ``b``, ``X @ R`` spreads every channel of ``X`` over the ``b``
channels of its block: an outlier channel ``o`` times the others becomes ``b`` channels near ``o/√b``, so
the per-tensor int8 range dynamic quantization picks at run time shrinks and the ordinary channels get more
levels. ``Rᵀ @ W`` is folded into the weight (quantized per output channel as before). Unlike smoothing, which
moves the range into the weights, the rotation removes it; unlike an outlier split, nothing is multiplied in
float but the rotation itself: per activation, ``Reshape → MatMul by the b×b block → Reshape`` (a float MatMul
of ``b/K`` the cost of a dense one, named ``EdgeopsRotate_*`` so quantization leaves it float). A LayerNorm
output also feeds the residual, so the rotation cannot be folded into the layer before, as QuaRot does for
RMSNorm models; it runs on the activation at run time, once for every MatMul that reads it (Q, K and V read one
tensor). In float the model computes the same function, to rounding (tests check it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeops.compress.smooth import smoothable_groups

FLOAT_PREFIX = "EdgeopsRotate_"


def hadamard(size: int) -> np.ndarray:
    """The normalised Hadamard matrix of a power-of-two ``size`` (Sylvester's construction): orthogonal."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Hadamard block needs a power-of-two size, not {size}")
    matrix = np.ones((1, 1))
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    normalised: np.ndarray = (matrix / np.sqrt(size)).astype(np.float32)
    return normalised


def rotate(src: Path, dst: Path, block: int = 64) -> str:
    """Write ``src`` with the activations of its MatMuls (constant weights, a multiple of ``block`` rows)
    rotated by block Hadamard matrices to ``dst``; return a note."""
    model = onnx.load(str(src))
    graph = model.graph
    groups = smoothable_groups(graph)
    initializers = {i.name: i for i in graph.initializer}
    position = {id(node): index for index, node in enumerate(graph.node)}
    rotation = hadamard(block)
    matrix = f"edgeops_rotate_hadamard_{block}"  # one initializer for every activation
    shapes: dict[int, str] = {}  # channels -> the [-1, blocks, block] shape initializer
    inserts: list[tuple[int, list[onnx.NodeProto]]] = []
    rotated = 0
    for number, (tensor, nodes) in enumerate(sorted(groups.items())):
        weights = {n.input[1]: numpy_helper.to_array(initializers[n.input[1]]) for n in nodes}
        rows = {w.shape[0] for w in weights.values()}
        if len(rows) != 1 or next(iter(rows)) % block:
            continue
        channels = next(iter(rows))
        for name, weight in weights.items():  # Rᵀ @ W, one block of rows at a time
            folded = np.einsum("ji,bjn->bin", rotation, weight.reshape(channels // block, block, -1))
            initializers[name].CopyFrom(numpy_helper.from_array(folded.reshape(weight.shape).astype(weight.dtype),
                                                                name))
        if not shapes:
            graph.initializer.append(numpy_helper.from_array(rotation, matrix))
        if channels not in shapes:
            shapes[channels] = f"edgeops_rotate_blocks_{channels}"
            graph.initializer.append(numpy_helper.from_array(np.array([-1, channels // block, block], np.int64),
                                                             shapes[channels]))
        out = f"{tensor}_rotated"
        first = min(position[id(n)] for n in nodes)
        inserts.append((first, [
            onnx.helper.make_node("Shape", [tensor], [f"{out}_shape"], name=f"EdgeopsRotateShape_{number}"),
            onnx.helper.make_node("Reshape", [tensor, shapes[channels]], [f"{out}_blocks"],
                                  name=f"EdgeopsRotateSplit_{number}"),
            onnx.helper.make_node("MatMul", [f"{out}_blocks", matrix], [f"{out}_turned"],
                                  name=f"{FLOAT_PREFIX}{number}"),
            onnx.helper.make_node("Reshape", [f"{out}_turned", f"{out}_shape"], [out],
                                  name=f"EdgeopsRotateJoin_{number}")]))
        for node in nodes:
            node.input[0] = out
        rotated += len(nodes)
    for index, new in sorted(inserts, key=lambda item: -item[0]):
        for node in reversed(new):
            graph.node.insert(index, node)
    onnx.save(model, str(dst))
    if not inserts:
        return f"rotation: no MatMul with a constant weight of a multiple of {block} rows"
    return (f"rotation (block Hadamard, {block} channels): {len(inserts)} activation(s) feeding {rotated} MatMul(s) "
            "rotated at run time, the inverse folded into their weights")
