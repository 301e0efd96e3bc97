"""Mobile camera example: a MobileNetV3-style CNN (depthwise-separable convolutions, hard-swish,
squeeze-and-excitation) of the kind edge cameras run, reading digits off 64x64 frames.

Real data: scikit-learn's bundled handwritten digits (shipped inside the package, no download),
upscaled from 8x8 to 64x64 at a seeded position, in 8-bit levels as a camera sensor gives them. Writes examples/models/mobile_cnn.onnx and examples/data/mobile_{calibration,evaluation}.npz.

    python examples/make_mobile_camera.py
"""

from __future__ import annotations

import numpy as np
import torch
from _common import accuracy, arguments, deterministic, export, save_data, train
from sklearn.datasets import load_digits
from torch import nn

SIZE = 64


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce, self.expand = nn.Conv2d(channels, reduced, 1), nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(self.pool(x)))))
        return x * scale


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride) -> squeeze-excite -> 1x1 project, hard-swish between."""

    def __init__(self, cin: int, expand: int, cout: int, stride: int, se: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cin, expand, 1, bias=False), nn.BatchNorm2d(expand), nn.Hardswish(),
                                   nn.Conv2d(expand, expand, 3, stride, 1, groups=expand, bias=False),
                                   nn.BatchNorm2d(expand), nn.Hardswish()]
        if se:
            layers.append(SqueezeExcite(expand, max(8, expand // 4)))
        layers += [nn.Conv2d(expand, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 64, 24, 2, se=False),
            InvertedResidual(24, 72, 24, 1, se=False),
            InvertedResidual(24, 96, 40, 2, se=True),
            InvertedResidual(40, 160, 40, 1, se=True),
            InvertedResidual(40, 160, 48, 1, se=True),
            InvertedResidual(48, 192, 64, 2, se=True),
            InvertedResidual(64, 256, 64, 1, se=True),
        )
        self.head = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256), nn.Hardswish(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 128), nn.Hardswish(),
                                  nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def frames(images: np.ndarray, seed: int) -> np.ndarray:
    """8x8 digits as 64x64 frames: bilinear upscaling, a seeded shift of up to 8 pixels, 8-bit levels."""
    rng = np.random.default_rng(seed)
    big = nn.functional.interpolate(torch.from_numpy(images), size=(SIZE - 8, SIZE - 8), mode="bilinear",
                                    align_corners=False).numpy()
    out = np.zeros((len(images), 1, SIZE, SIZE), np.float32)
    for i, (dy, dx) in enumerate(rng.integers(0, 9, size=(len(images), 2))):
        out[i, 0, dy:dy + SIZE - 8, dx:dx + SIZE - 8] = big[i, 0]
    return np.round(np.clip(out, 0, 1) * 255).astype(np.float32) / 255


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    deterministic(0)
    digits = load_digits()
    images = frames((digits.images / 16.0).astype(np.float32)[:, None, :, :], seed=0)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    train_idx, eval_idx = order[:1300], order[1300:]
    model = MobileCNN()
    train(model, torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx]), epochs=12)
    acc = accuracy(model, torch.from_numpy(images[eval_idx]), torch.from_numpy(labels[eval_idx]))
    digest = export(model, torch.from_numpy(images[:1]), args.out / "models" / "mobile_cnn.onnx", "frame",
                    ["logits"])
    save_data(args.out / "data" / "mobile_calibration.npz", frame=images[train_idx[:200]])
    save_data(args.out / "data" / "mobile_evaluation.npz", frame=images[eval_idx], labels=labels[eval_idx])
    print(f"mobile_cnn.onnx sha256={digest} eval accuracy={acc:.2f}% ({len(eval_idx)} frames)")


if __name__ == "__main__":
    main()
