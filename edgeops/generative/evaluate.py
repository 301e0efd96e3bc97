"""A decoder measured on the build host: agreement with the original's greedy tokens, perplexity, decode speed.

The scoring is the agent's own ``Decoder`` (edgeops imports the device's file), so a device and the build
host compute the same numbers from the same golden set.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from edgeops.agent.edgeops_agent import AgentError, Decoder
from edgeops.compress.data import Dataset
from edgeops.compress.evaluate import Measurement, Quality, median_interval, session, static_facts
from edgeops.errors import BuildError
from edgeops.generative.text import Corpus
from edgeops.manifest.models import GenerationSpec, QualityGoal
from edgeops.metrics import Metric, perplexity, token_agreement

TIMING_BUDGET_S = 0.75  # host decode timing per model: generations until this is spent (at least MIN_GENERATIONS)
MIN_GENERATIONS = 3
QUICK_BUDGET_S = 0.3


def padded(rows: list[list[int]], width: int | None = None) -> np.ndarray:
    """Token rows as one int64 array, padded with -1."""
    width = width or max(len(r) for r in rows)
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row[:width])] = row[:width]
    return out


def decoder(path: Path, threads: int = 0, head_dim: int | None = None) -> Decoder:
    try:
        return Decoder(session(path, threads), head_dim)
    except AgentError as exc:
        raise BuildError(f"{path.name}: {exc}", hint="export the decoder with a KV cache in onnxruntime-genai's "
                                                     "layout (see examples/make_tiny_lm.py)") from None


def layout(path: Path, head_dim: int | None = None) -> dict[str, Any]:
    """What a runtime needs to know of the decoder: layers, heads, sizes (read from the model)."""
    found = decoder(path, threads=1, head_dim=head_dim)
    model = onnx.load(str(path), load_external_data=False)
    tables = [t for t in model.graph.initializer if len(t.dims) == 2]
    gathers = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    embedding = next((t for t in tables if t.name in gathers), None)
    hidden = int(embedding.dims[1]) if embedding is not None else found.kv_heads * found.head_dim
    vocab = int(found.session.get_outputs()[0].shape[-1]) if isinstance(
        found.session.get_outputs()[0].shape[-1], int) else (int(embedding.dims[0]) if embedding is not None else 0)
    return {"layers": found.layers, "kv_heads": int(found.kv_heads), "head_dim": int(found.head_dim),
            "hidden": hidden, "heads": max(1, hidden // int(found.head_dim)), "vocab": vocab,
            "kv_dtype": "float16" if found.dtype == np.float16 else "float32", "position_ids": found.positions}


def timed_generations(path: Path, prompt: list[int], tokens: int, budget_s: float,
                      minimum: int = MIN_GENERATIONS, head_dim: int | None = None) -> tuple[list[float], list[float]]:
    """(per-token decode times, times to first token) in ms, one thread, over whole generations."""
    found = decoder(path, threads=1, head_dim=head_dim)
    found.timed(prompt, 2)  # warm-up
    per_token: list[float] = []
    first: list[float] = []
    started = time.perf_counter()
    while len(first) < minimum or time.perf_counter() - started < budget_s:
        ttft, samples = found.timed(prompt, tokens)
        first.append(ttft)
        per_token.extend(samples)
        if len(first) >= 200:
            break
    return per_token, first


@dataclass
class GenerativeEvaluator:
    """Evaluates any stage of a decoder against the original's greedy continuations (the Evaluator interface
    recipe steps use)."""

    goal: QualityGoal
    corpus: Corpus
    generation: GenerationSpec
    data: Dataset             # prefill windows: what int8 calibration, smoothing and sensitivity read
    reference: np.ndarray = field(init=False)       # the original's greedy tokens per golden prompt (-1 padded)
    baseline: float | None = field(default=None, init=False)
    baseline_perplexity: float = field(default=float("nan"), init=False)
    screened: dict[Path, np.ndarray] = field(default_factory=dict, init=False)

    @property
    def timing_prompt(self) -> list[int]:
        stream = [t for p in self.corpus.prompts for t in p]
        wanted = self.generation.prompt_tokens
        return (stream * (wanted // len(stream) + 1))[:wanted]

    def scores(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """(teacher-forced greedy tokens on the golden continuations, (nll, tokens) per evaluation text)."""
        found = decoder(path, head_dim=self.generation.head_dim)
        rows = [found.score(p, c)[0] for p, c in zip(self.corpus.prompts, self.reference_rows)]
        nll = np.array([found.score(t[:1], t[1:])[1:] for t in self.corpus.texts], dtype=np.float64)
        return padded(rows, self.reference.shape[1]), nll

    @property
    def reference_rows(self) -> list[list[int]]:
        return [[int(t) for t in row if t >= 0] for row in self.reference]

    def quality_of(self, path: Path, outputs: np.ndarray | None = None) -> Quality:
        return self._quality(*self.scores(path))

    def _quality(self, predicted: np.ndarray, nll: np.ndarray) -> Quality:
        agreement = token_agreement(predicted, self.reference)
        ppl = perplexity(nll)
        value = agreement if self.goal.metric == Metric.AGREEMENT.value else ppl
        base = value if self.baseline is None else self.baseline
        drop = value - base if self.goal.metric == Metric.PERPLEXITY.value else base - value
        if self.goal.drop == "relative" and base:
            drop = drop / base * 100
        increase = 0.0 if math.isnan(self.baseline_perplexity) else (ppl / self.baseline_perplexity - 1) * 100
        limit = self.generation.max_perplexity_increase_pct
        passed = drop <= self.goal.max_drop + 1e-9 and (limit is None or increase <= limit + 1e-9)
        return Quality(self.goal.metric, value, base, drop, passed,
                       {"agreement": agreement, "perplexity": ppl, "perplexity_increase_pct": increase})

    def reference_from(self, original: Path, settle: Callable[[], None] = lambda: None) -> Measurement:
        found = decoder(original, head_dim=self.generation.head_dim)
        eos = self.corpus.tokenizer.eos
        self.reference = padded([found.greedy(p, self.generation.golden_tokens, eos) for p in self.corpus.prompts],
                                self.generation.golden_tokens)
        predicted, nll = self.scores(original)
        self.baseline_perplexity = perplexity(nll)
        measurement = self.measure(original, latency=False, known=self._quality(predicted, nll))
        settle()
        return self.with_latency(measurement, original)

    def screen(self, path: Path) -> Quality | None:
        return None  # a decoder's evaluation is a few prompts: nothing to save by sampling

    def clearly_missed(self, screened: Quality) -> bool:
        return False

    def with_latency(self, measurement: Measurement, path: Path) -> Measurement:
        per_token, first = timed_generations(path, self.timing_prompt, self.generation.decode_tokens,
                                             TIMING_BUDGET_S, head_dim=self.generation.head_dim)
        ms = np.array(per_token)
        p50 = float(np.percentile(ms, 50))
        generation = {"tokens_per_s": round(1000 / p50, 2), "ttft_ms": round(float(np.median(first)), 3),
                      "decode_ms_per_token": round(p50, 4), "prompt_tokens": len(self.timing_prompt),
                      "generations": len(first), "where": "host CPU, 1 thread, greedy, batch 1"}
        return replace(measurement, latency_p50_ms=p50, latency_p95_ms=float(np.percentile(ms, 95)),
                       latency_p50_ci_ms=median_interval(ms), generation=generation)

    def measure(self, path: Path, notes: list[str] | None = None, latency: bool = True,
                outputs: np.ndarray | None = None, known: Quality | None = None) -> Measurement:
        size, packed, params, ops = static_facts(path)
        quality = known or self.quality_of(path)
        nan = float("nan")
        measurement = Measurement(size, packed, params, ops, quality, nan, nan, list(notes or []))
        return self.with_latency(measurement, path) if latency else measurement

    def quick_p50_ms(self, path: Path) -> float:
        per_token, _ = timed_generations(path, self.timing_prompt, self.generation.decode_tokens, QUICK_BUDGET_S, 1,
                                         head_dim=self.generation.head_dim)
        return float(np.median(per_token))

    def side_by_side_p50(self, first: Path, second: Path) -> tuple[float, float]:
        """Median decode time per token of two decoders, generations alternating (ABBA...)."""
        head_dim = self.generation.head_dim
        decoders = [decoder(first, threads=1, head_dim=head_dim), decoder(second, threads=1, head_dim=head_dim)]
        prompt, tokens = self.timing_prompt, self.generation.decode_tokens
        samples: list[list[float]] = [[], []]
        for d in decoders:
            d.timed(prompt, 2)
        for turn in range(8):
            for index in ((0, 1) if turn % 2 == 0 else (1, 0)):
                samples[index].extend(decoders[index].timed(prompt, tokens)[1])
        return float(np.median(samples[0])), float(np.median(samples[1]))

    def golden_arrays(self, path: Path) -> dict[str, np.ndarray]:
        """The golden set a release ships: prompts, the original's tokens, texts, and what ``path`` scores on
        them in the goal's metric (the device must match it)."""
        predicted, nll = self.scores(path)
        return {"prompts": padded(self.corpus.prompts), "reference": self.reference,
                "texts": padded(self.corpus.texts),
                "expected": predicted if self.goal.metric == Metric.AGREEMENT.value else nll}


def prefill_windows(texts: list[list[int]], path: Path, width: int = 32, count: int = 64,
                    head_dim: int | None = None) -> Dataset:
    """Decoder-step inputs of ``width``-token prefills (an empty cache): int8 calibration data for a decoder."""
    found = decoder(path, threads=1, head_dim=head_dim)
    stream = [t for text in texts for t in text]
    if len(stream) < width:
        stream = stream * (width // max(1, len(stream)) + 1)
    starts = np.linspace(0, len(stream) - width, num=min(count, max(1, len(stream) - width + 1))).astype(int)
    ids = np.array([stream[s:s + width] for s in starts], dtype=np.int64)
    n = len(ids)
    inputs = {"input_ids": ids, "attention_mask": np.ones((n, width), dtype=np.int64)}
    if found.positions:
        inputs["position_ids"] = np.tile(np.arange(width, dtype=np.int64), (n, 1))
    for name in found.past:
        inputs[name] = np.zeros((n, found.kv_heads, 0, found.head_dim), dtype=found.dtype)
    return Dataset(inputs, None, "prefill:" + hashlib.sha256(ids.tobytes()).hexdigest())
