"""Every manifest and profile field is read somewhere: a field the code never reads is a promise not kept."""

from __future__ import annotations

import re
import typing

from pydantic import BaseModel

from edgeops.manifest import models
from labkit.repo import REPO

# read by name in a way this scan cannot see (each with where it is read)
READ_INDIRECTLY: set[str] = set()


def _fields(model: type[BaseModel], seen: set[type[BaseModel]]) -> list[tuple[str, str]]:
    if model in seen:
        return []
    seen.add(model)
    found = []
    for name, field in model.model_fields.items():
        found.append((model.__name__, name))
        stack = [field.annotation]
        while stack:
            annotation = stack.pop()
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                found += _fields(annotation, seen)
            stack += list(typing.get_args(annotation))
    return found


def test_every_field_of_every_kind_is_read_by_the_code_or_a_template() -> None:
    files = [*(REPO / "edgeops").rglob("*.py"), *(REPO / "templates").iterdir()]
    sources = "\n".join(path.read_text() for path in files if path.name != "models.py")
    seen: set[type[BaseModel]] = set()
    fields = [f for kind in (models.Deployment, models.Fleet, models.DeviceProfile) for f in _fields(kind, seen)]
    unread = [f"{owner}.{name}" for owner, name in fields
              if f"{owner}.{name}" not in READ_INDIRECTLY
              and not re.search(rf"(\.{name}\b|[\"']{name}[\"'])", sources)]
    assert len(fields) > 80 and not unread, unread
