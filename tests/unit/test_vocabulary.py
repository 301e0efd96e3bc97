"""Every state has one meaning, and docs/states.md is generated from the enums, not written beside them."""

from __future__ import annotations

from edgeops.types import MEANING, VOCABULARY, vocabulary_markdown
from labkit.repo import REPO


def test_every_state_has_a_meaning_and_nothing_else_does() -> None:
    for enum in VOCABULARY:
        assert set(MEANING[enum]) == set(enum), enum.__name__
    assert set(MEANING) == set(VOCABULARY)


def test_docs_states_is_generated_from_the_enums() -> None:
    assert (REPO / "docs" / "states.md").read_text() == vocabulary_markdown(), \
        "docs/states.md is stale: python -m edgeops.types > docs/states.md"
