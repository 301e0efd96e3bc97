"""Wearable example: a 1-D CNN classifying activity from wrist accelerometer windows.

SYNTHETIC DATA: the signals are generated here (3-axis accelerometer at 50 Hz,
128-sample windows; rest, walk, run, cycle with jittered frequency, amplitude,
orientation and noise). No recording of a real person is involved. Writes
examples/models/wearable_cnn.onnx and examples/data/wearable_{calibration,training,evaluation}.npz.

    python examples/make_wearable.py
"""

from __future__ import annotations

import numpy as np
import torch
from _common import accuracy, arguments, deterministic, export, save_data, train

CLASSES = ["rest", "walk", "run", "cycle"]
RATE_HZ, WINDOW = 50.0, 128


def synthetic_windows(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Accelerometer windows in g, shape (count, 3, WINDOW), and their class labels."""
    t = np.arange(WINDOW) / RATE_HZ
    labels = rng.integers(0, len(CLASSES), size=count)
    # (step frequency Hz, amplitude g, harmonic share) per class
    params = {0: (0.3, 0.02, 0.0), 1: (1.8, 0.35, 0.3), 2: (2.8, 0.9, 0.5), 3: (1.3, 0.25, 0.05)}
    windows = np.empty((count, 3, WINDOW), dtype=np.float32)
    for i, label in enumerate(labels):
        freq, amp, harmonic = params[int(label)]
        freq *= rng.uniform(0.8, 1.2)
        amp *= rng.uniform(0.7, 1.3)
        phase = rng.uniform(0, 2 * np.pi)
        wave = amp * (np.sin(2 * np.pi * freq * t + phase) + harmonic * np.sin(4 * np.pi * freq * t + 2 * phase))
        axis_mix = rng.normal(size=3)
        axis_mix /= np.linalg.norm(axis_mix)
        if label == 3:  # cycling: mostly horizontal arm motion, gravity steady
            axis_mix = np.array([0.9, 0.4, 0.1]) + rng.normal(scale=0.1, size=3)
        gravity = np.array([0.0, 0.0, 1.0]) + rng.normal(scale=0.15, size=3)
        signal = gravity[:, None] + axis_mix[:, None] * wave[None, :]
        windows[i] = signal + rng.normal(scale=0.05, size=signal.shape)
    return windows, labels.astype(np.int64)


class ActivityCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv1d(3, 32, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool1d(2),
            torch.nn.Conv1d(32, 64, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool1d(2),
            torch.nn.Conv1d(64, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(), torch.nn.Linear(64, len(CLASSES)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    deterministic(0)
    rng = np.random.default_rng(0)
    x_train, y_train = synthetic_windows(2000, rng)
    x_eval, y_eval = synthetic_windows(500, rng)
    model = ActivityCNN()
    train(model, torch.from_numpy(x_train), torch.from_numpy(y_train), epochs=12)
    acc = accuracy(model, torch.from_numpy(x_eval), torch.from_numpy(y_eval))
    digest = export(model, torch.from_numpy(x_train[:1]), args.out / "models" / "wearable_cnn.onnx",
                    "signal", ["logits"])
    save_data(args.out / "data" / "wearable_calibration.npz", signal=x_train[:200])
    # the transfer set for distillation: 1000 labelled windows, stored as float16 to keep the repo small
    save_data(args.out / "data" / "wearable_training.npz", signal=x_train[:1000].astype(np.float16),
              labels=y_train[:1000])
    save_data(args.out / "data" / "wearable_evaluation.npz", signal=x_eval, labels=y_eval)
    print(f"wearable_cnn.onnx sha256={digest} eval accuracy={acc:.2f}% ({len(x_eval)} synthetic windows)")


if __name__ == "__main__":
    main()
