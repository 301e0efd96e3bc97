"""Generative example: a tiny Llama-architecture decoder that writes maintenance-log lines.

SYNTHETIC DATA: the corpus is generated here by a small grammar of gateway maintenance logs
("2026-03-14 06:42 pump P-3 pressure high (7.9 bar): valve V-12 replaced, ok"), seeded, so the same
text comes out on every machine with no download. Byte-level vocabulary (256 bytes + BOS/EOS/PAD).
The decoder is the Llama shape in small: RMSNorm, rotary position embeddings, grouped-query attention
(4 query heads sharing 2 key/value heads), a SwiGLU MLP, tied input/output embeddings.

Writes to examples/generated/tiny_lm/ (git-ignored):

* ``model.onnx`` — one decoder step with a KV cache, in the layout onnxruntime-genai's decoders use:
  inputs ``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, past+seq] int64,
  ``position_ids`` [batch, seq] int64, ``past_key_values.{i}.key/value`` [batch, kv_heads, past, head_dim];
  outputs ``logits`` [batch, seq, vocab] and ``present.{i}.key/value``. Prefill (seq = prompt) and decode
  (seq = 1) are the same graph.
* ``tokenizer.json`` — the byte-level vocabulary and special tokens;
* ``evaluation.txt`` — held-out log lines (another seed): perplexity is measured on them;
* ``calibration.txt`` — more log lines (a third seed): what int8 calibration and smoothing read;
* ``prompts.txt`` — the golden prompts, one per line (what ``spec.generation.prompts`` names);
* ``golden.json`` — prompts with the greedy continuations of this fp32 model: a compressed model's
  agreement with them is its quality check;
* ``report.json`` — training loss, held-out perplexity against a uniform model's (259), parameters;
* ``weights.npz`` — the trained weights by their PyTorch names: what bench/generative.py converts for the peers
  (a Hugging Face Llama checkpoint for onnxruntime-genai's builder, GGUF for llama.cpp).

    python examples/make_tiny_lm.py [--steps 600] [--out examples/generated/tiny_lm] [--size small]

``--size small`` (hidden 64, 2 layers) trains in seconds: what the tests deploy.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import onnx
import torch

HERE = Path(__file__).resolve().parent
BOS, EOS, PAD = 256, 257, 258
VOCAB = 259
HIDDEN, LAYERS, HEADS, KV_HEADS, MLP = 256, 4, 4, 2, 683
HEAD_DIM = HIDDEN // HEADS
CONTEXT = 128
SIZES = {"full": (HIDDEN, LAYERS, MLP), "small": (64, 2, 172)}  # hidden, layers, SwiGLU width
ROPE_BASE = 10000.0

EQUIPMENT = ["pump", "valve", "compressor", "motor", "fan", "conveyor", "boiler", "chiller", "sensor", "filter"]
READINGS = {"pressure": ("bar", 1.0, 9.5), "temperature": ("C", 12.0, 95.0), "vibration": ("mm/s", 0.2, 14.0),
            "current": ("A", 0.5, 40.0), "flow": ("m3/h", 2.0, 80.0)}
ACTIONS = ["replaced", "cleaned", "tightened", "recalibrated", "inspected", "lubricated", "reset"]
PARTS = ["seal", "bearing", "belt", "gasket", "fuse", "nozzle", "impeller", "relay"]
OUTCOMES = ["ok", "ok", "ok", "monitor", "escalated to shift lead", "spare ordered"]


def log_line(rng: np.random.Generator) -> str:
    """One maintenance-log line of the synthetic grammar."""
    day, hour, minute = int(rng.integers(1, 29)), int(rng.integers(0, 24)), int(rng.integers(0, 60))
    kind = EQUIPMENT[int(rng.integers(len(EQUIPMENT)))]
    unit_id = f"{kind[0].upper()}-{int(rng.integers(1, 20))}"
    reading = list(READINGS)[int(rng.integers(len(READINGS)))]
    unit, low, high = READINGS[reading]
    value = float(rng.uniform(low, high))
    level = "high" if value > low + 0.75 * (high - low) else "low" if value < low + 0.2 * (high - low) else "normal"
    action = ACTIONS[int(rng.integers(len(ACTIONS)))]
    part = PARTS[int(rng.integers(len(PARTS)))]
    outcome = OUTCOMES[int(rng.integers(len(OUTCOMES)))]
    return (f"2026-03-{day:02d} {hour:02d}:{minute:02d} {kind} {unit_id} {reading} {level} ({value:.1f} {unit}): "
            f"{part} {action}, {outcome}")


def corpus(lines: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [log_line(rng) for _ in range(lines)]


def encode(text: str) -> list[int]:
    return [BOS, *text.encode("utf-8"), EOS]


def decode(tokens: list[int]) -> str:
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


class RMSNorm(torch.nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` [batch, heads, seq, head_dim] at ``positions`` [batch, seq]."""
    half = HEAD_DIM // 2
    frequencies = ROPE_BASE ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None, :, None] * frequencies  # [batch, 1, seq, half]
    cos, sin = torch.cos(angles), torch.sin(angles)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k = torch.nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v = torch.nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o = torch.nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                past_key: torch.Tensor, past_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq, _ = x.shape
        q = self.q(x).view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k(x).view(batch, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(x).view(batch, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q, k = rotate(q, positions), rotate(k, positions)
        key, value = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)  # the cache grows
        repeat = HEADS // KV_HEADS
        scores = q @ key.repeat_interleave(repeat, dim=1).transpose(-1, -2) / math.sqrt(HEAD_DIM)
        attended = torch.softmax(scores + mask, dim=-1) @ value.repeat_interleave(repeat, dim=1)
        return self.o(attended.transpose(1, 2).reshape(batch, seq, HIDDEN)), key, value


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_norm, self.mlp_norm = RMSNorm(HIDDEN), RMSNorm(HIDDEN)
        self.attention = Attention()
        self.gate = torch.nn.Linear(HIDDEN, MLP, bias=False)
        self.up = torch.nn.Linear(HIDDEN, MLP, bias=False)
        self.down = torch.nn.Linear(MLP, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attended, key, value = self.attention(self.attention_norm(x), positions, mask, past_key, past_value)
        x = x + attended
        h = self.mlp_norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h)), key, value


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        torch.nn.init.normal_(self.embed.weight, std=0.02)  # tied with the output: small, as Llama initializes
        self.blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RMSNorm(HIDDEN)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seq, total = input_ids.shape[1], attention_mask.shape[1]
        past_length = total - seq
        # causal within the new tokens, everything before them visible, padding (mask 0) never
        rows = torch.arange(seq)[:, None] + past_length
        causal = torch.arange(total)[None, :] <= rows
        allowed = causal[None, None, :, :] & (attention_mask[:, None, None, :] > 0)
        mask = torch.where(allowed, torch.zeros((), dtype=torch.float32), torch.full((), -1e9))
        x = self.embed(input_ids)
        presents: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            x, key, value = block(x, position_ids, mask, past[2 * index], past[2 * index + 1])
            presents += [key, value]
        logits = self.norm(x) @ self.embed.weight.T  # tied embeddings
        return (logits, *presents)

    def empty_cache(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros(batch, KV_HEADS, 0, HEAD_DIM) for _ in range(2 * LAYERS)]

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        batch, seq = inputs.shape
        positions = torch.arange(seq).expand(batch, seq)
        logits = self(inputs, torch.ones(batch, seq, dtype=torch.int64), positions, *self.empty_cache(batch))[0]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=PAD)


