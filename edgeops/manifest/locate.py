"""Turn pydantic validation errors into located, actionable problems."""

from __future__ import annotations

import re
import types
import typing
from typing import Any, Callable

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from edgeops.errors import Problem
from edgeops.hints import did_you_mean
from edgeops.manifest.models import NAME_PATTERN
from edgeops.manifest.yamlload import Loc, dotted, line_for


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """Every BaseModel class reachable through Optional/Union/list/dict/Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return models_in(typing.get_args(annotation)[0])
    found: list[type[BaseModel]] = []
    if origin in (typing.Union, types.UnionType, list, dict, tuple):
        for arg in typing.get_args(annotation):
            found.extend(models_in(arg))
    return found


def _fields_at(root: type[BaseModel], loc: Loc) -> list[str]:
    """The field names valid at ``loc`` (the mapping that holds an unknown key)."""
    candidates: list[type[BaseModel]] = [root]
    for part in loc:
        if isinstance(part, int):
            continue
        following: list[type[BaseModel]] = []
        for model in candidates:
            if part in model.model_fields:
                following.extend(models_in(model.model_fields[part].annotation))
        if following:
            candidates = following
        else:
            # a union tag such as 'rapl' in loc: keep the member whose literal matches
            tagged = [m for m in candidates if _has_literal(m, part)]
            if tagged:
                candidates = tagged
    names: list[str] = []
    for model in candidates:
        names.extend(n for n in model.model_fields if n not in names)
    return names


def _has_literal(model: type[BaseModel], value: str) -> bool:
    for field in model.model_fields.values():
        if typing.get_origin(field.annotation) is typing.Literal and value in typing.get_args(field.annotation):
            return True
    return False


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _tag_hint(ctx: dict[str, Any]) -> str:
    tags = [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",")]
    given = str(ctx.get("tag", ""))
    return f"must be one of {', '.join(tags)} (got {given!r}){did_you_mean(given, tags)}"


def _literal_hint(ctx: dict[str, Any], given: Any) -> str:
    choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
    return did_you_mean(given, choices) if isinstance(given, str) else ""


def valid_name(name: str) -> str:
    """The nearest name that is a DNS-1123 label: lower case, '-' for anything else, at most 63."""
    lowered = re.sub(r"[^a-z0-9-]+", "-", name.lower())
    return re.sub(r"-{2,}", "-", lowered).strip("-")[:63].rstrip("-") or "name"


def _pattern_message(ctx: dict[str, Any], given: Any) -> str:
    if ctx.get("pattern") == NAME_PATTERN and isinstance(given, str):
        return (f"must be a name of lower-case letters, digits and '-', at most 63, starting and ending with a "
                f"letter or digit (it becomes a path, a host label and a metric label); try '{valid_name(given)}'")
    return f"does not match the allowed form {ctx.get('pattern')}"


def _describe(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx: dict[str, Any] = error.get("ctx", {})
    given = error.get("input")
    shown = f" (got {given!r})" if isinstance(given, (int, float, str, bool)) or given is None else ""
    phrases: dict[str, Callable[[], str]] = {
        "greater_than": lambda: f"must be > {_num(ctx.get('gt'))}",
        "greater_than_equal": lambda: f"must be >= {_num(ctx.get('ge'))}",
        "less_than": lambda: f"must be < {_num(ctx.get('lt'))}",
        "less_than_equal": lambda: f"must be <= {_num(ctx.get('le'))}",
        "missing": lambda: "required field is missing",
        "string_pattern_mismatch": lambda: _pattern_message(ctx, given),
        "too_short": lambda: f"needs at least {ctx.get('min_length')} item(s)",
        "literal_error": lambda: f"must be one of {ctx.get('expected')}" + _literal_hint(ctx, given),
        "int_type": lambda: "must be an integer",
        "int_parsing": lambda: "must be an integer",
        "int_from_float": lambda: "must be a whole number",
        "float_type": lambda: "must be a number",
        "float_parsing": lambda: "must be a number",
        "finite_number": lambda: "must be a finite number",
        "bool_type": lambda: "must be true or false",
        "bool_parsing": lambda: "must be true or false",
        "string_type": lambda: "must be a string",
        "list_type": lambda: "must be a list",
        "dict_type": lambda: "must be a mapping",
        "model_type": lambda: "must be a mapping",
        "model_attributes_type": lambda: "must be a mapping",
        "union_tag_invalid": lambda: _tag_hint(ctx),
        "union_tag_not_found": lambda: f"needs the key '{ctx.get('discriminator', '').strip(chr(39))}'",
    }
    if kind == "value_error":
        return str(ctx.get("error", error["msg"])).rstrip(".")
    if given is None and kind in ("model_type", "dict_type", "model_attributes_type", "list_type"):
        return "is empty; write its fields under it"
    if kind in ("missing", "model_type", "dict_type", "model_attributes_type", "list_type"):
        shown = "" if kind == "missing" else f" (got {type(given).__name__})"
    text = phrases[kind]() if kind in phrases else error["msg"][0].lower() + error["msg"][1:]
    return text + shown


def problems_from(exc: ValidationError, root: type[BaseModel], file: str,
                  lines: dict[Loc, int]) -> list[Problem]:
    """One problem per pydantic error, each with file, line and dotted field path."""
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for error in exc.errors():
        loc = clean_loc(root, tuple(error["loc"]), lines)
        if error["type"] == "extra_forbidden":
            key = loc[-1]
            valid = [n for n in _fields_at(root, loc[:-1])]
            message = f"unknown key '{key}'" + did_you_mean(str(key), valid, f"; valid keys: {', '.join(valid)}")
        else:
            message = _describe(error)
            if error["type"] == "union_tag_invalid":
                key = str(error.get("ctx", {}).get("discriminator", "")).strip("'")
                loc = loc + (key,) if loc + (key,) in lines else loc
        field = dotted(loc)
        if (field, message) in seen:
            continue
        seen.add((field, message))
        problems.append(Problem(file, line_for(lines, loc), field, message))
    return _drop_union_noise(problems)


def clean_loc(root: type[BaseModel], loc: Loc, lines: dict[Loc, int]) -> Loc:
    """Drop pydantic's union member names (``'int'``, ``'rapl'``, ``'function-after[...]'``).

    A part is kept when it is a list index, a key present in the YAML, or a
    field of a model that can stand at that place (a missing field).
    """
    kept: list[str | int] = []
    candidates: list[type[BaseModel]] = [root]
    for part in loc:
        if isinstance(part, int):
            kept.append(part)
            continue
        fields = [m for m in candidates if part in m.model_fields]
        if fields or tuple(kept) + (part,) in lines:
            kept.append(part)
            following = [x for m in fields for x in models_in(m.model_fields[part].annotation)]
            candidates = following or candidates
        else:
            tagged = [m for m in candidates if _has_literal(m, str(part))]
            candidates = tagged or candidates
    return tuple(kept)


def _drop_union_noise(problems: list[Problem]) -> list[Problem]:
    """For ``int | str`` fields pydantic reports one error per member; keep one per field."""
    by_field: dict[str, Problem] = {}
    for problem in problems:
        by_field.setdefault(problem.field, problem)
    return list(by_field.values())
