#!/usr/bin/env python3
"""edgeops on-device agent: measure a release where it runs.

One file; needs only python3, numpy and onnxruntime (and onnxruntime-genai where a decoder's profile generates
with it). It never imports edgeops.
Every command prints exactly one JSON document on stdout (``"schema":
"edgeops.agent/v1"``), errors included (``"ok": false`` with a message, exit 3).

    edgeops_agent.py facts --root DIR [--power SENSOR_JSON]
    edgeops_agent.py bench RELEASE_DIR [--runs N | --duration S] [--warmup N]
                                       [--compare OTHER_RELEASE_DIR] [--block N] [--golden]
    edgeops_agent.py power RELEASE_DIR [--seconds S]
    edgeops_agent.py serve      (many commands over stdin/stdout, one JSON line each)

RELEASE_DIR holds runtime.json, the model file it names and optionally golden.npz; a decoder's
(runtime.json with a ``generation`` section) also tokenizer.json and genai_config.json.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

SCHEMA = "edgeops.agent/v1"
AGENT_VERSION = "1"


class AgentError(Exception):
    """A failure the orchestrator should see as a message, not a traceback."""

    def __init__(self, message, kind="error"):
        super().__init__(message)
        self.kind = kind


# ------------------------------------------------------------------ power


def _sysfs(config, path):
    root = config.get("sysfs_root") or "/"
    return os.path.join(root, path.lstrip("/")) if root != "/" else path


def _read_number(path, what):
    try:
        with open(path) as handle:
            return float(handle.read().strip())
    except PermissionError:
        hint = (" (RAPL energy counters are readable by root only on recent kernels: run the agent as root, "
                "or use an hwmon or estimate source)") if "powercap" in path or "rapl" in path else ""
        raise AgentError(f"cannot read {what} {path} as uid {os.getuid()}{hint}", "power-unreadable")
    except FileNotFoundError:
        raise AgentError(f"{what} {path} does not exist", "power-missing")
    except ValueError:
        raise AgentError(f"{what} {path} does not hold a number", "power-invalid")


class EnergyMeter:
    """Cumulative energy in millijoules since start(), whatever the source.

    Counters (RAPL, hwmon energy) are read at each call and unwrapped; power
    sources (hwmon power, INA3221, command) are sampled by a thread and
    integrated; the estimate integrates this process's CPU time.
    """

    def __init__(self, config):
        self.config = config or {"source": "none"}
        self.source = self.config.get("source", "none")
        self.boundary = self.config.get("boundary")
        self.interval = float(self.config.get("interval_ms", 50)) / 1000.0
        self._lock = threading.Lock()
        self._thread = None
        self._stop = threading.Event()
        self._energy = 0.0
        self._samples = 0
        self._last = None
        self._counter_path = None
        self._wrap = None

    # -- description
    def describe(self):
        out = {"source": self.source, "boundary": self.boundary, "interval_ms": self.interval * 1000}
        if self.config.get("path"):
            out["path"] = self.config["path"]
        if self.source in ("hwmon", "ina3221", "command"):
            out["samples"] = self._samples
        return out

    # -- sources
    def _power_path(self):
        path = _sysfs(self.config, self.config["path"])
        if self.source == "ina3221":
            channel = self.config.get("channel", 1)
            direct = os.path.join(path, f"in_power{channel - 1}_input")
            if os.path.exists(direct):
                return ("mw", direct)
            return ("vi", (os.path.join(path, f"in{channel}_input"), os.path.join(path, f"curr{channel}_input")))
        return ("uw", path)

    def _power_mw(self):
        if self.source == "command":
            argv = self.config["argv"]
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=5)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise AgentError(f"power command {shlex.join(argv)} failed: {exc}", "power-unreadable")
            if done.returncode != 0:
                raise AgentError(f"power command {shlex.join(argv)} exited {done.returncode}", "power-unreadable")
            try:
                return float(done.stdout.strip().split()[0])
            except (ValueError, IndexError):
                raise AgentError(f"power command {shlex.join(argv)} printed no milliwatts", "power-invalid")
        kind, where = self._power_path()
        if kind == "uw":
            return _read_number(where, "power file") / 1000.0
        if kind == "mw":
            return _read_number(where, "INA3221 power file")
        millivolts = _read_number(where[0], "INA3221 voltage file")
        milliamps = _read_number(where[1], "INA3221 current file")
        return millivolts * milliamps / 1000.0

    def _counter_uj(self):
        return _read_number(self._counter_path, "energy counter")

    def _cpu_mj(self):
        cores_busy_s = time.process_time()
        wall = time.perf_counter()
        return cores_busy_s * float(self.config["active_mw_per_core"]) + wall * float(self.config.get("idle_mw", 0))

    # -- lifecycle
    def start(self):
        if self.source == "none":
            return self
        if self.source == "rapl":
            base = _sysfs(self.config, self.config.get("path", "/sys/class/powercap/intel-rapl:0"))
            self._counter_path = os.path.join(base, "energy_uj")
            self._wrap = _read_number(os.path.join(base, "max_energy_range_uj"), "RAPL range file")
            self._last = self._counter_uj()
        elif self.source == "hwmon" and os.path.basename(self.config["path"]).startswith("energy"):
            self._counter_path = _sysfs(self.config, self.config["path"])
            self._last = self._counter_uj()
        elif self.source == "estimate":
            self._last = self._cpu_mj()
        else:
            self._last = (time.perf_counter(), self._power_mw())
            self._samples = 1
            self._thread = threading.Thread(target=self._sample_loop, daemon=True)
            self._thread.start()
        return self

    def _sample_loop(self):
        while not self._stop.wait(self.interval):
            try:
                self._accumulate()
            except AgentError:
                return

    def _accumulate(self):
        now, power = time.perf_counter(), self._power_mw()
        with self._lock:
            then, before = self._last
            self._energy += (before + power) / 2.0 * (now - then)  # mW * s = mJ (trapezoid)
            self._last = (now, power)
            self._samples += 1

    def energy_mj(self):
        """Energy since start() in mJ (None without a source)."""
        if self.source == "none":
            return None
        if self._counter_path:
            value = self._counter_uj()
            delta = value - self._last
            if delta < 0:  # the counter wrapped
                delta += self._wrap if self._wrap else 0
            with self._lock:
                self._energy += delta / 1000.0
                self._last = value
        elif self.source == "estimate":
            value = self._cpu_mj()
            self._energy += value - self._last
            self._last = value
        else:
            with self._lock:
                then, power = self._last
                return self._energy + power * (time.perf_counter() - then)
        return self._energy

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2 * self.interval + 1)


# ------------------------------------------------------------------ sessions


def _load_config(release):
    path = os.path.join(release, "runtime.json")
    try:
        with open(path) as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise AgentError(f"{path} not found: is {release} a release directory?")
    except json.JSONDecodeError as exc:
        raise AgentError(f"{path} is not valid JSON: {exc}")
    if config.get("schema") != "edgeops.runtime/v1":
        raise AgentError(f"{path}: unsupported runtime config schema {config.get('schema')!r}")
    return config


def _option_value(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _session_options(ort, config, profile_path=None):
    options = ort.SessionOptions()
    s = config["session_options"]
    options.intra_op_num_threads = int(s["intra_op_num_threads"])
    options.inter_op_num_threads = int(s["inter_op_num_threads"])
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, s["graph_optimization_level"])
    options.execution_mode = getattr(ort.ExecutionMode, s["execution_mode"])
    options.enable_cpu_mem_arena = bool(s["enable_cpu_mem_arena"])
    options.enable_mem_pattern = bool(s["enable_mem_pattern"])
    options.log_severity_level = 3
    for key, value in config.get("session_config_entries", {}).items():
        options.add_session_config_entry(key, str(value))
    if profile_path:
        options.enable_profiling = True
        options.profile_file_prefix = profile_path
    return options


def open_session(release, config, profile_path=None):
    """An InferenceSession exactly as the runtime config asks, or an AgentError saying why not."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    requested = [p["name"] for p in config["execution_providers"]]
    missing = [name for name in requested if name not in available]
    if missing:
        raise AgentError(f"requested execution provider(s) {', '.join(missing)} not available on this device "
                         f"(onnxruntime {ort.__version__} has: {', '.join(available)})", "provider-unavailable")
    providers = [(p["name"], {k: _option_value(v) for k, v in p.get("options", {}).items()})
                 for p in config["execution_providers"]]
    model = os.path.join(release, config["model"]["file"])
    try:
        return ort.InferenceSession(model, _session_options(ort, config, profile_path), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types per failure
        raise AgentError(f"cannot create a session for {model}: {str(exc).splitlines()[0][:300]}", "session-failed")


def node_placement(release, config):
    """{provider: node count} from one profiled run: proof of where the nodes really ran."""
    with tempfile.TemporaryDirectory() as tmp:
        session = open_session(release, config, os.path.join(tmp, "placement"))
        feeds = make_feeds(release, config, session)
        session.run(None, feeds[0])
        trace = session.end_profiling()
        with open(trace) as handle:
            events = json.load(handle)
    counts = {}
    nodes_on_cpu = []
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args and event.get("name", "").endswith("_kernel_time"):
            counts[args["provider"]] = counts.get(args["provider"], 0) + 1
            if args["provider"] == "CPUExecutionProvider":
                nodes_on_cpu.append(args.get("op_name", "?"))
    return counts, nodes_on_cpu


_NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int64", "int32": "int32",
                 "uint8": "uint8", "int8": "int8", "bool": "bool"}


def make_feeds(release, config, session, count=16):
    """Inputs for the benchmark: the golden samples shipped with the release, else zeros of the right shape."""
    import numpy as np

    golden = os.path.join(release, (config.get("golden") or {}).get("file", "golden.npz"))
    if os.path.exists(golden):
        data = np.load(golden)
        names = [i.name for i in session.get_inputs()]
        if all(f"in.{n}" in data.files for n in names):
            total = len(data[f"in.{names[0]}"])
            return [{n: data[f"in.{n}"][i:i + 1] for n in names} for i in range(min(count, total))]
    feeds = {}
    for spec in config["model"]["inputs"]:
        shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]
        feeds[spec["name"]] = np.zeros(shape, dtype=_NUMPY_DTYPES.get(spec["dtype"], "float32"))
    return [feeds]


