"""The verification gate: absolute SLOs plus a statistical regression check (pure; numpy and the standard library).

One gate for both ways a device is updated: the controller decides with it over SSH
(``edgeops.verify`` wraps it in typed objects), and a pull-mode device's agent daemon
decides with the same file, shipped beside the agent, when no controller is watching.
The gate spec is read by attribute (``gate.slo.latency_p95_ms``): the controller passes
its pydantic models, the device the same fields from JSON.

Regression: the agent measures the new release (A) and the previous one (B)
interleaved in blocks, in one process. The gate bootstraps confidence
intervals for the ratios p50(A)/p50(B) and p95(A)/p95(B) (resampling whole
blocks, so drift within a block stays together) and decides each:

* Failed       - the whole interval is above 1 + tolerance: slower for sure;
* Passed       - the whole interval is at or below 1 + tolerance;
* Inconclusive - the interval straddles the tolerance: noise, measure again.

With a 95% interval, noise makes a release look Failed in about 2.5% of A/A
measurements; ``measure`` confirms a Failed with a second measurement before it
stands, and bench/gate.py measures the resulting rates.

Verdicts are plain dicts (``outcome``, ``checks``, ``measurements``): what a device
publishes is what the controller records.
"""

from __future__ import annotations

import hashlib
import json
import time
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

PASSED, FAILED, INCONCLUSIVE = "Passed", "Failed", "Inconclusive"
BOOTSTRAP_ROUNDS = 2000
MAX_KEPT_SAMPLES = 2000  # per side: what a verdict keeps of a measurement for reports (evenly thinned)
CLASSIFICATION = ("accuracy", "top1_agreement")
LOWER_IS_BETTER = ("max_abs_error", "perplexity")


def spec_from_json(document: Dict[str, Any]) -> Any:
    """A gate spec (attribute access, nested) from its JSON form (``edgeops.verify.GateSpec.as_json``)."""
    return json.loads(json.dumps(document), object_hook=lambda d: SimpleNamespace(**d))


def one_sample_points(metric: str, samples: int) -> float:
    """How far one differing sample moves a classification metric over ``samples`` (0 for the others)."""
    return 100.0 / samples if metric in CLASSIFICATION and samples > 0 else 0.0


def kept_samples(samples: List[float]) -> List[float]:
    step = max(1, -(-len(samples) // MAX_KEPT_SAMPLES))
    return [round(float(v), 4) for v in samples[::step]]


def check(name: str, outcome: str, detail: str, interval: Optional[Tuple[float, ...]] = None) -> Dict[str, Any]:
    found: Dict[str, Any] = {"name": name, "outcome": outcome, "detail": detail}
    if interval is not None:
        found.update(zip(("point", "low", "high", "limit"), (round(v, 5) for v in interval)))
    return found


def reason(outcome: str, checks: List[Dict[str, Any]]) -> str:
    """The checks that decided the outcome (all of them, briefly, when everything passed)."""
    if outcome == PASSED:
        regressions = [c["detail"] for c in checks if c["name"].endswith("regression")]
        return f"all {len(checks)} checks passed" + (f" ({regressions[0]})" if regressions else "")
    return "; ".join(c["detail"] for c in checks if c["outcome"] == outcome)


def out_of_memory(detail: str) -> Dict[str, Any]:
    """The verdict on a release whose measurement the device's kernel killed for memory: Failed, no numbers."""
    checks = [check("memory-limit", FAILED, detail)]
    return {"outcome": FAILED, "checks": checks, "measurements": {}, "reason": reason(FAILED, checks)}


def _blocks(samples: List[float], block: int) -> Any:
    usable = len(samples) - len(samples) % block
    return np.asarray(samples[:usable], dtype=float).reshape(-1, block)


def _rng(seed: str) -> Any:
    return np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))


def ratio_interval(new: List[float], old: List[float], block: int, confidence: float, statistic: str = "p95",
                   seed: str = "") -> Tuple[float, float, float]:
    """(point, low, high) of statistic(new)/statistic(old) by a paired block bootstrap."""
    a, b = _blocks(new, block), _blocks(old, block)
    count = min(len(a), len(b))
    a, b = a[:count], b[:count]

    def stat(x: Any) -> Any:
        return np.asarray(np.percentile(x, 95 if statistic == "p95" else 50, axis=-1), dtype=np.float64)

    point = float(stat(a.reshape(-1)) / stat(b.reshape(-1)))
    picks = _rng(seed).integers(0, count, size=(BOOTSTRAP_ROUNDS, count))  # the same blocks: they ran together
    ratios = stat(a[picks].reshape(BOOTSTRAP_ROUNDS, -1)) / stat(b[picks].reshape(BOOTSTRAP_ROUNDS, -1))
    tail = (1 - confidence) / 2 * 100
    return point, float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))


