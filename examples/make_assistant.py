"""Transformer example: a tiny on-device intent encoder ("Gen AI at the edge", the encoder half).

SYNTHETIC DATA: token sequences are generated here. Each of 8 intents owns a
handful of keyword tokens; a sequence is random filler tokens with 3-6 of its
intent's keywords placed at random positions. The 2-layer transformer encoder
(d_model 128, 4 heads, FFN 256, vocabulary 512, 32 tokens) learns to map a
sequence to a 128-d sentence embedding and intent logits. Writes
examples/models/assistant_encoder.onnx and examples/data/assistant_{calibration,evaluation}.npz.

    python examples/make_assistant.py
"""

from __future__ import annotations

import math

import numpy as np
import torch
from _common import accuracy, arguments, deterministic, export, save_data, train

VOCAB, SEQ, D_MODEL, HEADS, FFN, LAYERS, INTENTS = 512, 32, 128, 4, 256, 2, 8


def synthetic_sequences(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    keywords = np.arange(1, 1 + INTENTS * 6).reshape(INTENTS, 6)  # tokens 1..48 are keywords
    labels = rng.integers(0, INTENTS, size=count)
    tokens = rng.integers(64, VOCAB, size=(count, SEQ))
    for i, label in enumerate(labels):
        places = rng.choice(SEQ, size=rng.integers(3, 7), replace=False)
        tokens[i, places] = rng.choice(keywords[label], size=len(places))
    return tokens.astype(np.int64), labels.astype(np.int64)


class EncoderLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = torch.nn.Linear(D_MODEL, D_MODEL)
        self.norm1 = torch.nn.LayerNorm(D_MODEL)
        self.norm2 = torch.nn.LayerNorm(D_MODEL)
        self.ffn = torch.nn.Sequential(torch.nn.Linear(D_MODEL, FFN), torch.nn.GELU(), torch.nn.Linear(FFN, D_MODEL))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        q, k, v = self.qkv(x).reshape(batch, SEQ, 3, HEADS, D_MODEL // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D_MODEL // HEADS), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, SEQ, D_MODEL)
        x = self.norm1(x + self.proj(attended))
        return self.norm2(x + self.ffn(x))


class IntentEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, D_MODEL)
        self.position = torch.nn.Parameter(torch.randn(1, SEQ, D_MODEL) * 0.02)
        self.layers = torch.nn.ModuleList(EncoderLayer() for _ in range(LAYERS))
        self.classify = torch.nn.Linear(D_MODEL, INTENTS)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position
        for layer in self.layers:
            x = layer(x)
        return x.mean(dim=1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.encode(tokens)
        return embedding, self.classify(embedding)


class LogitsOnly(torch.nn.Module):
    def __init__(self, model: IntentEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)[1]


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    deterministic(0)
    rng = np.random.default_rng(0)
    x_train, y_train = synthetic_sequences(3000, rng)
    x_eval, y_eval = synthetic_sequences(300, rng)
    model = IntentEncoder()
    train(LogitsOnly(model), torch.from_numpy(x_train), torch.from_numpy(y_train), epochs=4, lr=1e-3)
    acc = accuracy(LogitsOnly(model), torch.from_numpy(x_eval), torch.from_numpy(y_eval))
    digest = export(model, torch.from_numpy(x_train[:1]), args.out / "models" / "assistant_encoder.onnx",
                    "input_ids", ["embedding", "logits"])
    save_data(args.out / "data" / "assistant_calibration.npz", input_ids=x_train[:128])
    save_data(args.out / "data" / "assistant_evaluation.npz", input_ids=x_eval, labels=y_eval)
    print(f"assistant_encoder.onnx sha256={digest} eval accuracy={acc:.2f}% ({len(x_eval)} synthetic sequences)")


if __name__ == "__main__":
    main()