def _percentile(sorted_values, q):
    if not sorted_values:
        return None
    position = (len(sorted_values) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(samples_ms, wall_s):
    ordered = sorted(samples_ms)
    return {
        "runs": len(samples_ms),
        "p50_ms": _percentile(ordered, 50), "p90_ms": _percentile(ordered, 90),
        "p95_ms": _percentile(ordered, 95), "p99_ms": _percentile(ordered, 99),
        "mean_ms": sum(samples_ms) / len(samples_ms) if samples_ms else None,
        "min_ms": ordered[0] if ordered else None, "max_ms": ordered[-1] if ordered else None,
        "throughput_per_s": len(samples_ms) / wall_s if wall_s > 0 else None,
    }


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


class Release:
    """A loaded release: config, session, inputs, and the proof of where it ran."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.config = _load_config(self.path)
        before = _rss_mb()
        self.session = open_session(self.path, self.config)
        self.feeds = make_feeds(self.path, self.config, self.session)
        self.session.run(None, self.feeds[0])
        self.load_rss_mb = _rss_mb() - before
        self.providers = self.session.get_providers()
        self.placement, self.cpu_nodes = ({}, [])
        if self.config.get("require_accelerator"):
            self.placement, self.cpu_nodes = node_placement(self.path, self.config)
            if self.cpu_nodes:
                raise AgentError(f"{len(self.cpu_nodes)} node(s) fell back to the CPU although the release requires "
                                 f"its accelerator ({', '.join(sorted(set(self.cpu_nodes))[:8])})", "cpu-fallback")

    def run_once(self, index):
        start = time.perf_counter_ns()
        self.session.run(None, self.feeds[index % len(self.feeds)])
        return (time.perf_counter_ns() - start) / 1e6

    def run_block(self, count, index):
        """``count`` timed samples (ms), one per inference."""
        return [self.run_once(index + i) for i in range(count)]

    def summary(self):
        """What this kind of release adds to its measurement (nothing for one forward pass)."""
        return {}

    def golden(self):
        return golden_check(self)

    def facts(self):
        return {"path": self.path, "model_sha256": self.config["model"]["sha256"], "providers": self.providers,
                "node_placement": self.placement, "cpu_fallback_nodes": len(self.cpu_nodes),
                "session_rss_mb": round(self.load_rss_mb, 2)}


def metric_value(metric, outputs, reference, labels=None):
    """A copy of edgeops.metrics.metric_value (devices run without edgeops); a test keeps them equal."""
    import numpy as np

    if metric == "agreement":
        ref = np.asarray(reference, dtype=np.int64)
        pred = np.asarray(outputs, dtype=np.int64)[:, :ref.shape[1]]
        valid = ref >= 0
        if not valid.any():
            raise AgentError("the golden reference has no tokens")
        return float((pred[valid] == ref[valid]).mean() * 100)
    if metric == "perplexity":
        rows = np.asarray(outputs, dtype=np.float64).reshape(-1, 2)
        if rows[:, 1].sum() <= 0:
            raise AgentError("no golden tokens to score")
        return float(math.exp(rows[:, 0].sum() / rows[:, 1].sum()))
    n = min(len(outputs), len(reference))
    out = np.asarray(outputs[:n]).reshape(n, -1).astype(np.float64)
    ref = np.asarray(reference[:n]).reshape(n, -1).astype(np.float64)
    if metric == "accuracy" and labels is not None:
        return float((out.argmax(1) == np.asarray(labels)[:n]).mean() * 100)
    if metric in ("accuracy", "top1_agreement"):
        return float((out.argmax(1) == ref.argmax(1)).mean() * 100)
    if metric == "cosine":
        norms = np.maximum(np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
        return float(np.mean(np.sum(out * ref, axis=1) / norms))
    if metric == "max_abs_error":
        return float(np.max(np.abs(out - ref)))
    raise AgentError("unknown quality metric %r" % (metric,))


def golden_check(release):
    """Run the shipped golden samples and score them like the build did."""
    import numpy as np

    golden_cfg = release.config.get("golden")
    if not golden_cfg:
        raise AgentError("this release ships no golden set")
    data = np.load(os.path.join(release.path, golden_cfg["file"]))
    names = [i.name for i in release.session.get_inputs()]
    outputs = [o.name for o in release.session.get_outputs()]
    index = outputs.index(golden_cfg["output"]) if golden_cfg["output"] in outputs else 0
    count = len(data[f"in.{names[0]}"])
    produced = np.concatenate([release.session.run(None, {n: data[f"in.{n}"][i:i + 1] for n in names})[index]
                               for i in range(count)])
    metric = golden_cfg["metric"]
    labels = data["labels"] if "labels" in data.files else None
    value = metric_value(metric, produced, data["reference"], labels)
    out = produced.reshape(count, -1).astype(np.float64)
    expected = data["expected"].reshape(count, -1).astype(np.float64)
    return {"metric": metric, "value": value, "samples": count,
            "max_abs_deviation_from_build": float(np.max(np.abs(out - expected)))}


# ------------------------------------------------------------------ text generation


class Decoder:
    """Greedy decoding with a KV cache over one onnxruntime session in onnxruntime-genai's decoder layout
    (input_ids, attention_mask, position_ids, past_key_values.N.key/value -> logits, present.N.key/value).
    The build host scores with this same class (edgeops imports it), so host and device agree by construction."""

    def __init__(self, session, head_dim=None):
        import numpy as np

        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        missing = [n for n in ("input_ids", "attention_mask") if n not in inputs]
        self.positions = "position_ids" in inputs  # some exports derive positions from the mask
        past = sorted((n for n in inputs if n.startswith("past_key_values.")),
                      key=lambda n: (int(n.split(".")[1]), n.split(".")[2] != "key"))
        outputs = [o.name for o in session.get_outputs()]
        if missing or not past or "logits" not in outputs:
            raise AgentError("not a decoder in onnxruntime-genai's layout (needs input_ids, attention_mask, "
                             "[position_ids,] past_key_values.N.key/value -> logits, present.N.key/value)",
                             "not-a-decoder")
        self.past = past
        self.present = [n.replace("past_key_values", "present") for n in past]
        first = inputs[past[0]]
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3] if isinstance(first.shape[3], int) else head_dim
        if not isinstance(self.kv_heads, int) or not isinstance(self.head_dim, int):
            raise AgentError(f"{past[0]} has shape {first.shape}: the key/value heads and head size must be "
                             "fixed in the model (or the head size given)", "not-a-decoder")
        self.dtype = np.float16 if "float16" in first.type else np.float32
        self.layers = len(past) // 2
        self.outputs = ["logits", *self.present]

    def empty(self):
        import numpy as np

        return [np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.dtype) for _ in self.past]

    def step(self, tokens, cache, start):
        """Run ``tokens`` after ``start`` cached positions: (logits [len(tokens), vocab], the new cache)."""
        import numpy as np

        count = len(tokens)
        feeds = {"input_ids": np.asarray([tokens], dtype=np.int64),
                 "attention_mask": np.ones((1, start + count), dtype=np.int64)}
        if self.positions:
            feeds["position_ids"] = np.arange(start, start + count, dtype=np.int64)[None, :]
        feeds.update(zip(self.past, cache))
        found = self.session.run(self.outputs, feeds)
        return found[0][0], found[1:]

    def greedy(self, prompt, count, eos=None):
        """The greedy continuation of ``prompt`` (token ids), up to ``count`` tokens or ``eos``."""
        logits, cache = self.step(list(prompt), self.empty(), 0)
        out, position = [], len(prompt)
        while len(out) < count:
            token = int(logits[-1].argmax())
            out.append(token)
            if token == eos or len(out) == count:
                break
            logits, cache = self.step([token], cache, position)
            position += 1
        return out

    def score(self, prompt, continuation):
        """Teacher-forced: (the greedy choice at each place of ``continuation`` given everything before it,
        the summed negative log-likelihood of ``continuation``, its length), in one pass."""
        import numpy as np

        tokens = list(prompt) + list(continuation)
        logits, _ = self.step(tokens[:-1], self.empty(), 0)
        scored = np.asarray(logits[len(prompt) - 1:], dtype=np.float64)
        shifted = scored - scored.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        targets = np.asarray(continuation, dtype=np.int64)
        nll = float(-log_probs[np.arange(len(targets)), targets].sum())
        return [int(t) for t in scored.argmax(axis=1)], nll, len(targets)

    def timed(self, prompt, count):
        """(time to first token in ms for ``prompt``, the time of each of the next ``count`` tokens in ms);
        tokens are chosen greedily and never stop at an end token, so every measurement decodes as many."""
        start = time.perf_counter_ns()
        logits, cache = self.step(list(prompt), self.empty(), 0)
        token = int(logits[-1].argmax())
        ttft = (time.perf_counter_ns() - start) / 1e6
        samples, position = [], len(prompt)
        for _ in range(count):
            start = time.perf_counter_ns()
            logits, cache = self.step([token], cache, position)
            token = int(logits[-1].argmax())
            samples.append((time.perf_counter_ns() - start) / 1e6)
            position += 1
        return ttft, samples


class GenaiDecoder:
    """Timing through onnxruntime-genai, the generation runtime the device's application uses, from the
    release's genai_config.json (the providers and threads rendered for this device)."""

    def __init__(self, release_path):
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise AgentError(f"this release is measured with onnxruntime-genai, which this device lacks ({exc})",
                             "runtime-unavailable")
        self.og = og
        try:
            self.model = og.Model(release_path)
        except Exception as exc:  # noqa: BLE001 - onnxruntime-genai raises its own types
            raise AgentError(f"onnxruntime-genai cannot load {release_path}: {str(exc).splitlines()[0][:300]}",
                             "session-failed")
        self.version = getattr(og, "__version__", "unknown")

    def timed(self, prompt, count):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + count + 1, min_length=len(prompt) + count + 1,
                                  do_sample=False)
        generator = self.og.Generator(self.model, params)
        start = time.perf_counter_ns()
        generator.append_tokens(list(prompt))
        generator.generate_next_token()
        generator.get_next_tokens()
        ttft = (time.perf_counter_ns() - start) / 1e6
        samples = []
        for _ in range(count):
            start = time.perf_counter_ns()
            generator.generate_next_token()
            generator.get_next_tokens()
            samples.append((time.perf_counter_ns() - start) / 1e6)
        return ttft, samples


def _padded_rows(array):
    """Rows of a -1-padded integer array as lists of tokens."""
    return [[int(t) for t in row if t >= 0] for row in array]