def _regression(name: str, point: float, low: float, high: float, tolerance_pct: float,
                confidence: float) -> Dict[str, Any]:
    limit = 1 + tolerance_pct / 100
    detail = (f"{name} new/previous = {point:.3f} ({confidence:.0%} CI {low:.3f}–{high:.3f}; "
              f"limit {limit:.2f})")
    interval = (point, low, high, limit)
    if low > limit:
        return check(f"{name}-regression", FAILED, detail, interval)
    if high <= limit:
        return check(f"{name}-regression", PASSED, detail, interval)
    return check(f"{name}-regression", INCONCLUSIVE, detail + ": the interval straddles the limit", interval)


def quality_check(goal: Any, device_value: float, host_value: float, samples: int = 0) -> Dict[str, Any]:
    """The golden set on the device against the same samples scored on the build host.

    For accuracy and top-1 agreement the allowed drop is at least one sample's worth: a single sample that the
    device's kernels round the other way is not a regression.
    """
    if goal.metric == "max_abs_error":
        ok = device_value <= goal.max_drop
        return check("golden", PASSED if ok else FAILED,
                     f"golden max abs error {device_value:.4g} (allowed {goal.max_drop:g})")
    drop = device_value - host_value if goal.metric in LOWER_IS_BETTER else host_value - device_value
    one = one_sample_points(goal.metric, samples)
    if goal.drop == "relative" and host_value:
        drop, one = drop / host_value * 100, one / host_value * 100
    allowed = max(goal.max_drop, one)
    why = f", one of {samples} samples" if allowed > goal.max_drop else ""
    return check("golden", PASSED if drop <= allowed + 1e-9 else FAILED,
                 f"golden {goal.metric} {device_value:.4g} on the device vs {host_value:.4g} on the build host "
                 f"(drop {drop:.3g}, allowed {allowed:.3g}{why})")


def _power_checks(slo: Any, power: Dict[str, Any]) -> List[Dict[str, Any]]:
    if slo.energy_per_inference_mj is None and slo.average_power_mw is None:
        return []
    if power.get("energy_per_inference_mj") is None:
        return [check("power-slo", INCONCLUSIVE, f"no power reading ({power.get('error') or 'source none'})")]
    label = f"[{power['source']}, {power['boundary']}]"
    checks = []
    if slo.energy_per_inference_mj is not None:
        value = power["energy_per_inference_mj"]
        checks.append(check("energy-slo", PASSED if value <= slo.energy_per_inference_mj else FAILED,
                            f"energy {value:.4g} mJ/inference {label} (SLO {slo.energy_per_inference_mj:g})"))
    if slo.average_power_mw is not None:
        value = power["average_power_mw"]
        checks.append(check("power-slo", PASSED if value <= slo.average_power_mw else FAILED,
                            f"average power {value:.4g} mW {label} (SLO {slo.average_power_mw:g})"))
    return checks


