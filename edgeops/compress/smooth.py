"""Activation smoothing before int8 (SmoothQuant, Xiao et al. 2023), as an exact float graph rewrite.

A MatMul ``X @ W`` equals ``(X / s) @ (s · W)`` for any positive per-input-channel ``s``. Transformers put a
few channels of ``X`` tens of times above the rest ("outlier dimensions"), so a per-tensor int8 range
for ``X`` (what dynamic quantization picks at run time) leaves the other channels a handful of levels.
Choosing ``s_j = max|X_j|^α / max|W_j|^(1-α)`` moves that range into the weights, which are quantized
per output channel and have room for it. The rewrite inserts one ``Mul`` by ``1/s`` per activation
(shared by every MatMul that reads it: Q, K and V read one tensor) and scales the weight rows; in float
the model computes the same function (to rounding), which ``tests`` check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeops.compress.evaluate import probe_session


def smoothable_groups(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Activation tensor -> the MatMuls that multiply it by a constant 2-D weight used nowhere else."""
    initializers = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        activation, weight = node.input
        if activation in initializers or weight not in initializers or uses[weight] != 1:
            continue
        if len(initializers[weight].dims) == 2:
            groups.setdefault(activation, []).append(node)
    return groups  # other readers of a tensor (a residual Add) keep reading it unscaled


def channel_maxima(model: onnx.ModelProto, tensors: list[str], inputs: dict[str, np.ndarray],
                   samples: int) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor over the first ``samples`` samples (one run each)."""
    session = probe_session(model, tensors)
    names = [o.name for o in session.get_outputs()]
    wanted = [names.index(t) for t in tensors]
    maxima = {t: np.zeros(0) for t in tensors}
    count = min(samples, len(next(iter(inputs.values()))))
    for i in range(count):
        outputs = session.run(None, {k: v[i:i + 1] for k, v in inputs.items()})
        for tensor, index in zip(tensors, wanted):
            seen = np.abs(outputs[index]).reshape(-1, outputs[index].shape[-1]).max(axis=0)
            maxima[tensor] = seen if not maxima[tensor].size else np.maximum(maxima[tensor], seen)
    return maxima


def activation_maxima(src: Path, inputs: dict[str, np.ndarray], samples: int,
                      ) -> tuple[onnx.ModelProto, dict[str, list[onnx.NodeProto]], dict[str, np.ndarray]]:
    """(the model, its ``smoothable_groups``, each group's activation maxima per channel): what a rewrite of
    MatMul activations (smoothing, an outlier split) starts from; no groups, no model run."""
    model = onnx.load(str(src))
    groups = smoothable_groups(model.graph)
    return model, groups, channel_maxima(model, sorted(groups), inputs, samples) if groups else {}


def smooth(src: Path, dst: Path, inputs: dict[str, np.ndarray], alpha: float = 0.5, samples: int = 32) -> str:
    """Write ``src`` with its MatMul activations smoothed by strength ``alpha`` to ``dst``; return a note."""
    model, groups, maxima = activation_maxima(src, inputs, samples)
    graph = model.graph
    if not groups:
        onnx.save(model, str(dst))
        return "smoothing: no MatMul with a constant weight to smooth"
    initializers = {i.name: i for i in graph.initializer}
    position = {id(node): index for index, node in enumerate(graph.node)}
    inserts: list[tuple[int, onnx.NodeProto]] = []
    for number, (tensor, nodes) in enumerate(sorted(groups.items())):
        weights = {n.input[1]: numpy_helper.to_array(initializers[n.input[1]]) for n in nodes}
        w_max = np.max([np.abs(w).max(axis=1) for w in weights.values()], axis=0)
        x_max = maxima[tensor]
        if x_max.shape != w_max.shape:
            continue
        scale = np.where((x_max > 0) & (w_max > 0),
                         np.power(np.maximum(x_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha),
                         1.0).astype(np.float32)
        scale = np.clip(scale, 1e-2, 1e2)
        for name, w in weights.items():
            initializers[name].CopyFrom(numpy_helper.from_array((w * scale[:, None]).astype(w.dtype), name))
        divisor = f"edgeops_smooth_{number}"
        smoothed = f"{tensor}_smoothed"
        graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), divisor))
        for node in nodes:
            node.input[0] = smoothed
        first = min(position[id(n)] for n in nodes)
        inserts.append((first, onnx.helper.make_node("Mul", [tensor, divisor], [smoothed], name=f"EdgeopsSmooth_{number}")))
    for index, node in sorted(inserts, key=lambda item: -item[0]):
        graph.node.insert(index, node)
    onnx.save(model, str(dst))
    return (f"smoothing (SmoothQuant, alpha {alpha:g}): {len(inserts)} activation(s) feeding "
            f"{sum(len(groups[t]) for t in groups)} MatMul(s) rescaled per channel on {min(samples, len(next(iter(inputs.values()))))} "
            "calibration samples")