def batches(lines: list[str], rng: np.random.Generator, size: int) -> torch.Tensor:
    """``size`` windows of CONTEXT + 1 tokens from the stream of encoded lines."""
    stream = np.array([t for line in lines for t in encode(line)], dtype=np.int64)
    starts = rng.integers(0, len(stream) - CONTEXT - 1, size=size)
    return torch.from_numpy(np.stack([stream[s:s + CONTEXT + 1] for s in starts]))


def train(model: TinyLM, lines: list[str], steps: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=max(steps, 2),
                                                   pct_start=0.1)
    losses = []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model.loss(batches(lines, rng, 32))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def perplexity(model: TinyLM, lines: list[str]) -> float:
    """exp of the mean next-token cross-entropy over the held-out lines (each line from BOS to EOS)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for line in lines:
            tokens = torch.tensor([encode(line)])
            total += float(model.loss(tokens)) * (tokens.shape[1] - 1)
            count += tokens.shape[1] - 1
    return math.exp(total / count)


def greedy(model: TinyLM, prompt: str, new_tokens: int) -> list[int]:
    """The fp32 model's greedy continuation, one token at a time with its KV cache."""
    tokens = [BOS, *prompt.encode("utf-8")]
    cache = model.empty_cache(1)
    out: list[int] = []
    with torch.no_grad():
        feed, start = tokens, 0
        for _ in range(new_tokens):
            ids = torch.tensor([feed])
            positions = torch.arange(start, start + len(feed))[None, :]
            mask = torch.ones(1, start + len(feed), dtype=torch.int64)
            logits, *cache = model(ids, mask, positions, *cache)
            start += len(feed)
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt == EOS:
                break
            feed = [nxt]
    return out


