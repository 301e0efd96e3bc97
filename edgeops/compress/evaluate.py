"""Measure a model on the host: quality against the original, size, parameters, ops, latency."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import zstandard

from edgeops.compress.data import Dataset
from edgeops.manifest.models import QualityGoal
from edgeops.metrics import embedding_fidelity, metric_value

LATENCY_WARMUP, LATENCY_RUNS = 20, 200


@dataclass(frozen=True)
class Quality:
    metric: str
    value: float
    baseline: float
    drop: float           # in the goal's unit: points, percent of baseline, or the error itself
    passed: bool
    extra: dict[str, float] = field(default_factory=dict)  # cosine: cosine_min, neighbour_agreement

    def describe(self) -> str:
        unit = "%" if self.metric in ("accuracy", "top1_agreement") else ""
        return f"{self.metric} {self.value:.4g}{unit}"


@dataclass(frozen=True)
class Measurement:
    size_bytes: int
    zstd_bytes: int
    parameters: int
    ops: dict[str, int]
    quality: Quality
    latency_p50_ms: float
    latency_p95_ms: float
    notes: list[str] = field(default_factory=list)
    latency_p50_ci_ms: tuple[float, float] = (float("nan"), float("nan"))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_all(sess: ort.InferenceSession, data: Dataset) -> list[np.ndarray]:
    """Outputs over every sample, one sample per run as on a device.

    Batch 1 on purpose: dynamic quantization picks activation ranges per run,
    so batched outputs would differ from what a device serving single requests sees.
    """
    runs = [sess.run(None, {name: array[i:i + 1] for name, array in data.inputs.items()}) for i in range(data.count)]
    return [np.concatenate([r[i] for r in runs]) for i in range(len(runs[0]))]


def quality(goal: QualityGoal, outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None,
            baseline: float | None) -> Quality:
    """The goal's metric for ``outputs`` against the original model's ``reference`` outputs."""
    value = metric_value(goal.metric, outputs, reference, labels)
    extra = embedding_fidelity(outputs, reference) if goal.metric == "cosine" else {}
    if goal.metric == "max_abs_error":
        return Quality(goal.metric, value, 0.0, value, value <= goal.max_drop)
    base = value if baseline is None else baseline
    drop = base - value
    if goal.drop == "relative":
        drop = drop / base * 100 if base else 0.0
    return Quality(goal.metric, value, base, drop, drop <= goal.max_drop + 1e-9, extra)


def host_latency(path: Path, data: Dataset, warmup: int = LATENCY_WARMUP,
                 runs: int = LATENCY_RUNS) -> tuple[float, float, tuple[float, float]]:
    """Single-stream latency on this host's CPU, one thread: (p50, p95, 95% interval of the p50) in ms."""
    sess = session(path)
    feeds = [{name: array[i:i + 1] for name, array in data.inputs.items()} for i in range(min(data.count, 64))]
    for i in range(warmup):
        sess.run(None, feeds[i % len(feeds)])
    samples = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds[i % len(feeds)])
        samples[i] = time.perf_counter() - start
    return (float(np.percentile(samples, 50) * 1e3), float(np.percentile(samples, 95) * 1e3),
            median_interval(samples * 1e3))


def median_interval(samples: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Distribution-free 95% interval of the median: the order statistics n/2 ± z·√n/2.

    Back-to-back runs are not independent (caches, frequency), so read it as the least uncertainty there is.
    """
    ordered = np.sort(samples)
    n = len(ordered)
    half = z * math.sqrt(n) / 2
    low, high = max(0, math.floor(n / 2 - half) - 1), min(n - 1, math.ceil(n / 2 + half))
    return float(ordered[low]), float(ordered[high])


def static_facts(path: Path) -> tuple[int, int, int, dict[str, int]]:
    """(size, zstd size, parameter count, op histogram)."""
    data = path.read_bytes()
    model = onnx.load_from_string(data)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    ops = dict(sorted(Counter(n.op_type for n in model.graph.node).items()))
    return len(data), len(zstandard.ZstdCompressor(level=19).compress(data)), params, ops


def output_index(sess: ort.InferenceSession, goal: QualityGoal) -> int:
    names = [o.name for o in sess.get_outputs()]
    return names.index(goal.output) if goal.output in names else 0


@dataclass
class Evaluator:
    """Evaluates any stage against the original model's outputs on the evaluation data."""

    goal: QualityGoal
    data: Dataset
    reference: np.ndarray = field(init=False)
    baseline: float | None = field(default=None, init=False)

    def reference_from(self, original: Path) -> None:
        sess = session(original, threads=0)
        self.reference = run_all(sess, self.data)[output_index(sess, self.goal)]

    def quality_of(self, path: Path) -> Quality:
        sess = session(path, threads=0)
        outputs = run_all(sess, self.data)[output_index(sess, self.goal)]
        return quality(self.goal, outputs, self.reference, self.data.labels, self.baseline)

    def with_latency(self, measurement: Measurement, path: Path) -> Measurement:
        """``measurement`` (taken with ``latency=False``) with the host latency of ``path`` added."""
        p50, p95, interval = host_latency(path, self.data)
        return replace(measurement, latency_p50_ms=p50, latency_p95_ms=p95, latency_p50_ci_ms=interval)

    def measure(self, path: Path, notes: list[str] | None = None, latency: bool = True) -> Measurement:
        size, packed, params, ops = static_facts(path)
        q = self.quality_of(path)
        nan = float("nan")
        p50, p95, interval = host_latency(path, self.data) if latency else (nan, nan, (nan, nan))
        return Measurement(size, packed, params, ops, q, p50, p95, list(notes or []), interval)
