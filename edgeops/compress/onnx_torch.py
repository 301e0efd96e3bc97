"""Run a small ONNX graph as a trainable torch module (for fine-tuning a pruned or user-supplied student).

Covers the ops that MLPs and CNNs export to; anything else is a clear BuildError.
Imported only by the distill step: the core package never imports torch.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from edgeops.errors import BuildError

SUPPORTED = {"Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Sigmoid", "Tanh",
             "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose", "Softmax",
             "Identity", "Concat", "BatchNormalization", "Constant"}


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pads(attrs: dict[str, Any], dims: int) -> list[int]:
    pads = list(attrs.get("pads", [0] * 2 * dims))
    if pads[:dims] != pads[dims:]:
        raise BuildError("asymmetric padding is not supported when training an ONNX student")
    return pads[:dims]


class OnnxModule(torch.nn.Module):
    """The graph's float initializers become parameters; nodes run in order with torch ops."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        unsupported = sorted({n.op_type for n in graph.node} - SUPPORTED)
        if unsupported:
            raise BuildError(f"cannot train this ONNX student: unsupported op(s) {', '.join(unsupported)}",
                             hint="use a student family (mlp, cnn1d, cnn2d) or a torch factory")
        self.graph = graph
        self.params = torch.nn.ParameterDict()
        self.consts: dict[str, torch.Tensor] = {}
        self.names: dict[str, str] = {}
        for index, init in enumerate(graph.initializer):
            array = numpy_helper.to_array(init)
            if np.issubdtype(array.dtype, np.floating):
                key = f"p{index}"
                self.names[init.name] = key
                self.params[key] = torch.nn.Parameter(torch.from_numpy(array.astype(np.float32).copy()))
            else:
                self.consts[init.name] = torch.from_numpy(array.copy())
        initialized = {i.name for i in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in initialized]
        self.outputs = [o.name for o in graph.output]

    def _value(self, values: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name in values:
            return values[name]
        if name in self.names:
            param: torch.Tensor = self.params[self.names[name]]
            return param
        return self.consts[name]

    def forward(self, *args: torch.Tensor) -> Any:  # noqa: C901 - one branch per op is the clearest form
        values = dict(zip(self.inputs, args))
        for node in self.graph.node:
            # inputs as ONNX gives them: optional ones are None; each branch knows its op's signature
            x: list[Any] = [self._value(values, n) if n else None for n in node.input]
            a = _attrs(node)
            op = node.op_type
            if op == "Conv":
                dims = x[1].dim() - 2
                conv = F.conv1d if dims == 1 else F.conv2d
                y = conv(x[0], x[1], x[2] if len(x) > 2 else None, stride=a.get("strides", [1] * dims),
                         padding=_pads(a, dims), dilation=a.get("dilations", [1] * dims), groups=a.get("group", 1))
            elif op == "Gemm":
                left = x[0].t() if a.get("transA") else x[0]
                right = x[1].t() if a.get("transB") else x[1]
                y = a.get("alpha", 1.0) * left @ right
                if len(x) > 2 and x[2] is not None:
                    y = y + a.get("beta", 1.0) * x[2]
            elif op == "MatMul":
                y = x[0] @ x[1]
            elif op in ("Add", "Sub", "Mul", "Div"):
                arithmetic: dict[str, Callable[..., torch.Tensor]] = {"Add": torch.add, "Sub": torch.sub,
                                                                       "Mul": torch.mul, "Div": torch.div}
                y = arithmetic[op](x[0], x[1])
            elif op == "Relu":
                y = F.relu(x[0])
            elif op == "LeakyRelu":
                y = F.leaky_relu(x[0], a.get("alpha", 0.01))
            elif op in ("Sigmoid", "Tanh"):
                y = torch.sigmoid(x[0]) if op == "Sigmoid" else torch.tanh(x[0])
            elif op in ("MaxPool", "AveragePool"):
                dims = len(a["kernel_shape"])
                pools: dict[tuple[str, int], Callable[..., torch.Tensor]] = {
                    ("MaxPool", 1): F.max_pool1d, ("MaxPool", 2): F.max_pool2d,
                    ("AveragePool", 1): F.avg_pool1d, ("AveragePool", 2): F.avg_pool2d}
                pool = pools[(op, dims)]
                y = pool(x[0], a["kernel_shape"], a.get("strides", a["kernel_shape"]), _pads(a, dims))
            elif op == "GlobalAveragePool":
                y = x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)
            elif op == "Flatten":
                y = torch.flatten(x[0], start_dim=a.get("axis", 1))
            elif op == "Reshape":
                shape = [int(d) for d in x[1].tolist()]
                shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
                y = x[0].reshape(shape)
            elif op == "Transpose":
                y = x[0].permute(*a["perm"])
            elif op == "Softmax":
                y = torch.softmax(x[0], dim=a.get("axis", -1))
            elif op == "Identity":
                y = x[0]
            elif op == "Concat":
                y = torch.cat([t for t in x if t is not None], dim=a["axis"])
            elif op == "BatchNormalization":
                y = F.batch_norm(x[0], x[3], x[4], x[1], x[2], training=False, eps=a.get("epsilon", 1e-5))
            else:  # Constant
                y = torch.from_numpy(numpy_helper.to_array(a["value"]).copy())
            values[node.output[0]] = y
        outputs = [values[name] for name in self.outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
