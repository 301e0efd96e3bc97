""""Did you mean ...?" only when the guess is close: a wrong hint is worse than none.

Distance is counted in edits (insert, delete, replace, swap two neighbours; case ignored); a candidate
counts as close within one edit per four characters of the word (at least one).
"""

from __future__ import annotations

from collections.abc import Iterable


def edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: a swapped pair of letters is one edit, as a typo is."""
    a, b = a.lower(), b.lower()
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[len(b)]


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The nearest choice within the allowed distance (ties: the first), else None."""
    allowed = max(1, len(word) // 4)
    best: tuple[int, str] | None = None
    for choice in choices:
        distance = edit_distance(word, choice)
        if distance <= allowed and (best is None or distance < best[0]):
            best = (distance, choice)
    return best[1] if best else None


def did_you_mean(word: str, choices: Iterable[str], otherwise: str = "") -> str:
    """'; did you mean 'x'?' for a close choice, else ``otherwise`` (e.g. '; known: a, b')."""
    guess = closest(word, choices)
    return f"; did you mean '{guess}'?" if guess else otherwise
