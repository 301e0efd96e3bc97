"""The manifest reference (docs/manifest-reference.md), generated from the pydantic models.

    python -m edgeops.manifest.reference > docs/manifest-reference.md

A test regenerates it and compares, so the docs cannot drift from the code.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from edgeops.manifest.locate import models_in
from edgeops.manifest.models import KINDS


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, __import__("types").UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (
            " (optional)" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping {_type_name(args[0])} → {_type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    if isinstance(value, BaseModel):
        return "see below"
    if value is None:
        return "—"
    return f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"


def _constraints(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for attr, symbol in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"), ("min_length", "min length")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _rows(model: type[BaseModel], prefix: str, seen: set[tuple[type, str]]) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        notes = "; ".join(x for x in (field.description or "", _constraints(field)) if x)
        rows.append(f"| `{path}` | {_type_name(field.annotation)} | {_default(field)} | {notes} |")
        for sub in models_in(field.annotation):
            key = (sub, path)
            if key in seen:
                continue
            seen.add(key)
            sub_prefix = path + ("[]" if typing.get_origin(field.annotation) is list else "")
            members = models_in(field.annotation)
            if len(members) > 1:
                literal = next((f for f in sub.model_fields.values() if typing.get_origin(f.annotation) is typing.Literal), None)
                tag = typing.get_args(literal.annotation)[0] if literal else sub.__name__
                rows.append(f"| *when `{sub_prefix}` is `{tag}`:* | | | |")
            rows.extend(_rows(sub, sub_prefix, seen))
    return rows


def reference_markdown() -> str:
    """The whole reference page."""
    out = ["# Manifest reference", "",
           "Generated from the code by `python -m edgeops.manifest.reference`; a test keeps it in sync.",
           "Every document has `apiVersion: edgeops/v1`, a `kind`, `metadata` and `spec`. Unknown keys are",
           "errors. Paths inside a document are relative to that document's file.", ""]
    for kind, model in KINDS.items():
        out += [f"## {kind}", "", (model.__doc__ or "").strip(), "",
                "| field | type | default | notes |", "|---|---|---|---|"]
        out += _rows(model, "", set())
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown(), end="")
