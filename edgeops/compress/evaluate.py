"""Measure a model on the host: quality against the original, size, parameters, ops, latency."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import zstandard

from edgeops.compress.ahead import paused, working
from edgeops.compress.data import Dataset
from edgeops.manifest.models import QualityGoal
from edgeops.metrics import LOWER_IS_BETTER, PERCENT_POINTS, embedding_fidelity, metric_value, sample_scores

LATENCY_WARMUP, LATENCY_MIN_RUNS, LATENCY_MAX_RUNS, LATENCY_BUDGET_S = 10, 20, 200, 0.5
QUICK_BUDGET_S = 0.3  # a quick timing (enough to tell a candidate that cannot win)
ZSTD_LEVEL = 9  # level 19 compressed these float models no smaller and took 18 s for 55 MB
SCREEN_SAMPLES = 64  # candidates are screened on this many evaluation samples first
FIRST_LOOK = 16      # of which these first: a candidate that misses by far there is not run on the rest


@dataclass(frozen=True)
class Quality:
    metric: str
    value: float
    baseline: float
    drop: float           # in the goal's unit: points, percent of baseline, or the error itself
    passed: bool
    extra: dict[str, float] = field(default_factory=dict)  # cosine: cosine_min, neighbour_agreement

    def describe(self) -> str:
        unit = "%" if self.metric in PERCENT_POINTS else ""
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
    generation: dict[str, Any] = field(default_factory=dict)  # text-generation: host tokens/s, time to first token

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if threads != 1:  # evaluation runs beside the build's child processes: idle pool threads yield, not spin
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def evaluation_session(path: Path) -> ort.InferenceSession:
    """A session for evaluating outputs (not timing them): every core, but one while a child quantizes ahead (a
    second thread would contend for the child's core, and gained nothing measured then)."""
    return session(path, threads=1 if working() else 0)


def probe_session(model: onnx.ModelProto, tensors: list[str]) -> ort.InferenceSession:
    """A session of ``model`` (left unchanged) that also outputs ``tensors``, those the graph makes or takes as
    inputs; graph optimisations off, so every tensor still exists."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o for n in probe.graph.node for o in n.output} | {i.name for i in probe.graph.input}
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t in known and t not in present)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])


CLEAR_MISS_Z = 3.0  # standard errors by which a screened drop must exceed the goal to stop on the sample


def drop_standard_error(goal: QualityGoal, outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None,
                        baseline: float) -> float | None:
    """The standard error of a sample's quality drop (in the goal's unit), from the per-sample differences
    between the model's scores and the original's; None for metrics that are not a mean of per-sample scores."""
    scores = sample_scores(goal.metric, outputs, reference, labels)
    original = sample_scores(goal.metric, reference, reference, labels)
    if scores is None or original is None or len(scores) < 2:
        return None
    error = float(np.std(original - scores, ddof=1) / math.sqrt(len(scores)))
    if goal.drop == "relative":
        error = error / baseline * 100 if baseline else 0.0
    return error


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
    drop = value - base if goal.metric in LOWER_IS_BETTER else base - value
    if goal.drop == "relative":
        drop = drop / base * 100 if base else 0.0
    return Quality(goal.metric, value, base, drop, drop <= goal.max_drop + 1e-9, extra)


def host_latency(path: Path, data: Dataset, budget_s: float = LATENCY_BUDGET_S,
                 min_runs: int = LATENCY_MIN_RUNS, max_runs: int = LATENCY_MAX_RUNS,
                 warmup: int = LATENCY_WARMUP) -> tuple[float, float, tuple[float, float]]:
    """Single-stream latency on this host's CPU, one thread: (p50, p95, 95% interval of the p50) in ms.

    Runs until ``budget_s`` is spent (at least ``min_runs``, at most ``max_runs``): a 0.1 ms model gets its
    200 runs, a 30 ms encoder the runs 0.5 s allows; the interval says how much that settled.
    """
    return latency_summary(latency_samples(path, data, budget_s, min_runs, max_runs, warmup))


def latency_summary(samples: list[float]) -> tuple[float, float, tuple[float, float]]:
    """(p50, p95, 95% interval of the p50) in ms of run times in seconds."""
    ms = np.array(samples) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), median_interval(ms)


def latency_samples(path: Path, data: Dataset, budget_s: float, min_runs: int, max_runs: int,
                    warmup: int = LATENCY_WARMUP) -> list[float]:
    """Run times (s) of ``path`` on one thread after a warm-up, alone (see ``host_latency``)."""
    sess = session(path)
    feeds = [{name: array[i:i + 1] for name, array in data.inputs.items()} for i in range(min(data.count, 64))]
    samples: list[float] = []
    with paused():  # alone: candidates quantized ahead wait
        started = time.perf_counter()
        for i in range(warmup):
            sess.run(None, feeds[i % len(feeds)])
            if i >= 2 and time.perf_counter() - started > budget_s / 5:
                break
        started = time.perf_counter()
        while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - started < budget_s):
            start = time.perf_counter()
            sess.run(None, feeds[len(samples) % len(feeds)])
            samples.append(time.perf_counter() - start)
    return samples


# the build's final A/B: 10 blocks of ~0.08 s per model after ~0.3 s of warm-up each (~2 s in all; blocks hold
# at least 5 runs, so a slow model takes longer)
CLAIM_BLOCKS, CLAIM_BLOCK_S, CLAIM_WARMUP_S = 10, 0.08, 0.3


def interleaved_p50(first: Path, second: Path, inputs: dict[str, np.ndarray], blocks: int = 40,
                    block_s: float = 0.25, warmup_s: float = 2.0) -> tuple[float, float]:
    """Median latency (ms) of two models timed in alternating blocks (ABBA...), one thread, batch 1: what a
    comparison between them rests on, since the host's speed drifts between two separate measurements."""
    sessions = [session(first), session(second)]
    feeds = [{k: v[i:i + 1] for k, v in inputs.items()} for i in range(min(32, len(next(iter(inputs.values())))))]
    with paused():  # alone: candidates quantized ahead wait
        return _interleaved(sessions, feeds, blocks, block_s, warmup_s)


