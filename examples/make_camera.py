"""Camera example: a CNN reading digits off 8x8 meter images.

Real data: scikit-learn's bundled handwritten digits (1,797 images, shipped
inside the package, no download). Writes examples/models/digits_cnn.onnx and
examples/data/digits_{calibration,training,evaluation}.npz (training: the transfer set for distillation).

    python examples/make_camera.py
"""

from __future__ import annotations

import numpy as np
import torch
from _common import accuracy, arguments, deterministic, export, save_data, train
from sklearn.datasets import load_digits


class DigitsCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        )
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(128 * 4 * 4, 96), torch.nn.ReLU(), torch.nn.Linear(96, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    deterministic(0)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    train_idx, eval_idx = order[:1300], order[1300:]
    model = DigitsCNN()
    train(model, torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx]), epochs=25)
    acc = accuracy(model, torch.from_numpy(images[eval_idx]), torch.from_numpy(labels[eval_idx]))
    digest = export(model, torch.from_numpy(images[:1]), args.out / "models" / "digits_cnn.onnx",
                    "image", ["logits"])
    save_data(args.out / "data" / "digits_calibration.npz", image=images[train_idx[:200]])
    save_data(args.out / "data" / "digits_training.npz", image=images[train_idx], labels=labels[train_idx])
    save_data(args.out / "data" / "digits_evaluation.npz", image=images[eval_idx], labels=labels[eval_idx])
    print(f"digits_cnn.onnx sha256={digest} eval accuracy={acc:.2f}% ({len(eval_idx)} images)")


if __name__ == "__main__":
    main()