def decide(result: Dict[str, Any], gate: Any, host_golden: Optional[float], seed: str = "") -> Dict[str, Any]:
    """Passed, Failed or Inconclusive for the agent's ``result`` (``a`` = new, optional ``b`` = previous)."""
    slo, regression, goal, block = gate.slo, gate.regression, gate.quality, gate.verification.block
    a, b = result["a"], result.get("b")
    checks: List[Dict[str, Any]] = []
    p95 = a["latency"]["p95_ms"]
    if slo.latency_p95_ms is not None:
        checks.append(check("latency-slo", PASSED if p95 <= slo.latency_p95_ms else FAILED,
                            f"p95 {p95:.3f} ms (SLO {slo.latency_p95_ms:g} ms)"))
    power = a.get("power", {})
    checks += _power_checks(slo, power)
    peak = result.get("peak_rss_mb", 0)
    if slo.peak_memory_mb is not None:
        checks.append(check("memory-slo", PASSED if peak <= slo.peak_memory_mb else FAILED,
                            f"peak RSS {peak:.1f} MB (SLO {slo.peak_memory_mb:g} MB)"))
    if gate.memory_limit_mb is not None:
        checks.append(check("memory-limit", PASSED if peak <= gate.memory_limit_mb else FAILED,
                            f"peak RSS {peak:.1f} MB (device limit {gate.memory_limit_mb:g} MB)"))
    if a.get("golden") and host_golden is not None:
        checks.append(quality_check(goal, a["golden"]["value"], host_golden, int(a["golden"].get("samples") or 0)))
    generation = a.get("generation")
    if generation:
        block = result.get("block", block)  # one generation per block
        checks += _generation_slos(slo, a)
    if b is not None and generation and b.get("generation"):
        checks += _generation_regressions(a, b, block, regression, seed)
    elif b is not None:
        for statistic, tolerance in (("p50", regression.latency_p50_pct), ("p95", regression.latency_p95_pct)):
            point, low, high = ratio_interval(a["samples_ms"], b["samples_ms"], block, regression.confidence,
                                              statistic, seed)
            checks.append(_regression(f"{statistic} latency", point, low, high, tolerance, regression.confidence))
    if b is not None:
        energy = _energy_regression(power, b.get("power") or {}, regression, seed)
        if energy is not None:
            checks.append(energy)
    outcomes = {c["outcome"] for c in checks}
    outcome = FAILED if FAILED in outcomes else INCONCLUSIVE if INCONCLUSIVE in outcomes else PASSED
    measurements = {"latency": a["latency"], "power": power, "golden": a.get("golden"),
                    "peak_rss_mb": result.get("peak_rss_mb"), "providers": a.get("providers"),
                    "previous_latency": b["latency"] if b else None,
                    "where": "device (agent), single stream, batch 1",
                    **(_generation_measurements(a, b) if generation else {}),
                    "checks": checks,
                    "samples_ms": {"new": kept_samples(a.get("samples_ms") or []),
                                   **({"previous": kept_samples(b.get("samples_ms") or [])} if b else {})}}
    return {"outcome": outcome, "checks": checks, "measurements": measurements, "reason": reason(outcome, checks)}


def tokens_per_s(side: Dict[str, Any]) -> Optional[float]:
    """Median decode speed of one side of a measurement (a sample is one decoded token's time)."""
    p50 = (side.get("latency") or {}).get("p50_ms")
    return 1000.0 / p50 if p50 else None


def _generation_slos(slo: Any, a: Dict[str, Any]) -> List[Dict[str, Any]]:
    checks = []
    ttft = a["generation"]["ttft"]["p50_ms"]
    if getattr(slo, "ttft_ms", None) is not None and ttft is not None:
        checks.append(check("ttft-slo", PASSED if ttft <= slo.ttft_ms else FAILED,
                            f"time to first token {ttft:.2f} ms for {a['generation']['prompt_tokens']} prompt tokens "
                            f"(SLO {slo.ttft_ms:g} ms)"))
    speed = tokens_per_s(a)
    if getattr(slo, "tokens_per_s", None) is not None and speed is not None:
        checks.append(check("tokens-per-s-slo", PASSED if speed >= slo.tokens_per_s else FAILED,
                            f"decode {speed:.1f} tokens/s (SLO at least {slo.tokens_per_s:g})"))
    return checks


def _generation_regressions(a: Dict[str, Any], b: Dict[str, Any], block: int, regression: Any,
                            seed: str) -> List[Dict[str, Any]]:
    """Decode speed (time per token, whole generations resampled together) and time to first token (one
    sample per generation, paired with the previous release's generation that ran beside it)."""
    confidence = regression.confidence
    point, low, high = ratio_interval(a["samples_ms"], b["samples_ms"], block, confidence, "p50", seed)
    limit_pct = (1 / (1 - regression.tokens_per_s_pct / 100) - 1) * 100  # time per token, as tokens/s allows
    speed = _regression("decode time per token", point, low, high, limit_pct, confidence)
    speed["name"] = "tokens-per-s-regression"
    speed["detail"] = (f"decode tokens/s new/previous = {1 / point:.3f} ({confidence:.0%} CI {1 / high:.3f}–"
                       f"{1 / low:.3f}; limit {1 - regression.tokens_per_s_pct / 100:.2f})"
                       + (": the interval straddles the limit" if speed["outcome"] == INCONCLUSIVE else ""))
    checks = [speed]
    new_ttft, old_ttft = a["generation"].get("ttft_samples_ms") or [], b["generation"].get("ttft_samples_ms") or []
    if min(len(new_ttft), len(old_ttft)) >= 2:
        point, low, high = ratio_interval(new_ttft, old_ttft, 1, confidence, "p50", f"ttft:{seed}")
        found = _regression("time to first token", point, low, high, regression.ttft_pct, confidence)
        found["name"] = "ttft-regression"
        checks.append(found)
    return checks