class GenerativeRelease(Release):
    """A decoder release: a sample is one decoded token; each block starts a generation with a fresh prompt
    (its time to first token kept aside) and decodes ``block`` tokens."""

    def __init__(self, path):
        import numpy as np

        self.path = os.path.abspath(path)
        self.config = _load_config(self.path)
        self.generation = self.config["generation"]
        before = _rss_mb()
        self.session = open_session(self.path, self.config)
        self.decoder = Decoder(self.session, self.generation.get("head_dim"))
        self.golden_data = np.load(os.path.join(self.path, self.config["golden"]["file"]))
        stream = [t for row in _padded_rows(self.golden_data["prompts"]) for t in row]
        wanted = int(self.generation["prompt_tokens"])
        self.prompt = (stream * (wanted // max(1, len(stream)) + 1))[:wanted]
        self.timer = self.decoder
        self.runtime = "onnxruntime " + _module_fact("onnxruntime")[0]
        if self.generation.get("runtime") == "onnxruntime-genai":
            self.timer = GenaiDecoder(self.path)
            self.runtime = "onnxruntime-genai " + self.timer.version
        self.timer.timed(self.prompt, 2)
        self.load_rss_mb = _rss_mb() - before
        self.providers = self.session.get_providers()
        self.placement, self.cpu_nodes = ({}, [])
        self.ttft_ms = []

    def run_once(self, index):
        ttft, samples = self.timer.timed(self.prompt, 1)
        return ttft + samples[0]

    def run_block(self, count, index):
        ttft, samples = self.timer.timed(self.prompt, count)
        self.ttft_ms.append(ttft)
        return samples

    def summary(self):
        return {"generation": {"runtime": self.runtime, "prompt_tokens": len(self.prompt),
                               "ttft": summarize(self.ttft_ms, sum(self.ttft_ms) / 1000.0),
                               "ttft_samples_ms": [round(v, 4) for v in self.ttft_ms]}}

    def golden(self):
        """Teacher-forced agreement with the original model's greedy tokens on the golden prompts, and the
        perplexity of the golden texts: both, whichever the goal names."""
        data, metric = self.golden_data, self.config["golden"]["metric"]
        prompts, reference = _padded_rows(data["prompts"]), data["reference"]
        rows = []
        for prompt, continuation in zip(prompts, _padded_rows(reference)):
            tokens, _, _ = self.decoder.score(prompt, continuation)
            rows.append(tokens + [-1] * (reference.shape[1] - len(tokens)))
        nll = [list(self.decoder.score(text[:1], text[1:])[1:]) for text in _padded_rows(data["texts"])]
        agreement = metric_value("agreement", rows, reference)
        ppl = metric_value("perplexity", nll, None)
        values = {"agreement": agreement, "perplexity": ppl}
        return {"metric": metric, "value": values[metric], "samples": int((reference >= 0).sum()),
                "agreement": round(agreement, 4), "perplexity": round(ppl, 6)}


def load_release(path):
    """The release at ``path``, loaded as the kind its runtime config says."""
    config = _load_config(os.path.abspath(path))
    return GenerativeRelease(path) if config.get("generation") else Release(path)


def _energy_summary(meter, energy_mj, wall_s, runs, blocks=()):
    if energy_mj is None:
        return {"source": "none"}
    out = meter.describe()
    out.update({"energy_mj": energy_mj, "window_s": wall_s, "block_energy_mj": list(blocks),
                "average_power_mw": energy_mj / wall_s if wall_s > 0 else None,
                "energy_per_inference_mj": energy_mj / runs if runs else None})
    return out


def _oom_kills():
    """How many processes the kernel's OOM killer has killed in this process's memory cgroup (None: unknown)."""
    try:
        with open("/proc/self/cgroup") as handle:
            lines = [line.strip().split(":", 2) for line in handle if line.strip()]
    except OSError:
        return None
    for _, controllers, path in lines:
        if controllers == "":  # cgroup v2
            candidates = [("/sys/fs/cgroup" + path.rstrip("/"), "memory.events")]
        elif "memory" in controllers.split(","):
            candidates = [("/sys/fs/cgroup/memory" + path.rstrip("/"), "memory.oom_control")]
        else:
            continue
        for directory, name in candidates:
            try:
                with open(os.path.join(directory, name)) as handle:
                    for line in handle:
                        if line.startswith("oom_kill "):
                            return int(line.split()[1])
            except (OSError, ValueError):
                pass
    return None


def bench(args):
    """Measure in a child forked from this process, so that a model too big for the device kills the child (the
    kernel's OOM killer, which is told to pick it first) and this process names it: ``out-of-memory``, a verdict
    on the release, not a broken agent. Forked, not started: numpy and onnxruntime are imported once per agent
    process (a session's second measurement imports nothing), the interpreter and this file are not loaded
    again. The child's peak RSS starts at what it inherited, as a fresh process's would after its imports."""
    for module in ("numpy", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            pass  # the child reports it, named, as a measurement that could not run
    before = _oom_kills()
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: measure, write one JSON document to the pipe, leave without cleanup handlers
        try:
            os.close(read_end)
            document = _bench_child(args)
            with os.fdopen(write_end, "w") as pipe:
                pipe.write(json.dumps(document))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 137 and not text):
        after = _oom_kills()
        if after is not None and before is not None and after > before:
            raise AgentError("the measurement was killed by the kernel: out of memory (the model needs more than "
                             "the device's memory limit)", "out-of-memory")
        signal_number = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 9
        raise AgentError("the measurement was killed (signal %d)" % signal_number, "killed")
    try:
        document = json.loads(text) if text else None
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise AgentError("the measurement ended without a result", "agent-broken")
    if not document.get("ok"):
        raise AgentError(document.get("message", ""), document.get("error", "agent-broken"))
    return {k: v for k, v in document.items() if k != "ok"}


def _failure(exc):
    """What a command that failed answers: its error kind and message."""
    if isinstance(exc, AgentError):
        return {"error": exc.kind, "message": str(exc)}
    return {"error": "disk-full" if exc.errno == 28 else "os-error",
            "message": f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")}


def _bench_child(args):
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("1000")  # out of memory: the kernel kills the measurement, not the session
    except OSError:
        pass
    try:
        return {"ok": True, **bench_here(args)}
    except (AgentError, OSError) as exc:
        return {"ok": False, **_failure(exc)}
    except BaseException as exc:  # noqa: BLE001 - the child answers, whatever went wrong
        return {"ok": False, "error": "agent-broken", "message": f"{type(exc).__name__}: {exc}"}


def bench_here(args):
    """Measure ``release`` alone, or interleaved with ``--compare`` (and each ``--also``): blocks in turn, the
    order rotating every turn so that no release always goes first. Sides are named a, b, c, ..."""
    paths = [args.release] + ([args.compare] if args.compare else []) + list(args.also)
    names = "abcdefgh"[:len(paths)]
    releases = {name: load_release(path) for name, path in zip(names, paths)}
    a = releases["a"]
    meter = EnergyMeter(a.config.get("power"))
    power_error = None
    try:
        meter.start()
    except AgentError as exc:
        power_error, meter = {"source": meter.source, "error": str(exc), "kind": exc.kind}, EnergyMeter(None)
    for i in range(args.warmup):
        for name in names:
            releases[name].run_once(i)
    samples = {name: [] for name in names}
    energy = {name: 0.0 for name in names}
    block_energy = {name: [] for name in names}  # per interleaved block: the gate bootstraps the energy ratio
    busy = {name: 0.0 for name in names}
    deadline = time.perf_counter() + args.duration if args.duration else None
    block, turn, index = max(1, args.block), 0, 0
    if isinstance(a, GenerativeRelease):
        block = int(a.generation["decode_tokens"])  # a block is one generation: a prompt, then its tokens

    def done():
        if deadline is not None:
            return time.perf_counter() >= deadline
        return len(samples["a"]) >= args.runs

    while not done():
        shift = turn % len(names)  # two sides: a-b, then b-a (no position bias); more: each goes first in turn
        for side in names[shift:] + names[:shift]:
            release = releases[side]
            e0, t0 = meter.energy_mj(), time.perf_counter()
            samples[side].extend(release.run_block(block, index))
            index += block
            t1, e1 = time.perf_counter(), meter.energy_mj()
            busy[side] += t1 - t0
            if e0 is not None and e1 is not None:
                energy[side] += e1 - e0
                block_energy[side].append(e1 - e0)
        turn += 1
    meter.stop()
    has_energy = meter.source != "none"
    result = {"mode": "bench" if len(names) == 1 else "compare" if len(names) == 2 else "candidates",
              "warmup": args.warmup, "block": block, "peak_rss_mb": round(_rss_mb(), 2)}
    for name in names:
        release = releases[name]
        result[name] = {**release.facts(), **release.summary(), "latency": summarize(samples[name], busy[name]),
                        "samples_ms": samples[name],
                        "power": power_error or _energy_summary(meter, energy[name] if has_energy else None,
                                                                busy[name], len(samples[name]), block_energy[name])}
        if args.golden:
            result[name]["golden"] = release.golden()
    return result


def _free_space(root):
    """(the existing directory at or above root, bytes free there for an unprivileged writer)."""
    existing = root
    while not os.path.exists(existing):  # read only: measure where the root will be created
        existing = os.path.dirname(existing) or "/"
    stat = os.statvfs(existing)
    return existing, stat.f_bavail * stat.f_frsize


def _memory_total_mb():
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _module_fact(name):
    """(version, error): never raises, so a device missing a module still reports every other fact."""
    try:
        module = __import__(name)
    except Exception as exc:  # noqa: BLE001 - a broken install must become a fact, not a crash
        return None, f"{type(exc).__name__}: {exc}"
    return getattr(module, "__version__", "unknown"), None


def _runtime_fingerprint():
    """What identifies the installed interpreter, numpy and onnxruntime, found without importing them: a
    reinstall or upgrade rewrites these files, so their paths, sizes and times change with it."""
    import importlib.util

    parts = [sys.executable, platform.python_version()]
    for name in ("numpy", "onnxruntime", "onnxruntime_genai"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        origin = spec.origin if spec is not None and spec.origin else None
        if origin is None:
            parts.append(f"{name}:absent")
            continue
        package = os.path.dirname(origin)
        stamps = []
        for path in (origin, package, os.path.join(package, "capi")):
            try:
                stat = os.stat(path)
                stamps.append(f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}")
            except OSError:
                stamps.append("-")
        parts.append(f"{name}:{origin}:{','.join(stamps)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _runtime_facts(root, keep=False):
    """numpy's and onnxruntime's versions and providers. Importing them costs most of a state read, so the
    answer is kept in <root>/agent/runtime-facts.json under the fingerprint of the installed files and
    recomputed whenever that changes; written only for a mutating command (``keep``: reads write nothing)."""
    cache = os.path.join(root, "agent", "runtime-facts.json")
    fingerprint = _runtime_fingerprint()
    try:
        with open(cache) as handle:
            kept = json.load(handle)
        if kept.get("fingerprint") == fingerprint:
            return kept["facts"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    found = {}
    for name in ("numpy", "onnxruntime"):
        version, error = _module_fact(name)
        found[name] = {"version": version, "error": error}
    found["onnxruntime"]["available_providers"] = []
    if found["onnxruntime"]["version"] is not None:
        try:
            import onnxruntime

            found["onnxruntime"]["available_providers"] = list(onnxruntime.get_available_providers())
        except Exception as exc:  # noqa: BLE001
            found["onnxruntime"]["error"] = f"get_available_providers failed: {exc}"
    found["onnxruntime_genai"] = {"version": None, "error": None}  # optional: only generation profiles need it
    try:
        import importlib.util

        installed = importlib.util.find_spec("onnxruntime_genai") is not None
    except (ImportError, ValueError):
        installed = False
    if installed:
        version, error = _module_fact("onnxruntime_genai")
        found["onnxruntime_genai"] = {"version": version, "error": None, "broken": error}
    if keep and os.path.isdir(os.path.dirname(cache)) and not any(f["error"] for f in found.values()):
        try:
            temporary = f"{cache}.{os.getpid()}.tmp"
            with open(temporary, "w") as handle:
                json.dump({"fingerprint": fingerprint, "facts": found}, handle)
            os.replace(temporary, cache)
        except OSError:
            pass  # a read-only agent directory: facts are still right, only slower
    return found


def gather_facts(root, power_config=None, keep=False):
    """What this device has, read without changing anything: works even without numpy and onnxruntime."""
    out = {
        "python": {"executable": sys.executable, "version": platform.python_version(),
                   "implementation": platform.python_implementation()},
        "machine": platform.machine(), "system": platform.system(), "kernel": platform.release(),
        "hostname": platform.node(), "cpus": os.cpu_count(), "memory_total_mb": _memory_total_mb(),
        "uid": os.getuid() if hasattr(os, "getuid") else None,
    }
    out.update(_runtime_facts(root, keep))
    measured_at, free = _free_space(root)
    used = 0
    for directory, _, names in os.walk(root):
        for name in names:
            try:
                used += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    out["disk"] = {"root": root, "measured_at": measured_at, "free_bytes": free, "used_bytes": used,
                   "root_exists": os.path.isdir(root),
                   "writable": os.access(measured_at, os.W_OK | os.X_OK)}  # the root, or where it will be made
    sensor = {"source": (power_config or {}).get("source", "none"), "readable": None, "error": None}
    if sensor["source"] == "command":
        # reading facts is what a pull request's plan does: it never runs the profile's command (verify does)
        sensor["not_run"] = "a command sensor runs only when a release is verified"
    elif sensor["source"] != "none":
        meter = EnergyMeter(power_config)
        try:
            meter.start()
            sensor["readable"] = True
        except (AgentError, KeyError, OSError, ValueError) as exc:
            sensor.update(readable=False, error=str(exc))
        finally:
            meter.stop()
    out["power_sensor"] = sensor
    out["trust"] = trust_facts(root)
    return out


def facts(args):
    return {"facts": gather_facts(args.root, json.loads(args.power) if args.power else None)}


def power(args):
    config = _load_config(args.release)
    meter = EnergyMeter(config.get("power")).start()
    start = time.perf_counter()
    time.sleep(args.seconds)
    energy = meter.energy_mj()
    meter.stop()
    return {"power": _energy_summary(meter, energy, time.perf_counter() - start, 0)}


# ------------------------------------------------------------------ release layout on the device
#
# <root>/blobs/sha256/<digest>            content-addressed files
# <root>/deployments/<name>/releases/<id>/ hard links to blobs (model.onnx, runtime.json, ...)
# <root>/deployments/<name>/current        symlink, replaced by rename(2): atomic
# <root>/deployments/<name>/previous       symlink to the release before current
# <root>/deployments/<name>/state.json     written to a temp file, fsynced, renamed
# <root>/.staging/                         uploads land here first


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _deployment_dir(root, name):
    if not name or "/" in name or name.startswith("."):
        raise AgentError(f"invalid deployment name {name!r}")
    return os.path.join(root, "deployments", name)


def _read_state(directory):
    try:
        with open(os.path.join(directory, "state.json")) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise AgentError(f"state.json is corrupt: {exc}")


def _write_atomic(path, data):
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _link(directory, name):
    try:
        return os.path.basename(os.readlink(os.path.join(directory, name)))
    except OSError:
        return None


def _switch_link(directory, name, release):
    tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    os.symlink(os.path.join("releases", release), tmp)
    os.replace(tmp, os.path.join(directory, name))  # rename(2) over the old link: atomic


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


CHAIN_LENGTH = 20  # committed releases remembered as rollback targets, newest last


@contextlib.contextmanager
def _locked(directory):
    """One lifecycle step at a time per deployment: the controller, a second controller and the trial timer."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _lifecycle(state):
    """state.json's lifecycle fields, filled in for a state written by an older agent."""
    state.setdefault("history", [])
    releases = state.setdefault("releases", {})
    chain = state.get("chain")
    if chain is None:  # older layout: the current release was the only one known to be good
        chain = [state["current"]] if state.get("current") and state.get("status") in (
            "committed", "inconclusive", "rolled_back") else []
        for release in chain:
            releases.setdefault(release, {"state": "committed", "verification": state.get("verification")})
    state["chain"] = chain
    return state


def _load(directory, deployment):
    return _lifecycle(_read_state(directory) or {"deployment": deployment})


def _settle(state, directory):
    """Derive what follows from current + chain (status fields, previous), write state.json, then the links.

    state.json is written first: if anything stops before the links follow, the next agent call sees the
    link disagree with the state and finishes the step (``_repair``).
    """
    current, chain = state.get("current"), state["chain"]
    entry = state["releases"].get(current) or {}
    state["previous"] = (chain[-2] if len(chain) > 1 else None) if chain and current == chain[-1] else \
        (chain[-1] if chain else None)
    state["committed"] = chain[-1] if chain else None
    state["verification"] = entry.get("verification")  # the numbers of the release that runs, never another's
    _write_atomic(os.path.join(directory, "state.json"), json.dumps(state, indent=2, sort_keys=True))
    _point(directory, "current", current)
    _point(directory, "previous", state["previous"])
    _fsync_dir(directory)


def _point(directory, name, release):
    if release is None:
        if os.path.lexists(os.path.join(directory, name)):
            os.unlink(os.path.join(directory, name))
    elif _link(directory, name) != release:
        _switch_link(directory, name, release)


def _event(state, action, release, by, **extra):
    state["history"] = state["history"][-49:] + [
        {"at": _now(), "action": action, "release": release, "by": by, **extra}]


# ------------------------------------------------------------------ integrity


def _release_problems(directory, release, entry, full):
    """What is wrong with a release's files: missing, resized or touched (cheap), or other bytes (full)."""
    base = os.path.join(directory, "releases", release)
    if not os.path.isdir(base):
        return ["the release directory is missing"]
    problems = []
    for name, meta in sorted((entry.get("files") or {}).items()):
        path = os.path.join(base, name)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if stat.st_size != meta["size"]:
            problems.append(f"{name} has {stat.st_size} bytes, not {meta['size']}")
        elif full and _sha256_file(path) != meta["sha256"]:
            problems.append(f"{name} does not match its sha256")
        elif not full and stat.st_mtime_ns != meta.get("mtime_ns", stat.st_mtime_ns):
            problems.append(f"{name} was modified after it was installed")
    return problems


def _require_intact(directory, release, entry):
    problems = _release_problems(directory, release, entry, full=True)
    if problems:
        raise AgentError(f"release {release} is damaged on the device ({'; '.join(problems)}); not switching to "
                         "it: apply repairs it", "release-damaged")


def _copy_verified(blob, dest, sha256):
    """Copy a blob into a release (its own file, read-only, never a link) checking its sha256 on the way."""
    digest = hashlib.sha256()
    with open(blob, "rb") as source, open(dest, "wb") as out:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != sha256:
        os.unlink(dest)
        os.unlink(blob)  # a damaged blob is dropped: the controller sends it again
        raise AgentError(f"blob {sha256} is damaged on the device and was removed; send it again", "blob-damaged")
    os.chmod(dest, 0o444)
    # Dated a whole second back: a write after this one, even within the same second, leaves a later second
    # (the only resolution SFTP gives a controller that checks the files without running the agent).
    stamp = (int(time.time()) - 1) * 1_000_000_000
    os.utime(dest, ns=(stamp, stamp))
    stat = os.stat(dest)
    return {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


# ------------------------------------------------------------------ signed releases (the trust root)
#
# A device enrolled with an allowed-signers file (OpenSSH's format, as git uses for SSH-signed commits)
# activates a new release only with release metadata signed by one of those keys: OpenSSH's
# `ssh-keygen -Y verify` checks the signature; devices without it (Dropbear images) use the built-in
# verifier below (ssh-ed25519 keys, the SSHSIG format, RFC 8032 arithmetic in pure Python).

RELEASE_NAMESPACE = "edgeops-release"
TRUST_NAMESPACE = "edgeops-trust"
SIGNER_IDENTITY = "release@edgeops"


def _trust_file(root):
    return os.path.join(root, "trust", "allowed_signers")


def trust_facts(root):
    path = _trust_file(root)
    if not os.path.isfile(path):
        return {"enrolled": False, "signers_sha256": None}
    return {"enrolled": True, "signers_sha256": _sha256_file(path),
            "verifier": "ssh-keygen" if _ssh_keygen() else "builtin"}


def _ssh_keygen():
    for candidate in ("/usr/bin/ssh-keygen", "/bin/ssh-keygen", "/usr/local/bin/ssh-keygen"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("ssh-keygen")


def verify_signature(allowed_signers, namespace, data, armored, tool=None):
    """Raise AgentError("bad-signature") unless ``armored`` signs ``data`` in ``namespace`` by an allowed key."""
    tool = _ssh_keygen() if tool is None else tool
    if tool:
        with tempfile.TemporaryDirectory() as tmp:
            signature = os.path.join(tmp, "data.sig")
            with open(signature, "w") as handle:
                handle.write(armored)
            done = subprocess.run([tool, "-Y", "verify", "-f", allowed_signers, "-I", SIGNER_IDENTITY,
                                   "-n", namespace, "-s", signature], input=data, capture_output=True, timeout=60)
        if done.returncode != 0:
            why = (done.stderr.decode(errors="replace").strip().splitlines() or ["no reason given"])[-1]
            raise AgentError(f"the signature does not verify against {allowed_signers} ({why})", "bad-signature")
        return "ssh-keygen"
    _verify_builtin(allowed_signers, namespace, data, armored)
    return "builtin"


def _ssh_string(blob, offset):
    if offset + 4 > len(blob):
        raise ValueError("truncated")
    length = int.from_bytes(blob[offset:offset + 4], "big")
    end = offset + 4 + length
    if end > len(blob):
        raise ValueError("truncated")
    return blob[offset + 4:end], end


def _allowed_keys(allowed_signers, namespace):
    keys = []
    with open(allowed_signers) as handle:
        for line in handle:
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            principals, rest = fields[0].split(","), fields[1:]
            options = rest.pop(0) if rest and not rest[0].startswith(("ssh-", "ecdsa-", "sk-")) else ""
            if SIGNER_IDENTITY not in principals or len(rest) < 2:
                continue
            allowed = [o.split("=", 1)[1].strip('"') for o in options.split(",") if o.startswith("namespaces=")]
            if allowed and namespace not in allowed[0].split(","):
                continue
            import base64

            keys.append((rest[0], base64.b64decode(rest[1])))
    return keys


def _verify_builtin(allowed_signers, namespace, data, armored):
    import base64

    lines = [line.strip() for line in armored.strip().splitlines()]
    try:
        if lines[0] != "-----BEGIN SSH SIGNATURE-----" or lines[-1] != "-----END SSH SIGNATURE-----":
            raise ValueError("not an SSH signature")
        blob = base64.b64decode("".join(lines[1:-1]))
        if blob[:6] != b"SSHSIG" or int.from_bytes(blob[6:10], "big") != 1:
            raise ValueError("not an SSHSIG version 1 signature")
        public, offset = _ssh_string(blob, 10)
        signed_namespace, offset = _ssh_string(blob, offset)
        reserved, offset = _ssh_string(blob, offset)
        hash_name, offset = _ssh_string(blob, offset)
        signature, offset = _ssh_string(blob, offset)
        key_type, key_offset = _ssh_string(public, 0)
        key_bytes, _ = _ssh_string(public, key_offset)
        sig_type, sig_offset = _ssh_string(signature, 0)
        sig_bytes, _ = _ssh_string(signature, sig_offset)
    except (ValueError, IndexError) as exc:
        raise AgentError(f"malformed signature: {exc}", "bad-signature")
    if key_type != b"ssh-ed25519" or sig_type != b"ssh-ed25519":
        raise AgentError("no ssh-keygen on this device, and the built-in verifier handles ssh-ed25519 keys only "
                         f"(this signature: {key_type.decode(errors='replace')})", "verifier-unsupported")
    if signed_namespace.decode(errors="replace") != namespace:
        raise AgentError(f"the signature is for namespace {signed_namespace!r}, not {namespace}", "bad-signature")
    if public not in [k for _, k in _allowed_keys(allowed_signers, namespace)]:
        raise AgentError(f"the signing key is not in {allowed_signers}", "bad-signature")
    algorithm = {b"sha512": hashlib.sha512, b"sha256": hashlib.sha256}.get(hash_name)
    if algorithm is None:
        raise AgentError(f"unsupported signature hash {hash_name!r}", "bad-signature")

    def string(value):
        return len(value).to_bytes(4, "big") + value

    message = b"SSHSIG" + string(signed_namespace) + string(reserved) + string(hash_name) + \
        string(algorithm(data).digest())
    if len(key_bytes) != 32 or len(sig_bytes) != 64 or not _ed25519_verify(key_bytes, message, sig_bytes):
        raise AgentError(f"the signature does not verify against {allowed_signers}", "bad-signature")


_P = 2 ** 255 - 19
_L = 2 ** 252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P


def _recover_x(y, sign):
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    if x2 % _P == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    if (x * x - x2) % _P:
        return None
    return _P - x if (x & 1) != sign else x


def _decompress(encoded):
    y = int.from_bytes(encoded, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


def _point_add(a, b):
    first = (a[1] - a[0]) * (b[1] - b[0]) % _P
    second = (a[1] + a[0]) * (b[1] + b[0]) % _P
    c = 2 * a[3] * b[3] * _D % _P
    d = 2 * a[2] * b[2] % _P
    e, f, g, h = second - first, d - c, d + c, second + first
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _point_mul(scalar, point):
    result = (0, 1, 1, 0)
    while scalar:
        if scalar & 1:
            result = _point_add(result, point)
        point, scalar = _point_add(point, point), scalar >> 1
    return result


_GY = 4 * pow(5, _P - 2, _P) % _P
_G = (_recover_x(_GY, 0), _GY, 1, _recover_x(_GY, 0) * _GY % _P)


def _ed25519_verify(public, message, signature):
    """RFC 8032 Ed25519 verification (cofactorless), for devices without OpenSSH."""
    point_a, point_r = _decompress(public), _decompress(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if point_a is None or point_r is None or s >= _L:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % _L
    left, right = _point_mul(s, _G), _point_add(point_r, _point_mul(h, point_a))
    return (left[0] * right[2] - right[0] * left[2]) % _P == 0 and (left[1] * right[2] - right[1] * left[2]) % _P == 0


def _check_signed(root, directory, state, target, metadata_b64, signature_b64):
    """Before a new release runs on an enrolled device: its metadata must be signed, current, for this
    deployment and release, list exactly the files on the device, and not be older than the committed one."""
    import base64

    allowed = _trust_file(root)
    if not os.path.isfile(allowed):
        return None
    if not metadata_b64 or not signature_b64:
        raise AgentError(f"release {target} is not signed and this device is enrolled for signed releases "
                         f"({allowed}); not switching to it", "unsigned")
    data, armored = base64.b64decode(metadata_b64), base64.b64decode(signature_b64).decode()
    verifier = verify_signature(allowed, RELEASE_NAMESPACE, data, armored)
    try:
        meta = json.loads(data)
    except ValueError:
        raise AgentError("the signed release metadata is not JSON", "metadata-mismatch")
    deployment = os.path.basename(directory)
    if meta.get("deployment") != deployment or meta.get("release") != target:
        raise AgentError(f"the signed metadata is for {meta.get('deployment')}/{meta.get('release')}, not "
                         f"{deployment}/{target}", "metadata-mismatch")
    if float(meta.get("expires", 0)) <= time.time():
        raise AgentError(f"the signed metadata of {target} expired at {meta.get('expires_at')}; sign it again",
                         "expired")
    entry = state["releases"].get(target, {})
    on_device = {name: {"sha256": f["sha256"], "size": f["size"]} for name, f in (entry.get("files") or {}).items()}
    if on_device != meta.get("files"):
        changed = sorted(set(on_device) ^ set(meta.get("files") or {}) | {
            n for n in on_device if n in (meta.get("files") or {}) and on_device[n] != meta["files"][n]})
        raise AgentError(f"the files of {target} on the device are not the ones signed ({', '.join(changed)})",
                         "file-mismatch")
    committed = state["chain"][-1] if state["chain"] else None
    floor = int(state["releases"].get(committed, {}).get("generation", 0)) if committed else 0
    if int(meta.get("generation", -1)) < floor:
        raise AgentError(f"release {target} has generation {meta.get('generation')}, older than the committed "
                         f"{committed} ({floor}): a downgrade is refused", "downgrade")
    return {"generation": int(meta["generation"]), "expires_at": meta.get("expires_at"), "verifier": verifier,
            "signed_at": meta.get("created_at"), "signed_files": meta.get("files"),
            "signed": {"metadata": metadata_b64, "signature": signature_b64}}


ORDER_KIND = "edgeops.order/v1"


def _identity(root):
    try:
        with open(os.path.join(root, "trust", "identity")) as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _check_order(root, state, deployment, action, release, allow_rejected, order_b64, signature_b64,
                 required, record=True, bindings=None):
    """The controller's signed order for a change of what runs: by the release key, for this device,
    deployment, action and release (and ``bindings``), newer than every order this device took (no replays).
    Required on an enrolled device for what no release signature covers (rollback, uninstall, training);
    checked whenever given."""
    import base64

    allowed = _trust_file(root)
    if not os.path.isfile(allowed):
        return None
    if not order_b64 or not signature_b64:
        if required:
            raise AgentError(f"{action} of {deployment} needs an order signed by the release key on this enrolled "
                             "device (a deploy key or a broker password alone cannot change what runs)", "unsigned")
        return None
    data = base64.b64decode(order_b64)
    verify_signature(allowed, RELEASE_NAMESPACE, data, base64.b64decode(signature_b64).decode())
    try:
        order = json.loads(data)
    except ValueError:
        raise AgentError("the signed order is not JSON", "order-mismatch")
    wanted = {"kind": ORDER_KIND, "deployment": deployment, "action": action, "release": release, **(bindings or {})}
    got = {k: order.get(k) for k in wanted}
    if got != wanted or bool(order.get("allow_rejected")) != bool(allow_rejected):
        raise AgentError(f"the signed order is for {got}, not {wanted}", "order-mismatch")
    identity = _identity(root)
    if identity is not None and order.get("device") != identity:
        raise AgentError(f"the signed order is for device {order.get('device')}, this is {identity}", "order-mismatch")
    last = int(state.get("order_sequence") or 0)
    if int(order.get("sequence") or 0) <= last:
        raise AgentError(f"the signed order {order.get('sequence')} is not newer than the last taken ({last}): a "
                         "replay is refused", "replay")
    if record:
        state["order_sequence"] = int(order["sequence"])
    return order


def _fenced(state, args):
    """Refuse a change from a controller whose lock is older than the newest one this device has seen; remember
    the newest (the fleet lock's fencing token)."""
    fence = getattr(args, "fence", None)
    if fence is None:
        return
    last = int(state.get("fence") or 0)
    if fence < last:
        raise AgentError(f"a newer controller (fencing token {last}) has changed this device since; this one "
                         f"(token {fence}) lost its lock and is refused", "fenced")
    state["fence"] = fence
    state_file = os.path.join(_deployment_dir(args.root, args.deployment), "state.json")
    if fence > last and os.path.exists(state_file):  # kept at once: a newer holder is known even if its step fails
        _write_atomic(state_file, json.dumps(state, indent=2, sort_keys=True))


def _committed_before(state, release):
    """This device committed ``release`` itself at some point (it is, or was, in the committed chain)."""
    entry = state["releases"].get(release) or {}
    return release in state["chain"] or bool(entry.get("ever_committed")) or entry.get("state") in (
        "committed", "rolled_back")


def _may_become_current(root, directory, state, target, action, allow_rejected=False, metadata=None,
                        signature=None, trial_window=None):
    """The one set of preconditions for ``target`` to become the release that runs, on every path (activate,
    rollback, trial expiry, revert, abort, pull messages, the daemon's own steps). Raises AgentError.

    The release is on the device and complete; every file hashes to what was recorded when it was assembled
    (and, when signed, to the signed metadata); on an enrolled device a release this device never committed
    needs a valid signature, unexpired, not older than the committed one; a release not committed here runs
    only as a trial with its timer armed. ``allow_rejected`` relaxes only the "it was rejected here" rule.
    """
    releases = state["releases"]
    entry = releases.get(target) or {}
    if not os.path.isdir(os.path.join(directory, "releases", target)):
        raise AgentError(f"release {target} is not on the device", "release-missing")
    known_good = _committed_before(state, target)
    if not known_good and entry.get("state") == "rejected" and not allow_rejected:
        raise AgentError(f"release {target} was rejected on this device; name it with --allow-rejected to run "
                         "it anyway", "release-rejected")
    if action == "rollback" and not known_good and not allow_rejected:
        raise AgentError(f"release {target} was never committed on this device (committed: "
                         f"{', '.join(state['chain']) or 'none'})", "release-not-committed")
    if not entry.get("files"):
        raise AgentError(f"release {target} has no record of its files on this device; not switching to it",
                         "release-damaged")
    _require_intact(directory, target, entry)
    signed_files = entry.get("signed_files")
    if signed_files is not None and signed_files != {n: {"sha256": f["sha256"], "size": f["size"]}
                                                     for n, f in entry["files"].items()}:
        raise AgentError(f"the files recorded for {target} are not the ones its signed metadata lists; not "
                         "switching to it", "file-mismatch")
    if known_good:
        return None
    kept = entry.get("signed") or {}
    signed = _check_signed(root, directory, state, target, metadata or kept.get("metadata"),
                           signature or kept.get("signature"))
    if not trial_window or trial_window <= 0:
        raise AgentError(f"release {target} was never committed here: it runs only as a trial with its timer "
                         "armed (--trial-window)", "timer-required")
    return signed


def layout_enroll(args):
    """Install or rotate the trust root. A device that has one takes a new one only signed by a current key."""
    import base64

    content = base64.b64decode(args.signers)
    path = _trust_file(args.root)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    identity = os.path.join(os.path.dirname(path), "identity")
    if getattr(args, "identity", None) and not os.path.exists(identity):
        _write_atomic(identity, args.identity + "\n")
    current = None
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            current = handle.read()
    if current == content:
        return {"enrolled": True, "changed": False, "signers_sha256": hashlib.sha256(content).hexdigest()}
    if current is not None:
        if not args.signature:
            raise AgentError(f"this device already trusts {path}; a new trust root must be signed with a key it "
                             "trusts now (edgeops enroll --signed-by OLD_KEY)", "unsigned")
        verify_signature(path, TRUST_NAMESPACE, content, base64.b64decode(args.signature).decode())
    if current is not None:
        os.chmod(path, 0o644)
    _write_atomic(path, content.decode())
    os.chmod(path, 0o444)
    return {"enrolled": True, "changed": True, "rotated": current is not None,
            "signers_sha256": hashlib.sha256(content).hexdigest()}


# ------------------------------------------------------------------ the trial timer


def _revert(state, directory, by, reason, verdict=True):
    """Leave the running trial release; back to the last committed release (or to none).

    ``verdict``: the release failed its verification and is rejected (never a baseline, never activated
    again unless named). Otherwise the trial was only aborted (an error, a cut, a controller that never came
    back): the release may be tried again.
    """
    old, chain, releases = state.get("current"), state["chain"], state["releases"]
    if old and old not in chain:
        entry = releases.setdefault(old, {})
        entry["state"] = "rejected" if verdict else "aborted"
        if verdict:
            state["last_rejected"] = {"release": old, "at": _now(), "by": by,
                                      "reason": reason or (entry.get("verification") or {}).get("reason", "")}
    target = chain[-1] if chain else None
    if target is not None:
        root = os.path.dirname(os.path.dirname(directory))  # <root>/deployments/<name>
        _heal_release(root, directory, state, target)  # the way back restores its recorded bytes from the blobs
        _may_become_current(None, directory, state, target, "revert")
    state["current"] = target
    state["status"] = releases[target].get("status", "committed") if target else "removed"
    state.pop("trial", None)
    _event(state, "revert", target, by, **{"from": old, "reason": reason} if reason else {"from": old})
    return old, target


def _spawn_timer(args, release, deadline):
    """A process that outlives this SSH session and reverts the trial release at the deadline unless committed."""
    argv = [sys.executable, os.path.abspath(__file__), "watchdog", "--root", args.root, "--deployment",
            args.deployment, "--release", release, "--deadline", repr(deadline)]
    with open(os.devnull, "rb") as null_in, open(os.devnull, "wb") as null_out:
        process = subprocess.Popen(argv, stdin=null_in, stdout=null_out, stderr=null_out, close_fds=True,
                                   start_new_session=True)
    return process.pid


def _expire_trial(state, directory, now):
    trial = state.get("trial") or {}
    if trial and now >= trial["deadline"] and state.get("current") == trial["release"] \
            and trial["release"] not in state["chain"]:
        window = trial.get("window_s", 0)
        _revert(state, directory, "device", f"the trial window of {window:g} s ran out without a commit from "
                                            "the controller: reverted by the device", verdict=False)
        return f"trial of {trial['release']} expired: reverted"
    return None


def _half_done(state, directory, now):
    """What a crash, a cut or a dead timer left half done, as a read reports it (nothing is changed)."""
    found = []
    trial = state.get("trial") or {}
    if trial and now >= trial["deadline"] and state.get("current") == trial["release"] \
            and trial["release"] not in state["chain"]:
        found.append(f"the trial of {trial['release']} ended at {trial.get('until')} without a commit; its revert "
                     "is pending (the next apply or reconcile finishes it)")
    link, current = _link(directory, "current"), state.get("current")
    if link != current:
        found.append(f"current points at {link or 'nothing'} while the state says {current or 'nothing'} (since "
                     f"{_mtime_text(os.path.join(directory, 'current'))}); the next apply or reconcile settles it")
    return found


def _mtime_text(path):
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.lstat(path).st_mtime))
    except OSError:
        return "an unknown time"


def _repair(state, directory):
    """Finish what a crash, a cut or a full disk left half done; say what was done."""
    done = []
    expired = _expire_trial(state, directory, time.time())
    if expired:
        done.append(expired)
    link, current = _link(directory, "current"), state.get("current")
    if link != current and (current is None or os.path.isdir(os.path.join(directory, "releases", current))):
        done.append(f"current pointed at {link or 'nothing'} while the state said {current or 'nothing'}: "
                    "the interrupted switch was finished")
    if done:
        _settle(state, directory)
    return done


WATCH_INTERVAL_S = 2.0


def layout_watchdog(args):
    """Wait for the deadline, leaving early once the trial is settled (committed, reverted, paused)."""
    directory = _deployment_dir(args.root, args.deployment)
    while time.time() < args.deadline:
        time.sleep(min(WATCH_INTERVAL_S, max(0.0, args.deadline - time.time())))
        try:
            trial = (_read_state(directory) or {}).get("trial") or {}
        except AgentError:
            continue  # being rewritten: look again
        if trial.get("release") != args.release or trial.get("deadline") != args.deadline:
            return {"expired": False}
    with _locked(directory):
        state = _load(directory, args.deployment)
        expired = _expire_trial(state, directory, time.time())
        if expired:
            _settle(state, directory)
    return {"expired": bool(expired)}


# ------------------------------------------------------------------ adaptation (a federated round's local step)
#
# The head is canonical here: weight [features, classes], bias [classes]. The controller says how the model
# stores it (``transposed``: a Gemm with transB=1 keeps [classes, features]). edgeops imports train_head and
# head_accuracy from this file: the controller's central reference trains exactly as a device does.


def head_logits(features, weight, bias):
    return features @ weight + bias


def head_accuracy(features, labels, weight, bias):
    import numpy as np

    if not len(labels):
        return None
    return float(np.mean(np.argmax(head_logits(features, weight, bias), axis=1) == labels) * 100.0)


def train_head(features, labels, weight, bias, epochs=1, learning_rate=0.1, batch_size=32, proximal_mu=0.0,
               seed=0):
    """Minibatch SGD on softmax cross-entropy (closed-form gradients); ``proximal_mu`` > 0 adds FedProx's
    pull towards the starting tensors. Returns new (weight, bias); the inputs are not changed."""
    import numpy as np

    w, b = weight.astype(np.float64).copy(), bias.astype(np.float64).copy()
    w0, b0 = w.copy(), b.copy()
    rng = np.random.default_rng(seed)
    count = len(labels)
    for _ in range(int(epochs)):
        order = rng.permutation(count)
        for start in range(0, count, int(batch_size)):
            index = order[start:start + int(batch_size)]
            x, y = features[index].astype(np.float64), labels[index]
            logits = x @ w + b
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(y)), y] -= 1.0
            p /= len(y)
            grad_w, grad_b = x.T @ p, p.sum(axis=0)
            if proximal_mu:
                grad_w += proximal_mu * (w - w0)
                grad_b += proximal_mu * (b - b0)
            w -= learning_rate * grad_w
            b -= learning_rate * grad_b
    return w.astype(np.float32), b.astype(np.float32)


def _local_samples(directory, names):
    """Every .npz under ``directory``: the model's inputs by name plus ``labels``; (inputs, labels, files)."""
    import numpy as np

    files = sorted(f for f in os.listdir(directory) if f.endswith(".npz")) if os.path.isdir(directory) else []
    inputs, labels = {n: [] for n in names}, []
    for name in files:
        try:
            with np.load(os.path.join(directory, name), allow_pickle=False) as data:
                if "labels" not in data or any(n not in data for n in names):
                    continue  # not a sample file this model can use: the application's other files
                for n in names:
                    inputs[n].append(data[n])
                labels.append(data["labels"].reshape(-1).astype(np.int64))
        except (OSError, ValueError):
            continue
    if not labels:
        return None, None, 0
    return {n: np.concatenate(v) for n, v in inputs.items()}, np.concatenate(labels), len(files)


def _encode(array):
    import numpy as np

    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()


def training_digests(tensors, spec):
    """What a training order binds besides its deadline: the sha256 of the round's tensors (the .npz bytes) and of
    its spec (canonical JSON). The controller signs these; the device checks them."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
    return {"tensors_sha256": hashlib.sha256(tensors).hexdigest(), "spec_sha256": hashlib.sha256(canonical).hexdigest()}


def _check_training_order(args, state, running, spec):
    """On an enrolled device a round's local step needs the controller's order, signed by the release key, for
    these tensors and this spec, before its deadline: a broker password or a deploy key alone cannot make the
    device train on its own data and send what it learned. Nothing is recorded (a replay of the same order
    before its deadline asks for the same update again)."""
    with open(args.tensors, "rb") as handle:
        bindings = training_digests(handle.read(), spec)
    order = _check_order(args.root, state, args.deployment, "train", running, False, args.order,
                         args.order_signature, required=True, record=False, bindings=bindings)
    if order is not None and not time.time() <= float(order.get("deadline") or 0):
        raise AgentError("the signed training order's deadline has passed", "expired")


def layout_adapt_train(args):
    """One device's step of a federated round: the committed release computes features of the local samples,
    the head trains from the tensors the controller sent, and only the clipped difference leaves the device,
    with the sample count and the local validation accuracy of the sent and the trained head."""
    import numpy as np

    spec = json.loads(args.spec)
    directory = _deployment_dir(args.root, args.deployment)
    state = _read_state(directory) or {}
    running = _link(directory, "current")
    if state.get("trial") or running is None or running != state.get("committed"):
        raise AgentError("the device is not on a committed release (a trial or none): it does not train now",
                         "not-committed")
    if spec.get("release") and running != spec["release"]:
        raise AgentError(f"the device runs {running}, not {spec['release']} that this round trains",
                         "release-mismatch")
    _check_training_order(args, state, running, spec)
    data = os.path.join(args.root, spec["data"])
    if not _inside(args.root, data):
        raise AgentError(f"{spec['data']} is outside this device's root", "restricted")
    release = os.path.join(directory, "releases", running)
    config = _load_config(release)
    session = open_session(release, config)
    names = [i.name for i in session.get_inputs()]
    inputs, labels, files = _local_samples(data, names)
    if labels is None:
        raise AgentError(f"no labelled samples under {data}", "no-data")
    chunks = []
    for start in range(0, len(labels), 64):
        feeds = {n: inputs[n][start:start + 64].astype(np.float32) for n in names}
        chunks.append(session.run([spec["features"]], feeds)[0].reshape(len(feeds[names[0]]), -1))
    features = np.concatenate(chunks).astype(np.float32)
    with np.load(args.tensors, allow_pickle=False) as sent:
        weight, bias = sent[spec["weight"]], sent[spec["bias"]]
    canonical = weight.T if spec.get("transposed") else weight
    every = max(2, int(round(1.0 / spec["validation_fraction"]))) if spec.get("validation_fraction") else 0
    held = np.arange(len(labels)) % every == every - 1 if every else np.zeros(len(labels), bool)
    if held.all() or not (~held).any():
        held[:] = False
    trained_w, trained_b = train_head(features[~held], labels[~held], canonical, bias, spec["epochs"],
                                      spec["learning_rate"], spec["batch_size"], spec.get("proximal_mu", 0.0),
                                      spec.get("seed", 0))
    delta_w, delta_b = trained_w - canonical, trained_b - bias
    norm = float(np.sqrt((delta_w.astype(np.float64) ** 2).sum() + (delta_b.astype(np.float64) ** 2).sum()))
    clip = float(spec.get("clip_norm") or 0)
    scale = clip / norm if clip and norm > clip else 1.0
    delta_w, delta_b = delta_w * scale, delta_b * scale
    validation = None
    if held.any():
        validation = {"samples": int(held.sum()),
                      "sent_accuracy": head_accuracy(features[held], labels[held], canonical, bias),
                      "trained_accuracy": head_accuracy(features[held], labels[held], trained_w, trained_b)}
    try:
        os.unlink(args.tensors)  # the sent tensors were staged for this step only
    except OSError:
        pass
    return {"release": running, "samples": int((~held).sum()), "files": files, "norm": round(norm, 6),
            "clipped": scale < 1.0, "validation": validation,
            "update": {spec["weight"]: _encode(delta_w.T if spec.get("transposed") else delta_w),
                       spec["bias"]: _encode(delta_b)}}


# ------------------------------------------------------------------ commands


FACTS_FILE = "facts.json"


def _keep_facts(root, power, found):
    """The facts just gathered, in <root>/agent/facts.json with when and for which power sensor: a controller
    that reads the device's files over SFTP alone (no shell, no Python) takes them from there while fresh."""
    agent_dir = os.path.join(root, "agent")
    if not os.path.isdir(agent_dir):
        return
    try:
        temporary = os.path.join(agent_dir, f".{FACTS_FILE}.{os.getpid()}")
        with open(temporary, "w") as handle:
            json.dump({"at": time.time(), "power": power, "facts": found}, handle)
        os.replace(temporary, os.path.join(agent_dir, FACTS_FILE))
    except OSError:
        pass  # a read-only agent directory: reads run the agent every time


def layout_state(args):
    """The deployment's state as the device holds it (finishing any half-done step first)."""
    directory = _deployment_dir(args.root, args.deployment)
    blobs_dir = os.path.join(args.root, "blobs", "sha256")
    releases_dir = os.path.join(directory, "releases")
    state_error = None
    try:
        state = _read_state(directory)  # a read: never finishes, repairs or prunes anything
    except AgentError as exc:  # a corrupt state.json: Damaged, rebuilt by the next apply (heal)
        state, state_error = None, str(exc)
    half_done = []
    if state is not None:
        state = _lifecycle(state)
        half_done = _half_done(state, directory, time.time())
    _, free_bytes = _free_space(args.root)
    agent_file = os.path.join(args.root, "agent", "edgeops_agent.py")
    verify, facts = getattr(args, "verify", False), getattr(args, "facts", False)  # prepare reports state too
    damaged = {}
    if state is not None:
        checked = [_link(directory, "current") or state.get("current")] + (
            [state.get("committed"), state.get("previous")] if verify else [])
        for release in dict.fromkeys(r for r in checked if r):
            problems = _release_problems(directory, release, state["releases"].get(release, {}), verify)
            if problems:
                damaged[release] = problems
    running = _link(directory, "current")  # what runs is what the link points at, whatever the state says
    out = {
        "root": args.root,
        "state": state,
        "current": running,
        "previous": state.get("previous") if state else None,
        "releases": sorted(os.listdir(releases_dir)) if os.path.isdir(releases_dir) else [],
        "blobs": sorted(os.listdir(blobs_dir)) if os.path.isdir(blobs_dir) else [],
        "free_bytes": free_bytes,
        "agent_sha256": _sha256_file(agent_file) if os.path.exists(agent_file) else None,
        "damaged": damaged,
        "verified": bool(verify),
        "half_done": half_done,
        "trust": trust_facts(args.root),
        "state_error": state_error,
    }
    if facts:
        out["facts"] = gather_facts(args.root, json.loads(args.power) if args.power else None,
                                    keep=getattr(args, "keep", False))
        if getattr(args, "keep", False):  # asked for by a mutating command only: reads write nothing
            _keep_facts(args.root, args.power, out["facts"])
    return out


PART_MAX_AGE_S = 7 * 24 * 3600


def _resumable(item):
    """``<sha256>.part``: an upload of that blob that may be resumed (uploads name their parts this way)."""
    stem = item[:-len(".part")] if item.endswith(".part") else ""
    return len(stem) == 64 and all(c in "0123456789abcdef" for c in stem)


def layout_prepare(args):
    """Create the directories and clear leftovers of interrupted steps; an interrupted upload's part is kept
    (a week at most) so that the next push resumes it: ``parts`` says how many bytes each holds."""
    staging = os.path.join(args.root, ".staging")
    for path in (staging, os.path.join(args.root, "blobs", "sha256"), os.path.join(args.root, "agent"),
                 os.path.join(_deployment_dir(args.root, args.deployment), "releases")):
        os.makedirs(path, exist_ok=True)
    removed, parts = 0, {}
    for item in os.listdir(staging):
        path = os.path.join(staging, item)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif _resumable(item) and not os.path.islink(path) and \
                time.time() - os.path.getmtime(path) < PART_MAX_AGE_S:
            parts[item] = os.path.getsize(path)
            continue
        else:
            os.unlink(path)
        removed += 1
    return {"staging_removed": removed, "parts": parts, **layout_state(args)}


def _commit_blob(root, staged, sha256):
    """Move an uploaded file from staging into blobs/ only if its sha256 matches."""
    actual = _sha256_file(staged)
    if actual != sha256:
        os.unlink(staged)
        raise AgentError(f"checksum mismatch for {os.path.basename(staged)}: expected {sha256}, "
                         f"got {actual}; the upload was discarded", "checksum-mismatch")
    with open(staged, "rb") as handle:
        os.fsync(handle.fileno())
    target = os.path.join(root, "blobs", "sha256", sha256)
    os.replace(staged, target)
    _fsync_dir(os.path.dirname(target))


AGENT_KIND = "edgeops.agent/v1"


def agent_statement(sha256):
    """What the release key signs to let an enrolled device run a new agent."""
    return json.dumps({"kind": AGENT_KIND, "sha256": sha256}, sort_keys=True, separators=(",", ":")).encode()


def layout_install_agent(args):
    """Replace the installed agent with an uploaded one; on an enrolled device only one the release key signed."""
    import base64

    _require_staged(args.root, args.staged)
    actual = _sha256_file(args.staged)
    if actual != args.sha256:
        os.unlink(args.staged)
        raise AgentError("checksum mismatch for the uploaded agent", "checksum-mismatch")
    if os.path.isfile(_trust_file(args.root)):
        if not args.signature:
            os.unlink(args.staged)
            raise AgentError("this device is enrolled: a new agent needs the release key's signature of its "
                             "sha256", "unsigned")
        verify_signature(_trust_file(args.root), RELEASE_NAMESPACE, agent_statement(actual),
                         base64.b64decode(args.signature).decode())
    os.replace(args.staged, os.path.join(args.root, "agent", "edgeops_agent.py"))
    return {"agent_sha256": actual}


def _require_staged(root, path):
    if not _inside(os.path.join(root, ".staging"), path) or os.path.realpath(path) == os.path.realpath(
            os.path.join(root, ".staging")):
        raise AgentError(f"{path} is not an upload in {root}/.staging", "restricted")


PATCH_FORMAT = "edgeops.blockpatch/v1"


def _blob_path(root, digest):
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise AgentError(f"invalid blob digest {digest!r}", "usage")
    path = os.path.join(root, "blobs", "sha256", digest)
    if not os.path.isfile(path) or os.path.islink(path):
        raise AgentError(f"blob {digest} is not on this device", "blob-missing")
    return path


def block_hashes(path, block):
    """The first 16 hex digits of the sha256 of each ``block``-byte block of a file (a patch's base)."""
    out = []
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            out.append(hashlib.sha256(chunk).hexdigest()[:16])
    return out


def layout_blocks(args):
    """Block hashes of a blob this device holds: the controller sends only the blocks of a new file that differ."""
    if not 64 <= args.block <= (1 << 24):
        raise AgentError("invalid block size", "usage")
    return {"blob": args.blob, "block": args.block, "hashes": block_hashes(_blob_path(args.root, args.blob),
                                                                            args.block)}


def layout_patch(args):
    """Rebuild a file from a blob this device holds and an uploaded block patch (changed blocks only), into
    .staging; refused unless the result hashes to ``--sha256`` (what the release's signed file table says). The
    result goes into blobs/ only through ``assemble``, which checks it again."""
    _require_staged(args.root, args.patch)
    base = _blob_path(args.root, args.base)
    try:
        with open(args.patch, "rb") as handle:
            header = json.loads(handle.readline())
            if header.get("format") != PATCH_FORMAT or header.get("base") != args.base or \
                    header.get("target") != args.sha256:
                raise ValueError("header does not match")
            block, size, blocks = int(header["block"]), int(header["size"]), [int(i) for i in header["blocks"]]
            if block < 64 or size < 0 or any(not 0 <= i * block < max(size, 1) for i in blocks):
                raise ValueError("blocks out of range")
            target = os.path.join(args.root, ".staging", f"{args.sha256}.patched-{uuid.uuid4().hex[:8]}")
            digest = hashlib.sha256()
            with open(base, "rb") as source, open(target, "wb") as out:
                wanted = dict.fromkeys(blocks)
                for index in range((size + block - 1) // block):
                    length = min(block, size - index * block)
                    old = source.read(block)
                    data = handle.read(length) if index in wanted else old[:length]
                    if len(data) != length:
                        raise ValueError("the patch or its base is short")
                    digest.update(data)
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
    except (ValueError, KeyError, TypeError) as exc:
        raise AgentError(f"the patch for {args.sha256[:12]} is unusable ({exc}); nothing changed", "patch-mismatch")
    finally:
        if os.path.exists(args.patch):
            os.unlink(args.patch)
    if digest.hexdigest() != args.sha256:
        os.unlink(target)
        raise AgentError(f"the file rebuilt from its patch hashes to {digest.hexdigest()[:12]}, not "
                         f"{args.sha256[:12]}: refused, nothing changed", "patch-mismatch")
    return {"path": target, "sha256": args.sha256}


def layout_assemble(args):
    """Commit uploaded blobs (sha256 checked), build releases/<id>/ from verified copies, move it in with one rename.

    With --repair an existing release gets its missing or damaged files back from the blobs.
    """
    directory = _deployment_dir(args.root, args.deployment)
    uploads = sorted(json.loads(args.staged or "{}").items())
    for staged, _ in uploads:
        _require_staged(args.root, staged)
    try:
        for staged, sha256 in uploads:
            _commit_blob(args.root, staged, sha256)
    except AgentError:
        for staged, _ in uploads:  # a bad upload voids the whole push: leave nothing half-done behind
            if os.path.exists(staged):
                os.unlink(staged)
        raise
    files = json.loads(args.files)
    for name in files:
        if "/" in name or name.startswith("."):
            raise AgentError(f"invalid release file name {name!r}")
    with _locked(directory):
        state = _load(directory, args.deployment)
        _fenced(state, args)
        entry = state["releases"].setdefault(args.release, {"state": "staged"})
        final = os.path.join(directory, "releases", args.release)
        if os.path.isdir(final):
            if not args.repair:
                return {"release": args.release, "assembled": False}
            recorded = entry.get("files") or {}
            fixed = []
            for name, digest in sorted(files.items()):
                meta = recorded.get(name)
                if meta is None or meta.get("sha256") != digest:
                    raise AgentError(f"a repair restores the bytes recorded for {args.release}: {name} is recorded "
                                     f"as {(meta or {}).get('sha256') or 'no file'}, not {digest}; nothing changed",
                                     "file-mismatch")
                if _release_problems(directory, args.release, {"files": {name: meta}}, True):
                    tmp = os.path.join(final, f".{name}.repair-{uuid.uuid4().hex[:8]}")
                    restored = _copy_verified(_blob(args.root, digest, name), tmp, meta["sha256"])
                    os.replace(tmp, os.path.join(final, name))
                    meta["mtime_ns"] = restored["mtime_ns"]  # the recorded hash and size never change
                    fixed.append(name)
            _fsync_dir(final)
            _event(state, "repair", args.release, "edgeops", files=fixed)
            _settle(state, directory)
            return {"release": args.release, "assembled": False, "repaired": fixed}
        staging = os.path.join(args.root, ".staging", f"release-{args.release}-{uuid.uuid4().hex[:8]}")
        os.makedirs(staging)
        manifest = {}
        for name, digest in sorted(files.items()):
            manifest[name] = _copy_verified(_blob(args.root, digest, name), os.path.join(staging, name), digest)
        _fsync_dir(staging)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(staging, final)
        _fsync_dir(os.path.dirname(final))
        entry["files"] = manifest
        _settle(state, directory)
    return {"release": args.release, "assembled": True}


def _blob(root, digest, name):
    blob = os.path.join(root, "blobs", "sha256", digest)
    if not os.path.exists(blob):
        raise AgentError(f"blob {digest} for {name} is missing on the device", "blob-missing")
    return blob


def layout_switch(args):
    """Change the release that runs. One of:

    activate  R: R becomes a trial release (the committed one stays the baseline and the way back); the
                 device reverts by itself unless the controller commits within --trial-window S seconds
    revert     : the trial release is rejected; back to the last committed release (or to none)
    rollback  R: back to R, an earlier committed release; the releases committed after it leave the chain
                 (a release never committed here, named with --allow-rejected, runs as a trial instead)
    uninstall  : no release runs (only when the user asks for it)
    Every target passes ``_may_become_current``: complete, hashes as recorded and signed, signature on an
    enrolled device, timer armed.
    """
    directory = _deployment_dir(args.root, args.deployment)
    os.makedirs(os.path.join(directory, "releases"), exist_ok=True)
    with _locked(directory):
        state = _load(directory, args.deployment)
        _fenced(state, args)
        _repair(state, directory)
        old, chain, releases = state.get("current"), state["chain"], state["releases"]
        if args.action == "revert":
            old, target = _revert(state, directory, args.by, args.reason or "", verdict=not args.aborted)
        else:
            target = None if args.release in (None, "none") else args.release
            if target is None and args.action != "uninstall":
                raise AgentError("no release to switch to: leaving the device without a model takes --action "
                                 "uninstall (the user asks for it)", "release-missing")
            known_good = target is not None and _committed_before(state, target)
            _check_order(args.root, state, args.deployment, args.action, target, args.allow_rejected, args.order,
                         args.order_signature, required=args.action in ("rollback", "uninstall"))
            if target is not None:
                signed = _may_become_current(args.root, directory, state, target, args.action, args.allow_rejected,
                                             args.metadata, args.signature, None if known_good else args.trial_window)
                if signed:
                    releases[target].update(signed)
            if target is None:  # uninstall, asked for by the user
                state["chain"] = []
                state["status"] = "removed"
                state.pop("trial", None)
            elif args.action == "rollback" and known_good:
                while chain and chain[-1] != target:
                    releases.setdefault(chain.pop(), {})["state"] = "rolled_back"
                if not chain:
                    chain.append(target)
                    releases.setdefault(target, {})["state"] = "committed"
                state["status"] = "rolled_back"
                state.pop("trial", None)
            elif target in chain:
                state["status"] = releases[target].get("status", "committed")
                state.pop("trial", None)
            else:  # never committed here (a new release, or a rejected one named): a trial, its timer armed
                releases.setdefault(target, {})["state"] = "trial"
                state["status"] = "verifying"
                deadline = time.time() + args.trial_window
                state["trial"] = {"release": target, "deadline": deadline, "window_s": args.trial_window,
                                  "until": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(deadline))}
            state["current"] = target
            _event(state, args.action, target, args.by, **{"from": old})
        if state.get("trial"):
            _write_atomic(os.path.join(directory, "state.json"), json.dumps(state, indent=2, sort_keys=True))
            state["trial"]["timer_pid"] = _spawn_timer(args, state["trial"]["release"], state["trial"]["deadline"])
        _settle(state, directory)
    return {"current": target, "previous": state["previous"], "committed": state["committed"],
            "switched": old != target, "rejected": old if args.action == "revert" and old != target else None,
            "trial_until": (state.get("trial") or {}).get("until")}


def _rebuilt_state(directory, deployment, committed):
    """A state.json rebuilt from what is on the device: every release directory with its files as they are, the
    link as what runs, and ``committed`` (the controller's word, from its ledger) as the one committed release."""
    releases_dir = os.path.join(directory, "releases")
    state = _lifecycle({"deployment": deployment})
    for release in sorted(os.listdir(releases_dir)) if os.path.isdir(releases_dir) else []:
        files = {}
        base = os.path.join(releases_dir, release)
        for name in sorted(os.listdir(base)):
            path = os.path.join(base, name)
            if os.path.isfile(path) and not name.startswith("."):
                stat = os.stat(path)
                files[name] = {"sha256": _sha256_file(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        state["releases"][release] = {"state": "staged", "files": files, "rebuilt": True}
    if committed and committed in state["releases"]:
        state["releases"][committed].update(state="committed", status="committed", ever_committed=True)
        state["chain"] = [committed]
    current = _link(directory, "current")
    if committed and committed in state["releases"]:  # what ran may have been a trial: back on the committed one
        state["current"] = committed
    elif current in state["releases"]:  # nothing known to be committed: keep what runs, never remove a model
        state["current"] = current
        state["releases"][current].update(state="committed", status="committed", ever_committed=True)
        state["chain"] = [current]
    else:
        state["current"] = None
    state["status"] = "committed" if state["current"] else "removed"
    return state


def _heal_release(root, directory, state, release):
    """Restore every damaged file of ``release`` from its blob, checked against the recorded sha256 (the bytes
    it was assembled with: never new ones); (healed, unhealed) as release/file names."""
    healed, unhealed = [], []
    entry = state["releases"].get(release) or {}
    base = os.path.join(directory, "releases", release)
    for name, meta in sorted((entry.get("files") or {}).items()):
        if not _release_problems(directory, release, {"files": {name: meta}}, True):
            continue
        blob = os.path.join(root, "blobs", "sha256", meta["sha256"])
        try:
            os.makedirs(base, exist_ok=True)
            tmp = os.path.join(base, f".{name}.heal-{uuid.uuid4().hex[:8]}")
            restored = _copy_verified(blob, tmp, meta["sha256"])
            os.replace(tmp, os.path.join(base, name))
            meta["mtime_ns"] = restored["mtime_ns"]
            healed.append(f"{release}/{name}")
        except (AgentError, OSError):
            unhealed.append(f"{release}/{name}")
    return healed, unhealed


def layout_heal(args):
    """Make the device whole again without new bytes from anywhere: a corrupt state.json rebuilt (see
    ``_rebuilt_state``), and every damaged file of the running, committed and previous releases restored from
    its blob, checked against the sha256 recorded for it (never a new hash). Says what it could not heal."""
    directory = _deployment_dir(args.root, args.deployment)
    healed, unhealed = [], []
    with _locked(directory):
        try:
            state = _load(directory, args.deployment)
        except AgentError as exc:
            state = _rebuilt_state(directory, args.deployment, args.committed)
            healed.append(f"state.json rebuilt ({exc})")
        _fenced(state, args)
        for release in dict.fromkeys(r for r in (state.get("current"), state["chain"][-1] if state["chain"] else None,
                                                 state.get("previous")) if r):
            done, left = _heal_release(args.root, directory, state, release)
            healed += done
            unhealed += left
        _event(state, "heal", state.get("current"), args.by, healed=healed, unhealed=unhealed)
        _settle(state, directory)
    return {"healed": healed, "unhealed": unhealed, "current": state.get("current"),
            "committed": state["committed"]}


def layout_check_order(args):
    """Whether an order would be taken now (a read: nothing recorded), so a daemon refuses before it fetches."""
    directory = _deployment_dir(args.root, args.deployment)
    state = _lifecycle(_read_state(directory) or {"deployment": args.deployment})
    release = None if args.release in (None, "none") else args.release
    order = _check_order(args.root, state, args.deployment, args.action, release, args.allow_rejected, args.order,
                         args.order_signature, required=True, record=False)
    return {"order": order}


def layout_record(args):
    """Store a verdict on the running release; committed and inconclusive (kept) join the committed chain.

    The verdict names its release: one that is no longer current (the trial window ran out, another
    controller switched) is refused, never recorded against another release.
    """
    directory = _deployment_dir(args.root, args.deployment)
    with _locked(directory):
        state = _load(directory, args.deployment)
        _fenced(state, args)
        _repair(state, directory)
        update = json.loads(args.json)
        current = state.get("current")
        if args.release and current != args.release:
            expired = (state.get("last_rejected") or {}).get("release") == args.release
            raise AgentError(f"release {args.release} no longer runs (current: {current or 'none'})"
                             + ("; the device reverted it when its trial window ran out" if expired else ""),
                             "trial-expired" if expired else "not-current")
        if current is None:
            raise AgentError("no release runs: nothing to record a verdict on", "no-current-release")
        entry = state["releases"].setdefault(current, {})
        if "verification" in update:
            entry["verification"] = update["verification"]
        status = update.get("status")
        if status:
            if status in ("committed", "inconclusive"):
                entry.update(state="committed", status=status, ever_committed=True)
                if current in state["chain"]:
                    state["chain"].remove(current)
                state["chain"] = (state["chain"] + [current])[-CHAIN_LENGTH:]
                state.pop("trial", None)
            if status == "paused":  # the operator decides now: the trial timer is disarmed
                state.pop("trial", None)
            state["status"] = status
            _event(state, status, current, args.by)
        _settle(state, directory)
    return {"status": state.get("status"), "committed": state["committed"]}


def layout_prune(args):
    """Keep the running, committed and previous releases and the newest up to --keep; drop blobs nothing uses."""
    directory = _deployment_dir(args.root, args.deployment)
    releases_dir = os.path.join(directory, "releases")
    with _locked(directory):
        state = _load(directory, args.deployment)
        _fenced(state, args)
        keep = {r for r in (state.get("current"), state.get("previous"), state.get("committed")) if r}
        existing = sorted(os.listdir(releases_dir), key=lambda r: os.stat(os.path.join(releases_dir, r)).st_mtime,
                          reverse=True) if os.path.isdir(releases_dir) else []
        for release in existing:
            if len(keep) >= args.keep:
                break
            keep.add(release)
        removed = [r for r in existing if r not in keep]
        for release in removed:
            path = os.path.join(releases_dir, release)
            for item in os.listdir(path):
                os.chmod(os.path.join(path, item), 0o644)
            shutil.rmtree(path, ignore_errors=True)
            state["releases"].pop(release, None)
        _settle(state, directory)
    used_digests, used_inodes = set(), set()  # inodes: releases assembled by older agents were hard links
    deployments = os.path.join(args.root, "deployments")
    for name in os.listdir(deployments) if os.path.isdir(deployments) else []:
        other = _read_state(os.path.join(deployments, name)) or {}
        for entry in (other.get("releases") or {}).values():
            used_digests.update(meta["sha256"] for meta in (entry.get("files") or {}).values())
        rdir = os.path.join(deployments, name, "releases")
        for release in os.listdir(rdir) if os.path.isdir(rdir) else []:
            for item in os.listdir(os.path.join(rdir, release)):
                used_inodes.add(os.stat(os.path.join(rdir, release, item)).st_ino)
    blobs_dir = os.path.join(args.root, "blobs", "sha256")
    dropped = []
    for blob in os.listdir(blobs_dir) if os.path.isdir(blobs_dir) else []:
        path = os.path.join(blobs_dir, blob)
        if blob not in used_digests and os.stat(path).st_ino not in used_inodes:
            os.unlink(path)
            dropped.append(blob)
    return {"removed_releases": removed, "removed_blobs": len(dropped)}


RECEIVE_NAME = "receive"


def _staging_name(name):
    if not name or "/" in name or name.startswith(".") or len(name) > 200 or "\0" in name:
        raise AgentError(f"invalid upload name {name!r}", "usage")
    return name


def _receive(argv, stream):
    """``receive --root R --name N --size S`` then S raw bytes: an upload into <root>/.staging/N over the
    session itself (no SFTP write needed, so a device can keep SFTP read-only). The bytes are read whatever
    happens, so the session stays in step; the answer says what arrived and its sha256."""
    parser = argparse.ArgumentParser(prog="receive")
    parser.add_argument("--root", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--offset", type=int, default=0, help="resume: the part holds this many bytes already")
    parser.add_argument("--prefix-sha256", default=None, help="resume: the sha256 of those bytes at the sender")
    args = parser.parse_args(argv[1:])
    if args.size < 0 or args.offset < 0:
        raise AgentError("invalid upload size", "usage")
    digest, left, handle, error = hashlib.sha256(), args.size, None, None
    try:
        _confine(["--root", args.root])
        staging = os.path.join(args.root, ".staging")
        os.makedirs(staging, exist_ok=True)
        path = os.path.join(staging, _staging_name(args.name))
        if args.offset:
            prefix, missing = hashlib.sha256(), args.offset
            handle = open(path, "r+b") if os.path.isfile(path) and not os.path.islink(path) else None
            while handle is not None and missing > 0:
                block = handle.read(min(1 << 20, missing))
                if not block:
                    break
                prefix.update(block)
                missing -= len(block)
            if handle is None or missing or prefix.hexdigest() != args.prefix_sha256:
                if handle is not None:
                    handle.close()
                handle = None
                error = AgentError("the part on the device is not the start of this upload: send it whole",
                                   "resume-mismatch")
            else:
                handle.seek(args.offset)
                handle.truncate()
                digest = prefix
        else:
            handle = open(path, "wb")
    except (AgentError, OSError) as exc:
        error = exc
    while left > 0:
        block = stream.read(min(left, 1 << 20))
        if not block:
            if handle is not None:  # what arrived stays for the next push to resume
                handle.flush()
                handle.close()
            raise AgentError("the upload ended early", "upload-cut")
        left -= len(block)
        digest.update(block)
        if handle is not None and error is None:
            try:
                handle.write(block)
            except OSError as exc:
                error = exc
    if handle is not None:
        try:
            handle.flush()
            os.fsync(handle.fileno())
        except OSError as exc:
            error = error or exc
        handle.close()
    if error is not None:
        if handle is not None:
            os.unlink(path)
        raise error
    return {"received": args.size, "offset": args.offset, "sha256": digest.hexdigest(), "path": path}


def serve():
    """Answer many commands in one process: one JSON array (a command's arguments) per stdin line, one JSON
    document per stdout line. The controller's single channel for a whole push: the device's login shell and
    Python start once, not once per step. ``bench`` runs in a child process of its own (a fresh process:
    an honest peak RSS, and a crash in a model run cannot take the session down). ``receive`` is followed by
    the raw bytes of an upload."""
    import io

    stream = sys.stdin.buffer
    while True:
        raw = stream.readline()
        if not raw:
            break
        line = raw.decode("utf-8", "replace")
        try:
            argv = json.loads(line)
            if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
                raise ValueError("expected a JSON array of strings")
            if argv[0] in ("serve", "watchdog", "gate"):
                raise ValueError(f"{argv[0]} cannot run inside serve")
            if argv[0] == RECEIVE_NAME:
                try:
                    answer = json.dumps({"schema": SCHEMA, "agent_version": AGENT_VERSION, "ok": True,
                                         **_receive(argv, stream)})
                except AgentError as exc:
                    answer = json.dumps({"schema": SCHEMA, "agent_version": AGENT_VERSION, "ok": False,
                                         "error": exc.kind, "message": str(exc)})
                except OSError as exc:
                    answer = json.dumps({"schema": SCHEMA, "agent_version": AGENT_VERSION, "ok": False,
                                         "error": "disk-full" if exc.errno == 28 else "os-error",
                                         "message": f"{exc.strerror or exc}"})
                sys.stdout.write(answer + "\n")
                sys.stdout.flush()
                continue
            captured = io.StringIO()
            with contextlib.redirect_stdout(captured):
                main(argv)
            output = captured.getvalue()
            lines = output.strip().splitlines()
            answer = lines[-1] if lines else json.dumps(
                {"schema": SCHEMA, "agent_version": AGENT_VERSION, "ok": False, "error": "agent-broken",
                 "message": f"{argv[0]} printed nothing"})
        except SystemExit:  # argparse refused the arguments (its message went to stderr)
            answer = json.dumps({"schema": SCHEMA, "agent_version": AGENT_VERSION, "ok": False, "error": "usage",
                                 "message": f"invalid arguments: {line.strip()[:200]}"})
        except AgentError as exc:
            answer = json.dumps({"schema": SCHEMA, "agent_version": AGENT_VERSION, "ok": False, "error": exc.kind,
                                 "message": str(exc)})
        except Exception as exc:  # noqa: BLE001 - the session answers every line, whatever went wrong
            answer = json.dumps({"schema": SCHEMA, "agent_version": AGENT_VERSION, "ok": False,
                                 "error": "agent-broken", "message": f"{type(exc).__name__}: {exc}"})
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()
    return 0


# ------------------------------------------------------------------ the gate: what a deploy key may run
#
# A device can give the controller's deploy key nothing but this agent: authorized_keys with
#   restrict,command="<python> <root>/agent/edgeops_agent.py gate --root <root>" ssh-ed25519 AAAA...
# The gate runs the agent commands the controller sends (and nothing else: no shell, no `python -c`),
# confined to <root>, and SFTP read-only (sftp-server -R). Uploads arrive through the agent (receive),
# so the trust root, the installed agent and state.json change only through the agent's own checks.

CONFINED_ENV = "EDGEOPS_AGENT_ROOT"
GATED_COMMANDS = ("serve", "state", "prepare", "assemble", "switch", "record", "prune", "bench", "facts", "power",
                  "enroll", "install-agent", "check-order", "heal", "adapt-train",
                  "blocks", "patch")
SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/sftp-server", "/usr/libexec/openssh/sftp-server",
                "/usr/lib/ssh/sftp-server")
MARKER = "--edgeops-output-begins--"


def _inside(root, path):
    real_root = os.path.realpath(root)
    return os.path.realpath(path) == real_root or os.path.realpath(path).startswith(real_root + os.sep)


def _confine(argv):
    """Under the gate (EDGEOPS_AGENT_ROOT set by it, never by the client): every --root is the device root and
    every path argument lies inside it."""
    root = os.environ.get(CONFINED_ENV)
    if not root:
        return
    paths = []
    for index, word in enumerate(argv):
        if word in ("--root", "--staged", "--compare", "--also", "--tensors", "--patch") and index + 1 < len(argv):
            value = argv[index + 1]
            if word == "--root" and os.path.realpath(value) != os.path.realpath(root):
                raise AgentError(f"this device's agent serves {root} only, not {value}", "restricted")
            if word == "--staged" and value.startswith("{"):
                try:
                    paths.extend(json.loads(value))
                except ValueError:
                    raise AgentError("invalid --staged", "usage")
            elif word != "--root":
                paths.append(value)
    if argv and argv[0] in ("bench", "power") and len(argv) > 1:
        paths.append(argv[1])
    for path in paths:
        if not _inside(root, path):
            raise AgentError(f"{path} is outside this device's root {root}", "restricted")


def _refuse(message, markers):
    if markers:
        sys.stdout.write(MARKER + "\n")
    sys.stdout.write(json.dumps({"schema": SCHEMA, "agent_version": AGENT_VERSION, "ok": False,
                                 "error": "restricted", "message": message}) + "\n")
    sys.stdout.flush()
    sys.stderr.write(f"edgeops gate: {message}\n")
    return 126


def gate(args):
    """The forced command of a restricted deploy key: SFTP read-only, or one agent command, or nothing."""
    original = os.environ.get("SSH_ORIGINAL_COMMAND", "").strip()
    if original == "internal-sftp" or original.endswith("sftp-server"):
        server = next((p for p in SFTP_SERVERS if os.access(p, os.X_OK)), None)
        if server is None:
            sys.stderr.write("edgeops gate: no sftp-server on this device\n")
            return 1
        os.execv(server, [server, "-R", "-d", args.root])
    # what the controller sends: "echo MARKER; [echo MARKER >&2;] exec PYTHON AGENT COMMAND ARGS..."
    parts = [p.strip() for p in original.split(";")]
    to_stdout = sum(1 for p in parts if p == f"echo {MARKER}")
    to_stderr = sum(1 for p in parts if p == f"echo {MARKER} >&2")
    rest = [p for p in parts if p not in (f"echo {MARKER}", f"echo {MARKER} >&2")]
    try:
        words = shlex.split(rest[0][len("exec "):]) if len(rest) == 1 and rest[0].startswith("exec ") else []
    except ValueError:
        words = []
    agent_file = os.path.realpath(os.path.abspath(__file__))
    interpreter = _interpreter(words[0]) if words else None
    if len(words) < 3 or interpreter is None or os.path.realpath(words[1]) != agent_file \
            or words[2] not in GATED_COMMANDS:
        shown = original if len(original) < 200 else original[:200] + "..."
        return _refuse(f"this key runs only the edgeops agent's commands, not {shown!r}", to_stdout)
    argv = words[2:]
    try:
        os.environ[CONFINED_ENV] = args.root
        _confine(argv)
    except AgentError as exc:
        return _refuse(str(exc), to_stdout)
    if to_stdout:
        sys.stdout.write(MARKER + "\n")
        sys.stdout.flush()
    if to_stderr:
        sys.stderr.write(MARKER + "\n")
        sys.stderr.flush()
    os.execve(interpreter, [interpreter, agent_file, *argv], dict(os.environ))


def _interpreter(word):
    """The Python the controller asked for (the profile's device.python), if it is one: only a python runs,
    and it runs only this agent file."""
    name = os.path.basename(word)
    if not name.startswith("python") or not all(c.isdigit() or c == "." for c in name[len("python"):]):
        return None
    found = word if os.path.isabs(word) else shutil.which(word)
    return found if found and os.access(found, os.X_OK) else None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="edgeops_agent.py", description="edgeops on-device agent")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("facts")
    f.add_argument("--root", required=True)
    f.add_argument("--power", default=None, help="JSON: the profile's power sensor, checked for readability")
    b = sub.add_parser("bench")
    b.add_argument("release")
    b.add_argument("--runs", type=int, default=200)
    b.add_argument("--duration", type=float, default=None, help="seconds instead of a run count")
    b.add_argument("--warmup", type=int, default=20)
    b.add_argument("--compare", default=None, help="another release, measured interleaved in blocks")
    b.add_argument("--also", action="append", default=[], help="with --compare: more releases in the same "
                                                               "rotation (candidates measured side by side)")
    b.add_argument("--block", type=int, default=10)
    b.add_argument("--golden", action="store_true")
    p = sub.add_parser("power")
    p.add_argument("release")
    p.add_argument("--seconds", type=float, default=1.0)
    e = sub.add_parser("enroll", help="install or rotate the trust root (allowed signers) of signed releases")
    e.add_argument("--root", required=True)
    e.add_argument("--signers", required=True, help="the allowed-signers file (base64)")
    e.add_argument("--signature", default=None, help="its signature by a key trusted now (base64 of the armor)")
    e.add_argument("--identity", default=None, help="fleet/device: the name signed orders must carry (kept "
                                                     "from the first enrollment)")
    g = sub.add_parser("gate", help="the forced command of a restricted deploy key (authorized_keys)")
    g.add_argument("--root", required=True)
    c = sub.add_parser("check-order", help="would this signed order be taken now (nothing recorded)")
    c.add_argument("--root", required=True)
    c.add_argument("--deployment", required=True)
    c.add_argument("--action", required=True)
    c.add_argument("--release", default=None)
    c.add_argument("--allow-rejected", action="store_true")
    c.add_argument("--order", default=None)
    c.add_argument("--order-signature", default=None)
    w = sub.add_parser("watchdog", help="(started by switch) revert a trial release at its deadline")
    w.add_argument("--root", required=True)
    w.add_argument("--deployment", required=True)
    w.add_argument("--release", required=True)
    w.add_argument("--deadline", type=float, required=True, help="seconds since the epoch")
    k = sub.add_parser("blocks", help="block hashes of a blob (the base of a block patch)")
    k.add_argument("--root", required=True)
    k.add_argument("--blob", required=True)
    k.add_argument("--block", type=int, required=True)
    q = sub.add_parser("patch", help="rebuild a file from a held blob and an uploaded block patch")
    q.add_argument("--root", required=True)
    q.add_argument("--base", required=True)
    q.add_argument("--patch", required=True)
    q.add_argument("--sha256", required=True)
    t = sub.add_parser("adapt-train", help="a federated round's local step: train the head on local samples")
    t.add_argument("--root", required=True)
    t.add_argument("--deployment", required=True)
    t.add_argument("--tensors", required=True, help="the round's starting tensors (.npz, staged by receive)")
    t.add_argument("--spec", required=True, help="JSON: tensors, features output, data directory, optimiser")
    t.add_argument("--order", default=None)
    t.add_argument("--order-signature", default=None)
    for name in ("state", "prepare", "install-agent", "assemble", "switch", "record", "prune", "heal"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--root", required=True)
        if name != "install-agent":
            cmd.add_argument("--deployment", required=True)
        if name == "install-agent":
            cmd.add_argument("--staged", required=True)
            cmd.add_argument("--sha256", required=True)
            cmd.add_argument("--signature", default=None, help="enrolled devices: the release key's signature of "
                                                               "the agent's sha256 (base64 of the armor)")
        if name == "assemble":
            cmd.add_argument("--release", required=True)
        if name == "switch":
            cmd.add_argument("--release", default=None, help="activate/rollback: the release (none: no release)")
        if name == "assemble":
            cmd.add_argument("--repair", action="store_true", help="restore an existing release's damaged files")
            cmd.add_argument("--files", required=True, help="JSON object: file name -> sha256")
            cmd.add_argument("--staged", default=None, help="JSON object: uploaded staging path -> sha256")
        if name == "switch":
            cmd.add_argument("--action", choices=["activate", "revert", "rollback", "uninstall"], default="activate")
            cmd.add_argument("--allow-rejected", action="store_true",
                             help="run a release this device rejected (the user named it explicitly)")
            cmd.add_argument("--trial-window", type=float, default=None,
                             help="activate: seconds until the device reverts the trial release by itself")
            cmd.add_argument("--aborted", action="store_true",
                             help="revert: not a verdict (an error or a cut): the release is not rejected")
            cmd.add_argument("--reason", default=None, help="revert: why, kept in the device's history")
            cmd.add_argument("--metadata", default=None, help="activate: the signed release metadata (base64)")
            cmd.add_argument("--order", default=None, help="the controller's order (base64 JSON), signed by the "
                                                           "release key: required for rollback/uninstall on an "
                                                           "enrolled device")
            cmd.add_argument("--order-signature", default=None, help="its SSH signature (base64 of the armor)")
            cmd.add_argument("--signature", default=None, help="activate: its SSH signature (base64 of the armor)")
        if name in ("switch", "record"):
            cmd.add_argument("--by", default="edgeops")
        if name == "heal":
            cmd.add_argument("--committed", default=None, help="a corrupt state.json: the release the controller's "
                                                                "ledger last saw committed here")
            cmd.add_argument("--by", default="edgeops")
        if name in ("switch", "record", "assemble", "prune", "heal"):
            cmd.add_argument("--fence", type=int, default=None, help="the fleet lock's fencing token: refused when "
                                                                     "older than the newest this device has seen")
        if name == "record":
            cmd.add_argument("--json", required=True)
            cmd.add_argument("--release", default=None, help="the release the verdict is for (must be current)")
        if name == "prune":
            cmd.add_argument("--keep", type=int, default=3)
        if name == "state":
            cmd.add_argument("--facts", action="store_true", help="also report the device's facts")
            cmd.add_argument("--verify", action="store_true", help="hash every file of the current and committed "
                                                                   "releases (default: sizes and times only)")
            cmd.add_argument("--power", default=None, help="JSON: the power sensor to check (with --facts)")
            cmd.add_argument("--keep", action="store_true", help="keep the facts in agent/facts.json (a mutating "
                                                                  "command's refresh; reads never write)")
    args = parser.parse_args(argv)
    commands = {"gate": gate, "bench": bench, "facts": facts, "power": power, "state": layout_state,
                "prepare": layout_prepare, "install-agent": layout_install_agent,
                "assemble": layout_assemble, "switch": layout_switch, "record": layout_record,
                "prune": layout_prune, "watchdog": layout_watchdog, "enroll": layout_enroll,
                "check-order": layout_check_order, "heal": layout_heal, "adapt-train": layout_adapt_train,
                "blocks": layout_blocks, "patch": layout_patch}
    if args.command == "gate":
        return gate(args)
    try:
        _confine(list(argv if argv is not None else sys.argv[1:]))
        result = commands[args.command](args)
        document = {"schema": SCHEMA, "agent_version": AGENT_VERSION, "ok": True, **result}
        code = 0
    except (AgentError, OSError) as exc:
        document = {"schema": SCHEMA, "agent_version": AGENT_VERSION, "ok": False, **_failure(exc)}
        code = 3
    sys.stdout.write(json.dumps(document) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["serve"] else main())
