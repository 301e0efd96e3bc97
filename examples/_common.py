"""Shared helpers for the example-model scripts: seeding, training, ONNX export, data files."""

from __future__ import annotations

import argparse
import hashlib
import io
from pathlib import Path

import numpy as np
import onnx
import torch

HERE = Path(__file__).resolve().parent


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=HERE, help="directory for models/ and data/")
    return parser.parse_args()


def deterministic(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 3e-3,
          batch_size: int = 64, seed: int = 0) -> None:
    """Plain Adam + cross-entropy with a seeded shuffle."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
    model.eval()


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean()) * 100


def export(model: torch.nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], path: Path,
           input_name: str | list[str], output_names: list[str]) -> str:
    """Export with a symbolic batch dimension (one input, or a tuple of inputs and their names); return the
    file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    examples = example if isinstance(example, tuple) else (example,)
    input_names = [input_name] if isinstance(input_name, str) else input_name
    axes = {**{name: {0: "batch"} for name in input_names}, **{name: {0: "batch"} for name in output_names}}
    torch.onnx.export(model, examples, buffer, input_names=input_names, output_names=output_names,
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name = "edgeops-examples"
    proto.producer_version = ""
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def save_data(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz without timestamps so the bytes depend only on the arrays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez_compressed(handle, **arrays)
