"""The on-device choice among an auto build's finalists (edgeops.decide.choose): a pure rule on one device's
figures."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeops.decide import SAME_SPEED, choose, standing


def row(label: str, p50: float, size: int, energy: float | None = None) -> dict[str, object]:
    return {"label": label, "p50_ms": p50, "size_bytes": size, "energy_mj": energy}


def test_the_fastest_on_the_device_wins_and_near_ties_go_to_the_smaller_file() -> None:
    rows = [row("dynamic", 0.50, 300), row("static", 0.40, 280), row("original", 1.0, 1000)]
    assert choose(rows, "latency", None)[0] == "static"
    rows = [row("dynamic", 0.41, 250), row("static", 0.40, 280), row("original", 1.0, 1000)]
    label, why = choose(rows, "latency", None)
    assert label == "dynamic" and "smaller file" in why and "2.44x the input" in why


def test_the_input_stays_unless_a_finalist_is_min_speedup_faster_on_the_device() -> None:
    rows = [row("static", 0.95, 280), row("original", 1.0, 1000)]
    label, why = choose(rows, "latency", None)
    assert label == "original" and "1.05x the input" in why and "min_speedup 1.1" in why
    assert choose(rows, "latency", 1.0)[0] == "static"


def test_energy_uses_the_sensor_and_latency_stands_in_without_one() -> None:
    rows = [row("static", 0.40, 280, energy=2.0), row("dynamic", 0.50, 300, energy=1.0), row("original", 1.0, 900, 5.0)]
    assert choose(rows, "energy", None)[0] == "dynamic"
    rows[0]["energy_mj"] = None
    label, why = choose(rows, "energy", None)
    assert label == "static" and "latency stands in" in why


def test_nothing_measured_is_an_error() -> None:
    with pytest.raises(ValueError):
        choose([], "latency", None)


@given(st.lists(st.tuples(st.floats(0.01, 100), st.integers(1, 10**7)), min_size=1, max_size=5),
       st.floats(0.01, 100), st.integers(1, 10**7), st.floats(1.0, 3.0))
@settings(max_examples=200, deadline=None)
def test_the_pick_is_near_the_fastest_or_the_input_and_never_a_slower_file_than_needed(
        finalists: list[tuple[float, int]], original_ms: float, original_size: int, min_speedup: float) -> None:
    rows = [row(f"c{i}", p50, size) for i, (p50, size) in enumerate(finalists)] + \
        [row("original", original_ms, original_size)]
    label, _ = choose(rows, "latency", min_speedup)
    fastest = min(r["p50_ms"] for r in rows)  # type: ignore[type-var]
    picked = next(r for r in rows if r["label"] == label)
    if label != "original":
        assert picked["p50_ms"] <= fastest * SAME_SPEED  # type: ignore[operator]
        assert original_ms / picked["p50_ms"] >= min_speedup  # type: ignore[operator]


def record(bases: dict[str, str], **classes: str | None) -> dict[str, object]:
    return {"summary": {"bases": bases, "classes": {c: {"label": label} for c, label in classes.items()}}}


def test_a_later_run_that_could_not_measure_a_class_keeps_what_was_decided_for_it() -> None:
    now = {"cpu": "k2"}
    records = [record({"cpu": "k1"}, arm="static"),                 # for an older build: not used
               record(now, arm="dynamic", x86="static"),
               record(now, arm=None, x86="original")]                # arm's device was away this time
    assert {c: d["label"] for c, d in standing(records, now).items()} == {"arm": "dynamic", "x86": "original"}
    assert standing(records, {"cpu": "k3"}) == {}                     # git builds something else now


def test_measuring_again_keeps_the_standing_pick_among_equals_but_not_against_a_clearly_faster_one() -> None:
    rows = [row("qoperator", 0.0333, 280), row("per-tensor", 0.0320, 281), row("original", 0.05, 1000)]
    assert choose(rows, "latency", None)[0] == "qoperator"                     # within 5%: the smaller file
    assert choose(rows, "latency", None, standing="per-tensor")[0] == "per-tensor"
    label, why = choose(rows, "latency", None, standing="per-tensor")
    assert "the pick before this measurement" in why
    rows[1]["p50_ms"] = 0.0300                                                 # 11% faster than the standing one
    assert choose(rows, "latency", None, standing="qoperator")[0] == "per-tensor"
    assert choose(rows, "latency", None, standing="gone")[0] == "per-tensor"   # a pick no longer a finalist
