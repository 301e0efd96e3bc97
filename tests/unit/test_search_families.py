"""Which families an ``auto`` search explores when no mode met the goal: those that came close."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st

from edgeops.compress.quantize import FAMILY_REACH, closest_families


def _search(drops: dict[str, float], max_drop: float):  # type: ignore[no-untyped-def]
    candidates = [SimpleNamespace(mode=mode, measurement=SimpleNamespace(quality=SimpleNamespace(drop=drop)))
                  for mode, drop in drops.items()]
    goal = SimpleNamespace(max_drop=max_drop)
    return SimpleNamespace(candidates=candidates, ctx=SimpleNamespace(evaluator=SimpleNamespace(goal=goal)))


def test_a_family_that_missed_by_far_more_than_the_closest_is_not_searched() -> None:
    # the generated encoder at a tight goal: static int8 at cosine 0.86, dynamic at 0.9996
    search = _search({"static": 0.14, "dynamic": 0.0004, "dynamic unprocessed": 0.0002}, 0.00003)
    assert closest_families(search, {"static", "dynamic"}) == {"dynamic"}
    # a conv net where both families came close: both are searched
    search = _search({"static": 3.0, "dynamic": 2.0}, 1.0)
    assert closest_families(search, {"static", "dynamic"}) == {"static", "dynamic"}


def test_a_family_with_nothing_measured_is_still_searched() -> None:
    search = _search({"dynamic": 0.01}, 0.005)
    search.candidates.append(SimpleNamespace(mode="static", measurement=None))  # failed to run
    assert closest_families(search, {"static", "dynamic"}) == {"static", "dynamic"}


@given(st.dictionaries(st.sampled_from(["static", "dynamic", "static per-tensor", "dynamic smoothed"]),
                       st.floats(0, 10), min_size=1), st.floats(0.0001, 1))
def test_the_closest_family_is_always_searched(drops: dict[str, float], max_drop: float) -> None:
    search = _search(drops, max_drop)
    chosen = closest_families(search, {"static", "dynamic"})
    best = min(drops, key=lambda mode: drops[mode]).split(" ")[0]
    assert best in chosen
    for family in {"static", "dynamic"} - chosen:
        closest = min(d for mode, d in drops.items() if mode.split(" ")[0] == family)
        assert closest > FAMILY_REACH * max(min(drops.values()), max_drop)


def test_a_near_miss_too_slow_to_replace_the_input_is_not_evaluated_further() -> None:
    from pathlib import Path

    from edgeops.compress.quantize import CANNOT_WIN, Search

    model = Path(__file__).resolve().parents[2] / "examples" / "models" / "assistant_encoder.onnx"
    timed: list[float] = []
    evaluator = SimpleNamespace(quick_p50_ms=lambda path: timed[-1])
    ctx = SimpleNamespace(before=SimpleNamespace(latency_p50_ms=10.0), accelerator="cpu", evaluator=evaluator)
    search = Search(model, ctx)  # type: ignore[arg-type]
    search.min_speedup = 1.1
    bar = 10.0 / 1.1
    timed.append(bar * CANNOT_WIN * 1.01)   # int4 weight-only on an x86 CPU: slower than the input
    skipped = search._slower_than_the_input("weight_only", model)
    assert skipped is not None and skipped.measurement is None and "replace the input" in (skipped.skipped or "")
    timed.append(bar * CANNOT_WIN * 0.99)   # within the noise of being fast enough: evaluated on the whole set
    assert search._slower_than_the_input("weight_only", model) is None
    search.objective = "size"               # a slow candidate may still be the smallest
    timed.append(bar * 10)
    assert search._slower_than_the_input("weight_only", model) is None


def test_candidates_the_timings_cannot_tell_apart_are_chosen_by_fidelity() -> None:
    from edgeops.compress.quantize import _best

    def timed(mode: str, p50: float, interval: tuple[float, float], drop: float):  # type: ignore[no-untyped-def]
        return SimpleNamespace(mode=mode, measurement=SimpleNamespace(
            latency_p50_ms=p50, latency_p50_ci_ms=interval, size_bytes=100, quality=SimpleNamespace(drop=drop)))

    ctx = SimpleNamespace(accelerator="cpu")
    fast = timed("dynamic", 14.4, (14.1, 15.4), 0.0004)
    smoothed = timed("dynamic smoothed", 15.3, (15.0, 15.9), 0.0001)   # 6% slower, the intervals overlap
    assert _best([fast, smoothed], ["dynamic"], ctx) is smoothed       # type: ignore[arg-type]
    apart = timed("dynamic smoothed", 15.3, (15.6, 15.9), 0.0001)     # 6% slower and told apart: speed wins
    assert _best([fast, apart], ["dynamic"], ctx) is fast              # type: ignore[arg-type]
    settled = timed("dynamic", 14.4, (14.3, 14.5), 0.0004)
    near = timed("dynamic unprocessed", 15.0, (14.9, 15.1), 0.0002)    # within 5%: equal whatever the intervals
    assert _best([settled, near], ["dynamic"], ctx) is near            # type: ignore[arg-type]


def _weight_only_search(passing: set[str], base_passes: bool):  # type: ignore[no-untyped-def]
    tried: list[str] = []

    def attempt(label: str, mode: str, options):  # type: ignore[no-untyped-def]
        suffix = " gptq" if options.rounding == "gptq" and "gptq" not in label else ""
        tried.append(label + suffix)
        return SimpleNamespace(mode=label, measurement=SimpleNamespace(quality=SimpleNamespace(passed=label in passing)))

    base = SimpleNamespace(mode="weight_only", measurement=SimpleNamespace(quality=SimpleNamespace(passed=base_passes)))
    return SimpleNamespace(candidates=[base], attempt=attempt), tried


def test_int4_weights_that_miss_the_goal_try_gptq_rounding_before_float_activations() -> None:
    from edgeops.compress.quantize import weight_only_variants
    from edgeops.manifest.models import QuantizeOptions

    options = QuantizeOptions(mode="auto")
    search, tried = _weight_only_search({"weight_only gptq"}, base_passes=False)
    weight_only_variants(search, options)  # type: ignore[arg-type]
    assert tried == ["weight_only gptq", "weight_only int8"]  # float activations would only be slower
    search, tried = _weight_only_search(set(), base_passes=False)
    weight_only_variants(search, options)  # type: ignore[arg-type]
    assert tried == ["weight_only gptq", "weight_only fp32-compute", "weight_only int8"]
    search, tried = _weight_only_search(set(), base_passes=True)  # coarser blocks missed: rounded better
    weight_only_variants(search, options)  # type: ignore[arg-type]
    assert tried == ["weight_only block128", "weight_only block128 gptq", "weight_only embeddings", "weight_only int8"]
    search, tried = _weight_only_search({"weight_only block128"}, base_passes=True)
    weight_only_variants(search, options)  # type: ignore[arg-type]
    assert tried == ["weight_only block128", "weight_only embeddings", "weight_only int8"]
    search, tried = _weight_only_search(set(), base_passes=False)  # asked for already: nothing to add
    weight_only_variants(search, QuantizeOptions(mode="auto", rounding="gptq"))  # type: ignore[arg-type]
    assert tried == ["weight_only fp32-compute gptq", "weight_only int8 gptq"]

