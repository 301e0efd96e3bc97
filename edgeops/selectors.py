"""Label selectors as kubectl writes them (`-l`): ``ring=canary,site!=lab,hw in (x86,arm),gpu,!legacy``.

Terms are ANDed: ``k=v`` (or ``k==v``), ``k!=v`` (also true when the label is absent), ``k in (a,b)``,
``k notin (a,b)``, ``k`` (the label exists) and ``!k`` (it does not).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

_KEY = r"[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?"
_VALUE = r"[A-Za-z0-9._-]*"
_SET = re.compile(rf"^(?P<key>{_KEY})\s+(?P<op>in|notin)\s+\((?P<values>[^()]*)\)$")
_EQUALITY = re.compile(rf"^(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>{_VALUE})$")
_EXISTS = re.compile(rf"^(?P<neg>!?)\s*(?P<key>{_KEY})$")


class Op(StrEnum):
    EQUALS = "="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    ABSENT = "!exists"


@dataclass(frozen=True)
class Requirement:
    key: str
    op: Op
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op in (Op.EQUALS, Op.IN):
            return value in self.values
        if self.op in (Op.NOT_EQUALS, Op.NOT_IN):
            return value not in self.values
        return (value is not None) == (self.op == Op.EXISTS)


@dataclass(frozen=True)
class LabelSelector:
    text: str
    requirements: tuple[Requirement, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        return self.text


def _terms(text: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"unbalanced parentheses in {text!r}")
        if char == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += char
    if depth:
        raise ValueError(f"unbalanced parentheses in {text!r}")
    return [*terms, current.strip()]


def parse_selector(text: str) -> LabelSelector:
    """A selector from its text; ValueError saying which term is wrong and what is allowed."""
    requirements = []
    for term in _terms(text):
        if not term:
            raise ValueError(f"empty term in selector {text!r}")
        if match := _SET.match(term):
            values = frozenset(v.strip() for v in match["values"].split(",") if v.strip())
            if not values or not all(re.fullmatch(_VALUE, v) for v in values):
                raise ValueError(f"{term!r}: list one or more values, e.g. {match['key']} in (a,b)")
            requirements.append(Requirement(match["key"], Op.IN if match["op"] == "in" else Op.NOT_IN, values))
        elif match := _EQUALITY.match(term):
            op = Op.NOT_EQUALS if match["op"] == "!=" else Op.EQUALS
            requirements.append(Requirement(match["key"], op, frozenset({match["value"]})))
        elif match := _EXISTS.match(term):
            requirements.append(Requirement(match["key"], Op.ABSENT if match["neg"] else Op.EXISTS))
        else:
            raise ValueError(f"{term!r} is not a selector term: use key=value, key!=value, key in (a,b), "
                             "key notin (a,b), key or !key")
    return LabelSelector(text.strip(), tuple(requirements))