def _generation_measurements(a: Dict[str, Any], b: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    def of(side: Dict[str, Any]) -> Dict[str, Any]:
        found = side["generation"]
        return {"runtime": found.get("runtime"), "prompt_tokens": found.get("prompt_tokens"),
                "ttft_ms": found["ttft"]["p50_ms"], "tokens_per_s": tokens_per_s(side),
                "decode_ms_per_token": side["latency"]["p50_ms"]}

    return {"generation": of(a), **({"previous_generation": of(b)} if b and b.get("generation") else {})}


def _energy_regression(new: Dict[str, Any], old: Dict[str, Any], regression: Any,
                       seed: str) -> Optional[Dict[str, Any]]:
    """Energy of the new release over the previous one's, from the same interleaved blocks; None without readings.

    Like latency: the blocks are resampled in pairs (they ran back to back), and only an interval wholly
    above the tolerance fails. Unlike latency, an interval that straddles the limit does not make the
    verdict Inconclusive: power sensors are sampled every tens of milliseconds, so per-block energy is
    coarse (bench/gate.py measured 49 of 60 A/A releases Inconclusive when it did), and latency already
    holds a slower release back.
    """
    a, b = new.get("block_energy_mj") or [], old.get("block_energy_mj") or []
    count = min(len(a), len(b))
    if count < 2 or sum(b[:count]) <= 0:
        return None
    pairs = np.array([a[:count], b[:count]], dtype=float)
    picks = _rng(f"energy:{seed}").integers(0, count, size=(BOOTSTRAP_ROUNDS, count))
    ratios = pairs[0][picks].sum(axis=1) / np.maximum(pairs[1][picks].sum(axis=1), 1e-12)
    tail = (1 - regression.confidence) / 2 * 100
    point = float(pairs[0].sum() / pairs[1].sum())
    low, high = float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))
    found = _regression("energy", point, low, high, regression.energy_pct, regression.confidence)
    detail = found["detail"].replace(": the interval straddles the limit", ": no regression shown")
    return {**found, "outcome": FAILED if found["outcome"] == FAILED else PASSED,
            "detail": f"{detail} [{new.get('source')}, {new.get('boundary')}]"}


