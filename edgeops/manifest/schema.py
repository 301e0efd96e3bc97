"""JSON Schema of every kind, for editors' YAML language servers and for the reference docs."""

from __future__ import annotations

from typing import Any

from edgeops.manifest.models import KINDS


def json_schema() -> dict[str, Any]:
    """One schema accepting any edgeops document; ``kind`` selects the branch."""
    definitions: dict[str, Any] = {}
    branches = []
    for kind, model in KINDS.items():
        schema = model.model_json_schema(ref_template="#/$defs/{model}")
        definitions.update(schema.pop("$defs", {}))
        definitions[kind] = schema
        branches.append({"if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
                         "then": {"$ref": f"#/$defs/{kind}"}})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://edgeops.dev/schema/v1.json",
        "title": "edgeops/v1 document (Deployment, Fleet or DeviceProfile)",
        "type": "object",
        "required": ["apiVersion", "kind"],
        "properties": {"apiVersion": {"const": "edgeops/v1"}, "kind": {"enum": list(KINDS)}},
        "allOf": branches,
        "$defs": definitions,
    }
