"""YAML loading that remembers where every value came from.

``load_yaml`` returns plain Python data plus a map from a path such as
``("spec", "recipe", 0, "quantize")`` to the 1-based line of that key (or list
item), so validation errors can point at the exact line. Duplicate keys,
anchors-with-merge surprises and malformed YAML are reported as located
``InputError``s instead of tracebacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from edgeops.errors import InputError

Loc = tuple[str | int, ...]


def _build(node: yaml.Node, loc: Loc, lines: dict[Loc, int], file: str, loader: yaml.SafeLoader) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise InputError.at(file, key_node.start_mark.line + 1, dotted(loc),
                                    "YAML merge keys (<<) are not supported; write the keys out")
            key = _build(key_node, loc, {}, file, loader)
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise InputError.at(file, key_node.start_mark.line + 1, dotted(loc),
                                    f"keys must be strings (got {key!r})")
            if key in out:
                raise InputError.at(file, key_node.start_mark.line + 1, dotted(loc + (key,)),
                                    f"duplicate key '{key}' (first defined on line {lines[loc + (key,)]})")
            lines[loc + (key,)] = key_node.start_mark.line + 1
            out[key] = _build(value_node, loc + (key,), lines, file, loader)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            lines[loc + (index,)] = item.start_mark.line + 1
            items.append(_build(item, loc + (index,), lines, file, loader))
        return items
    return loader.construct_object(node, deep=True)  # SafeLoader's tags: ints, floats, bools, null


def dotted(loc: Loc) -> str:
    """``("spec", "recipe", 0, "quantize")`` -> ``spec.recipe[0].quantize``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_yaml(path: Path, display: str | None = None) -> tuple[Any, dict[Loc, int]]:
    """Parse one YAML document; return (data, line map). Raises located InputError."""
    file = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError.at(file, None, "", "file not found") from None
    except IsADirectoryError:
        raise InputError.at(file, None, "", "is a directory, expected a YAML file") from None
    except UnicodeDecodeError as exc:
        raise InputError.at(file, None, "", f"not UTF-8 text ({exc.reason})") from None
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.context_mark and exc.problem_mark and exc.context_mark.line != exc.problem_mark.line:
            what += f" ({exc.context} started on line {exc.context_mark.line + 1})"
        raise InputError.at(file, line, "", f"malformed YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise InputError.at(file, None, "", f"malformed YAML: {exc}") from None
    nodes = [n for n in nodes if n is not None]
    if not nodes:
        raise InputError.at(file, 1, "", "empty file, expected a document with apiVersion and kind")
    if len(nodes) > 1:
        raise InputError.at(file, nodes[1].start_mark.line + 1, "",
                            "one document per file; split this file at the '---'")
    lines: dict[Loc, int] = {(): nodes[0].start_mark.line + 1}
    loader = yaml.SafeLoader("")
    try:
        data = _build(nodes[0], (), lines, file, loader)
    except yaml.constructor.ConstructorError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise InputError.at(file, line, "", f"unsupported YAML value: {exc.problem}") from None
    finally:
        loader.dispose()
    return data, lines


def line_for(lines: dict[Loc, int], loc: Loc) -> int:
    """The line of the deepest known prefix of ``loc``."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1