def measure(run: Callable[[int, int], Dict[str, Any]], gate: Any, host_golden: Optional[float], seed: str = "",
            on_retry: Callable[[int, str], None] = lambda runs, why: None,
            clock: Callable[[], float] = time.monotonic) -> Dict[str, Any]:
    """Measure with ``run(runs, attempt)`` and decide; measure again before a verdict that would cost a rollback.

    A first Failed is confirmed by a second measurement with twice the runs. With ``retry_inconclusive`` an
    Inconclusive is measured again, up to ``verification.retries`` times, each look pooled with the earlier ones
    (same device, same session), so the interval narrows instead of starting over. How much more: with
    ``verification.budget_s``, as many runs as the interval's width says would decide it at the noise measured
    so far (a width shrinks as one over the square root of the runs), never past the budget, which is spent on
    this device's own speed; without a budget, twice the runs each time. A decisive interval stops at once. An
    Inconclusive that remains says what would decide it.
    """
    verification = gate.verification
    budget = getattr(verification, "budget_s", None)
    runs, attempt, retries, confirming = verification.runs, 0, 0, False
    pooled: Optional[Dict[str, Any]] = None
    spent, looks = 0.0, []
    while True:
        started = clock()
        latest = run(runs, attempt)
        elapsed = clock() - started
        spent += elapsed
        looks.append({"runs": runs, "seconds": round(elapsed, 3)})
        pooled = _pool(pooled, latest)
        verdict = decide(pooled, gate, host_golden, seed=f"{seed}:{attempt}")
        attempt += 1
        if verdict["outcome"] == FAILED and not confirming:
            confirming, runs = True, runs * 2
            on_retry(runs, "failed once, confirming")
            continue
        pooled_runs = len(pooled["a"].get("samples_ms") or [])
        seconds_per_run = spent / max(1, pooled_runs)
        needed = runs_to_decide(verdict["checks"], pooled_runs)
        if verdict["outcome"] == INCONCLUSIVE and gate.retry_inconclusive and retries < verification.retries:
            more = runs * 2 if budget is None else min(needed, int((budget - spent) / max(seconds_per_run, 1e-9)))
            more = -(-more // verification.block) * verification.block  # whole blocks
            if budget is None or more >= max(verification.block * 2, pooled_runs // 4):
                retries, runs = retries + 1, more
                on_retry(runs, "inconclusive, measuring again")
                continue
        verdict["measurements"]["looks"] = looks
        if verdict["outcome"] == INCONCLUSIVE:
            _say_what_would_decide(verdict, needed, pooled_runs, seconds_per_run, budget, spent)
        return verdict


MAX_FACTOR = 100  # beyond a hundred times the runs measured, "more runs" is not an answer


def runs_to_decide(checks: List[Dict[str, Any]], runs: int) -> int:
    """About how many more A/B runs would bring every straddling regression interval clear of its limit, at the
    noise measured (half-widths shrink as 1/sqrt(runs)); 0 when none straddles."""
    factor = 1.0
    for found in checks:
        if found["outcome"] != INCONCLUSIVE or "limit" not in found:
            continue
        point, low, high, limit = found["point"], found["low"], found["high"], found["limit"]
        width, distance = (high - point, limit - point) if point <= limit else (point - low, point - limit)
        factor = max(factor, MAX_FACTOR if distance <= 0 else min(MAX_FACTOR, (width / distance) ** 2 * 1.2))
    return int(runs * factor) - runs if factor > 1 else 0


def _say_what_would_decide(verdict: Dict[str, Any], more: int, total: int, seconds_per_run: float,
                           budget: Optional[float], spent: float) -> None:
    if more <= 0:
        return
    if more >= total * (MAX_FACTOR - 1):
        advice = "the new release is about as slow as the limit itself: no number of runs decides it"
    else:
        advice = (f"about {more} more A/B runs (~{more * seconds_per_run:.0f} s on this device) would decide it"
                  + (f"; the budget of {budget:g} s had {max(0.0, budget - spent):.0f} s left" if budget else ""))
    verdict["measurements"]["decide_with"] = {"runs": more, "seconds": round(more * seconds_per_run, 1)}
    for found in verdict["checks"]:
        if found["outcome"] == INCONCLUSIVE and "limit" in found:
            found["detail"] += f" after {total} runs: {advice}"
    verdict["reason"] = reason(INCONCLUSIVE, verdict["checks"])


def _pool(earlier: Optional[Dict[str, Any]], latest: Dict[str, Any]) -> Dict[str, Any]:
    """The latest agent result with every earlier raw sample prepended (summaries stay the latest's)."""
    if earlier is None:
        return latest
    merged = dict(latest)
    for side in ("a", "b"):
        if side in latest and side in earlier:
            merged[side] = {**latest[side], "samples_ms": earlier[side]["samples_ms"] + latest[side]["samples_ms"]}
            if "generation" in latest[side] and "generation" in earlier[side]:
                ttft = earlier[side]["generation"]["ttft_samples_ms"] + latest[side]["generation"]["ttft_samples_ms"]
                merged[side]["generation"] = {**latest[side]["generation"], "ttft_samples_ms": ttft}
    return merged


def patch_bases(observed: Dict[str, Any]) -> Dict[str, Tuple[str, int]]:
    """File name -> (blob digest, size) of the running and committed releases' files whose blobs the device
    holds (from the agent's ``prepare`` document): what a new file of the same name may be rebuilt from, over
    SSH (the controller's block patch) and in pull mode (the daemon's ranged fetch)."""
    state = observed.get("state") or {}
    releases, blobs = state.get("releases") or {}, set(observed.get("blobs") or ())
    found: Dict[str, Tuple[str, int]] = {}
    for release in (state.get("committed"), observed.get("current")):
        for name, meta in ((releases.get(release) or {}).get("files") or {}).items():
            if meta.get("sha256") in blobs:
                found[name] = (meta["sha256"], int(meta.get("size") or 0))
    return found
