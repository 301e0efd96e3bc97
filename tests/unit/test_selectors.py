"""Label selectors (kubectl -l syntax) and waves that name them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgeops.manifest.models import RolloutPolicy
from edgeops.plan import DesiredDevice, assign_waves
from edgeops.selectors import parse_selector

LABELS = {"ring": "canary", "site": "lab", "hw": "x86"}


@pytest.mark.parametrize("text,expected", [
    ("ring=canary", True), ("ring==canary", True), ("ring=main", False), ("ring!=main", True),
    ("missing!=x", True), ("hw in (x86, arm)", True), ("hw notin (x86,arm)", False), ("site", True),
    ("!site", False), ("!missing", True), ("ring=canary,site!=lab", False), ("ring=canary, hw in (arm,x86)", True),
])
def test_terms_are_anded_and_mean_what_kubectl_means(text: str, expected: bool) -> None:
    assert parse_selector(text).matches(LABELS) is expected


@pytest.mark.parametrize("text", ["ring=", "=canary", "hw in ()", "hw in (x86", "ring=canary,,site", "a b", "ring>1"])
def test_a_bad_selector_says_which_term_is_wrong(text: str) -> None:
    if text == "ring=":  # an empty value is allowed, as in kubectl
        assert not parse_selector(text).matches(LABELS)
        return
    with pytest.raises(ValueError):
        parse_selector(text)


def devices(rings: list[str]) -> list[DesiredDevice]:
    return [DesiredDevice(f"f/d{i}", "f", f"d{i}", "p", "x86", (("ring", ring),), "r", (("m", "s", 1),))
            for i, ring in enumerate(rings)]


def test_a_selector_wave_takes_exactly_the_devices_it_names_then_percentages_follow() -> None:
    policy = RolloutPolicy(waves=[{"selector": "ring=canary"}, "50%", "100%"])
    waves = assign_waves(devices(["main", "canary", "main", "canary", "main", "main"]), policy)
    assert {k for k, w in waves.items() if w == 1} == {"f/d1", "f/d3"}  # both canaries, not one per class
    assert sum(1 for w in waves.values() if w == 2) == 1 and sum(1 for w in waves.values() if w == 3) == 3


def test_a_selector_wave_that_matches_nothing_is_skipped_and_every_device_gets_a_wave() -> None:
    policy = RolloutPolicy(waves=[{"selector": "ring=beta"}, {"selector": "ring=canary"}])
    waves = assign_waves(devices(["main", "canary", "main"]), policy)
    assert waves == {"f/d1": 1, "f/d0": 2, "f/d2": 2}


def test_a_wave_with_a_bad_selector_is_a_manifest_error() -> None:
    with pytest.raises(ValidationError, match="is not a selector term"):
        RolloutPolicy(waves=[{"selector": "ring>1"}])
