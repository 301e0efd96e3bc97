"""A sentence encoder of realistic shape: 6 layers, 384 wide, 12 heads, 128 tokens (MiniLM's shape).

SYNTHETIC DATA: token sequences are generated here. Each of 16 intents owns 8 keyword tokens;
a sentence is 16-128 random filler tokens (the rest padding, masked) with 3-8 of its intent's
keywords at random places. The encoder (BERT-style: token, position and type embeddings,
post-LayerNorm blocks with two outlier dimensions, GELU feed-forward of 1536, an additive attention mask of float32's minimum
where there is padding, masked mean pooling) is trained briefly to classify the intent from the
pooled 384-d embedding; the exported graph outputs the embedding only, which is what a
retrieval or intent system on the device consumes.

The model is about 53 MB, too big to commit: this script writes it (deterministically, about two
minutes on 2 cores) to ``examples/generated/`` with its data and a manifest, which
``bench/build.py --only sentence-encoder.yaml`` copies into a scratch repository.

    python examples/make_sentence_encoder.py [--out DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from _common import HERE, deterministic, export, save_data

VOCAB, SEQ, WIDTH, HEADS, FFN, LAYERS, INTENTS = 8192, 128, 384, 12, 1536, 6, 16
PAD = 0
# Trained BERT-family encoders carry a few "outlier dimensions": LayerNorm scales and shifts tens of times larger
# than the rest in the same channels across layers (Kovaleva et al., 2021, "BERT Busters"). They are what makes
# per-tensor activation quantization of real encoders lose fidelity; a brief training run does not grow them,
# so they are set here, before training, and kept by it.
OUTLIER_DIMS, OUTLIER_SCALE = (77, 301), 12.0


def synthetic_sentences(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, labels): padded synthetic sentences of 16-128 tokens."""
    keywords = np.arange(1, 1 + INTENTS * 8).reshape(INTENTS, 8)
    labels = rng.integers(0, INTENTS, size=count)
    lengths = rng.integers(16, SEQ + 1, size=count)
    tokens = rng.integers(1000, VOCAB, size=(count, SEQ))
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    for i, label in enumerate(labels):
        places = rng.choice(lengths[i], size=rng.integers(3, 9), replace=False)
        tokens[i, places] = rng.choice(keywords[label], size=len(places))
    tokens[mask == 0] = PAD
    return tokens.astype(np.int64), mask, labels.astype(np.int64)


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (torch.nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.output = torch.nn.Linear(WIDTH, WIDTH)
        self.norm1, self.norm2 = torch.nn.LayerNorm(WIDTH, eps=1e-12), torch.nn.LayerNorm(WIDTH, eps=1e-12)
        self.up, self.down = torch.nn.Linear(WIDTH, FFN), torch.nn.Linear(FFN, WIDTH)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], SEQ, HEADS, WIDTH // HEADS).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(self.query(x)), self.heads(self.key(x)), self.heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(WIDTH // HEADS) + bias
        attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(x.shape[0], SEQ, WIDTH)
        x = self.norm1(x + self.output(attended))
        return self.norm2(x + self.down(torch.nn.functional.gelu(self.up(x))))


class SentenceEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(VOCAB, WIDTH)
        self.positions = torch.nn.Embedding(SEQ, WIDTH)
        self.norm = torch.nn.LayerNorm(WIDTH, eps=1e-12)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
        for module in self.modules():  # BERT's initialisation
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                torch.nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.zeros_(module.bias)
            if isinstance(module, torch.nn.LayerNorm):
                with torch.no_grad():
                    module.weight[list(OUTLIER_DIMS)] = OUTLIER_SCALE
                    module.bias[list(OUTLIER_DIMS)] = OUTLIER_SCALE / 4

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(SEQ).unsqueeze(0)
        x = self.norm(self.tokens(input_ids) + self.positions(positions))
        mask = attention_mask.to(torch.float32)
        bias = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
        for block in self.blocks:
            x = block(x, bias)
        return (x * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


def train(model: SentenceEncoder, data: tuple[np.ndarray, np.ndarray, np.ndarray], steps: int) -> None:
    classify = torch.nn.Linear(WIDTH, INTENTS)
    optimizer = torch.optim.AdamW([*model.parameters(), *classify.parameters()], lr=3e-4)
    generator = torch.Generator().manual_seed(0)
    ids, mask, labels = (torch.from_numpy(a) for a in data)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(ids), (16,), generator=generator)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(classify(model(ids[index], mask[index])), labels[index])
        loss.backward()
        optimizer.step()
    model.eval()


MANIFEST = """\
# A sentence encoder of realistic shape (6 layers, 384 wide, 128 tokens; synthetic data), written by
# examples/make_sentence_encoder.py. Only the quality goal is given: auto chooses the rest.
apiVersion: edgeops/v1
kind: Deployment
metadata:
  name: sentence-encoder
  labels: {team: search}
spec:
  model:
    path: ../examples/generated/sentence_encoder.onnx
    inputs:
      - {name: input_ids, shape: [batch, 128], dtype: int64}
      - {name: attention_mask, shape: [batch, 128], dtype: int64}
    outputs:
      - {name: embedding, shape: [batch, 384], dtype: float32}
  data:
    calibration: ../examples/generated/sentence_calibration.npz
    evaluation: ../examples/generated/sentence_evaluation.npz
  recipe:
    - quantize: {mode: auto}
  recipe_for:
    tpu:
      - quantize: {mode: static, op_types: [MatMul, Gemm], activation_type: uint8}
  quality:
    metric: cosine
    output: embedding
    max_drop: 0.005        # mean cosine to the fp32 embedding >= 0.995
  targets:
    - fleet: vehicles
  rollout:
    waves: ["10%", "100%"]
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "generated", help="directory for the model, data, manifest")
    parser.add_argument("--steps", type=int, default=150, help="training steps (batch 16)")
    args = parser.parse_args()
    deterministic(0)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    train_ids, train_mask, train_labels = synthetic_sentences(4000, rng)
    eval_ids, eval_mask, eval_labels = synthetic_sentences(256, rng)
    model = SentenceEncoder()
    started = time.perf_counter()
    train(model, (train_ids, train_mask, train_labels), args.steps)
    trained_s = time.perf_counter() - started
    digest = export(model, (torch.from_numpy(train_ids[:1]), torch.from_numpy(train_mask[:1])),
                    args.out / "sentence_encoder.onnx", ["input_ids", "attention_mask"], ["embedding"])
    save_data(args.out / "sentence_calibration.npz", input_ids=train_ids[:128], attention_mask=train_mask[:128])
    save_data(args.out / "sentence_evaluation.npz", input_ids=eval_ids, attention_mask=eval_mask)
    (args.out / "sentence-encoder.yaml").write_text(MANIFEST)
    print(f"sentence_encoder.onnx sha256={digest} ({args.steps} steps, {trained_s:.0f} s of training; "
          f"{len(eval_ids)} synthetic evaluation sentences)")


if __name__ == "__main__":
    main()