def _interleaved(sessions: list[ort.InferenceSession], feeds: list[dict[str, np.ndarray]], blocks: int,
                 block_s: float, warmup_s: float) -> tuple[float, float]:
    started = time.perf_counter()
    warm = 0
    for s in sessions:
        own = time.perf_counter()   # each model gets its own warm-up time
        for i in range(100):
            s.run(None, feeds[i % len(feeds)])
            warm += 1
            if i >= 5 and time.perf_counter() - own > warmup_s:
                break
    per_run = (time.perf_counter() - started) / warm
    block_runs = max(5, min(50, int(block_s / max(per_run, 1e-6))))
    samples: list[list[float]] = [[], []]
    for block in range(blocks):
        for index in ((0, 1) if block % 2 == 0 else (1, 0)):
            for i in range(block_runs):
                start = time.perf_counter()
                sessions[index].run(None, feeds[i % len(feeds)])
                samples[index].append(time.perf_counter() - start)
    return float(np.median(samples[0]) * 1000), float(np.median(samples[1]) * 1000)


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
    return len(data), len(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)), params, ops


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
    screened: dict[Path, np.ndarray] = field(default_factory=dict, init=False)  # outputs on the screening sample
    quick_runs: dict[Path, list[float]] = field(default_factory=dict, init=False)  # run times of a quick timing
    last_outputs: tuple[Path, np.ndarray] | None = field(default=None, init=False)  # of the last model evaluated
    claims: dict[tuple[Path, Path], dict[str, Any]] = field(default_factory=dict, init=False)  # A/Bs taken

    def reference_from(self, original: Path, settle: Callable[[], None] = lambda: None) -> Measurement:
        """Run the original once: its outputs become the reference; returns its measurement. ``settle`` waits
        for work started in the background, so that none runs while the original is timed."""
        sess = evaluation_session(original)
        self.reference = run_all(sess, self.data)[output_index(sess, self.goal)]
        measurement = self.measure(original, outputs=self.reference, latency=False)
        settle()
        return self.with_latency(measurement, original)

    def quality_of(self, path: Path, outputs: np.ndarray | None = None) -> Quality:
        """The goal's metric on the whole evaluation set (samples already run in ``screen`` are not run again)."""
        if outputs is None:
            sess = evaluation_session(path)
            done = self.screened.pop(path, None)
            rest = self.data.slice(0 if done is None else len(done))
            outputs = run_all(sess, rest)[output_index(sess, self.goal)]
            outputs = outputs if done is None else np.concatenate([done, outputs])
            self.last_outputs = (path, outputs)
        return quality(self.goal, outputs, self.reference, self.data.labels, self.baseline)

    def screen(self, path: Path) -> Quality | None:
        """The quality on the first ``SCREEN_SAMPLES`` samples (marked ``screened_samples``), or on the first
        ``FIRST_LOOK`` of them where those already miss by far; None when the evaluation set is too small for a
        sample to save time."""
        if self.data.count <= SCREEN_SAMPLES * 2:
            return None
        sess = evaluation_session(path)
        index = output_index(sess, self.goal)
        outputs = run_all(sess, self.data.take(FIRST_LOOK))[index]
        looked = self._sampled(outputs, with_error=False)  # a standard error of so few samples says little
        if not self.clearly_missed(looked):
            outputs = np.concatenate([outputs, run_all(sess, self.data.slice(FIRST_LOOK, SCREEN_SAMPLES))[index]])
            looked = self._sampled(outputs, with_error=True)
        self.screened[path] = outputs
        return looked

    def _sampled(self, outputs: np.ndarray, with_error: bool) -> Quality:
        """The quality of a screening sample's outputs (the first ``len(outputs)`` samples)."""
        sample = self.data.take(len(outputs))
        reference = self.reference[:sample.count]
        baseline = quality(self.goal, reference, reference, sample.labels, None).value  # the original on the sample
        screened = quality(self.goal, outputs, reference, sample.labels, baseline)
        extra = {**screened.extra, "screened_samples": float(sample.count)}
        error = drop_standard_error(self.goal, outputs, reference, sample.labels, baseline) if with_error else None
        if error is not None:
            extra["drop_standard_error"] = error
        return replace(screened, extra=extra)

    def clearly_missed(self, screened: Quality) -> bool:
        """A screened quality the whole set would not bring within the goal: it misses by more than twice the
        allowed drop plus what one sample weighs, or (metrics that average per-sample scores) by more than
        ``CLEAR_MISS_Z`` standard errors of its drop, so a tight goal's near misses stop on the sample too."""
        samples = screened.extra.get("screened_samples", 0.0)
        one_sample = 100 / samples if samples and self.goal.metric in ("accuracy", "top1_agreement") else 0.0
        if self.goal.drop == "relative" and screened.baseline:
            one_sample = one_sample / screened.baseline * 100
        error = screened.extra.get("drop_standard_error")
        by_error = error is not None and error > 0 and screened.drop - CLEAR_MISS_Z * error > self.goal.max_drop
        return screened.drop > 2 * self.goal.max_drop + one_sample or by_error

    def with_latency(self, measurement: Measurement, path: Path) -> Measurement:
        """``measurement`` (taken with ``latency=False``) with the host latency of ``path`` added: the runs of a
        quick timing of it count towards the budget."""
        prior = self.quick_runs.pop(path, [])
        more = latency_samples(path, self.data, max(LATENCY_BUDGET_S - QUICK_BUDGET_S * bool(prior), 0.1),
                               max(LATENCY_MIN_RUNS - len(prior), 5), max(LATENCY_MAX_RUNS - len(prior), 5))
        p50, p95, interval = latency_summary(prior + more)
        return replace(measurement, latency_p50_ms=p50, latency_p95_ms=p95, latency_p50_ci_ms=interval)

    def quick_p50_ms(self, path: Path) -> float:
        """A quick host p50 (ms): enough to tell a candidate that cannot win."""
        self.quick_runs[path] = runs = latency_samples(path, self.data, QUICK_BUDGET_S, 5, 50)
        return latency_summary(runs)[0]

    def side_by_side_p50(self, first: Path, second: Path) -> tuple[float, float]:
        """The p50s (ms) of two models timed in alternating blocks: a close call decided on an A/B (the speed
        claim's, which the build then makes without timing the pair again)."""
        claim = self.speed_claim(first, second)
        return claim["original_p50_ms"], claim["artifact_p50_ms"]

    def speed_claim(self, original: Path, artifact: Path, attempts: int = 2) -> dict[str, Any]:
        """The build's speed claim: an interleaved A/B of the original and the artifact, with the host's foreign
        load sampled during it; taken again when other processes kept the host busy, and not made (speedup
        None, ``why`` says so) when they did every time. A measurable claim for the pair is not taken twice."""
        from edgeops.compress.hostload import BUSY_CORES, watching

        if (made := self.claims.get((original, artifact))) is not None and made["measurable"]:
            return made

        for attempt in range(1, attempts + 1):
            with watching() as watch:
                base, new = interleaved_p50(original, artifact, self.data.inputs, blocks=CLAIM_BLOCKS,
                                            block_s=CLAIM_BLOCK_S, warmup_s=CLAIM_WARMUP_S)
            if not watch.busy:
                break
        claim: dict[str, Any] = {
            "method": "interleaved A/B of the original and the artifact, host CPU, 1 thread, batch 1",
            "original_p50_ms": base, "artifact_p50_ms": new, "attempts": attempt,
            "foreign_cores": None if watch.foreign_cores is None else round(watch.foreign_cores, 2),
            "measurable": not watch.busy, "speedup": None if watch.busy else round(base / new, 3)}
        if watch.busy:
            claim["why"] = (f"not measurable on a busy host: {watch.describe()} while timing ({attempt} tries; "
                            f"more than {BUSY_CORES:g} makes a ratio meaningless)")
        self.claims[(original, artifact)] = claim
        return claim

    def measure(self, path: Path, notes: list[str] | None = None, latency: bool = True,
                outputs: np.ndarray | None = None, known: Quality | None = None) -> Measurement:
        """Size, quality and (unless ``latency=False``) host latency of ``path``; ``known``: a quality already
        found (on a sample, say), used instead of running the evaluation set."""
        size, packed, params, ops = static_facts(path)
        q = known or self.quality_of(path, outputs)
        nan = float("nan")
        p50, p95, interval = host_latency(path, self.data) if latency else (nan, nan, (nan, nan))
        return Measurement(size, packed, params, ops, q, p50, p95, list(notes or []), interval)