def cache_names() -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
    return past, [name.replace("past_key_values", "present") for name in past]


def export(model: TinyLM, path: Path) -> str:
    """One decoder step with a KV cache (prefill and decode alike); the file's sha256."""
    past, present = cache_names()
    ids = torch.tensor([[BOS, 50, 51]])
    example = (ids, torch.ones(1, 5, dtype=torch.int64), torch.tensor([[2, 3, 4]]),
               *[torch.zeros(1, KV_HEADS, 2, HEAD_DIM) for _ in past])
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
            **{name: {0: "batch", 2: "past_sequence"} for name in past},
            **{name: {0: "batch", 2: "total_sequence"} for name in present}}
    buffer = io.BytesIO()
    torch.onnx.export(model, example, buffer, input_names=["input_ids", "attention_mask", "position_ids", *past],
                      output_names=["logits", *present], dynamic_axes=axes, opset_version=17, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name, proto.producer_version = "edgeops-examples", ""
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


GOLDEN_PROMPTS = ["2026-03-14 06:42 pump P-3 ", "2026-03-02 23:10 compressor C-7 vibration ",
                  "2026-03-21 11:05 boiler B-1 temperature high (", "2026-03-09 04:30 fan F-12 current low (3.1 A): ",
                  "2026-03-17 15:55 valve V-4 flow normal (41.0 m3/h): gasket ", "2026-03-25 08:00 motor M-9 "]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps of 32 windows of 128 bytes")
    parser.add_argument("--out", type=Path, default=HERE / "generated" / "tiny_lm")
    parser.add_argument("--golden-tokens", type=int, default=48)
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="full: hidden 256, 4 layers (the example); small: hidden 64, 2 layers (tests)")
    args = parser.parse_args()
    global HIDDEN, LAYERS, MLP, HEAD_DIM
    HIDDEN, LAYERS, MLP = SIZES[args.size]
    HEAD_DIM = HIDDEN // HEADS
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.monotonic()
    model = TinyLM()
    losses = train(model, corpus(20000, seed=1), args.steps, seed=2)
    held_out = corpus(200, seed=3)
    ppl = perplexity(model, held_out)
    args.out.mkdir(parents=True, exist_ok=True)
    sha = export(model, args.out / "model.onnx")
    np.savez(args.out / "weights.npz", **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    (args.out / "tokenizer.json").write_text(json.dumps({"kind": "bytes", "vocab_size": VOCAB, "bos": BOS,
                                                         "eos": EOS, "pad": PAD}, indent=2) + "\n")
    (args.out / "evaluation.txt").write_text("\n".join(held_out) + "\n")
    (args.out / "calibration.txt").write_text("\n".join(corpus(100, seed=4)) + "\n")
    (args.out / "prompts.txt").write_text("\n".join(GOLDEN_PROMPTS) + "\n")
    golden = [{"prompt": p, "continuation": greedy(model, p, args.golden_tokens)} for p in GOLDEN_PROMPTS]
    (args.out / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    report = {"steps": args.steps, "final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None,
              "perplexity": round(ppl, 3), "uniform_perplexity": VOCAB,
              "parameters": sum(p.numel() for p in model.parameters()), "model_sha256": sha,
              "train_seconds": round(time.monotonic() - started, 1), "size": args.size,
              "architecture": {"hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS,
                               "mlp": MLP, "context": CONTEXT, "vocab": VOCAB, "rope_base": ROPE_BASE}}
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    for item in golden[:2]:
        print(repr(item["prompt"] + decode(item["continuation"])))


if __name__ == "__main__":
    main()
