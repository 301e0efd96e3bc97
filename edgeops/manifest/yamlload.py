"""YAML loading that remembers where every value came from.

``load_yaml`` returns plain Python data plus a map from a path such as
``("spec", "recipe", 0, "quantize")`` to the 1-based line of that key (or list
item), so validation errors can point at the exact line. Duplicate keys,
anchors-with-merge surprises and malformed YAML are reported as located
``InputError``s instead of tracebacks.

Files come from pull requests, so loading has limits (size, nesting depth, aliases, values after
alias expansion): a YAML bomb is a located one-line error in milliseconds, not a MemoryError.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from edgeops.errors import InputError

Loc = tuple[str | int, ...]

MAX_BYTES = 1_000_000      # a manifest is a few kB
MAX_DEPTH = 64             # nested mappings and lists
MAX_ALIASES = 100          # *alias uses in one file
MAX_VALUES = 100_000       # values after aliases are expanded


# libyaml's parser when PyYAML has it (the same events and marks, ~10x faster on a 1,000-device fleet file)
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Budget:
    def __init__(self, file: str) -> None:
        self.file, self.values = file, 0

    def spend(self, node: yaml.Node) -> None:
        self.values += 1
        if self.values > MAX_VALUES:
            raise InputError.at(self.file, node.start_mark.line + 1, "",
                                f"expands to more than {MAX_VALUES:,} values (aliases of aliases?); "
                                "write the values out")


def _check_structure(text: str, file: str) -> None:
    """Depth and alias limits, from the event stream (which, unlike composing, does not recurse).

    libyaml stops at its own nesting limit with a message of its own: the pure-Python parser then says
    what the limit is here.
    """
    try:
        _walk(yaml.parse(text, Loader=FAST_LOADER), file)
    except yaml.YAMLError:
        _walk(yaml.parse(text, Loader=yaml.SafeLoader), file)


def _walk(events: Iterator[yaml.Event], file: str) -> None:
    depth = aliases = 0
    for event in events:
        line = event.start_mark.line + 1 if event.start_mark else None
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise InputError.at(file, line, "",
                                    f"nested deeper than {MAX_DEPTH} levels; a manifest needs a handful")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise InputError.at(file, line, "",
                                    f"more than {MAX_ALIASES} YAML aliases (*name); write the values out")


def _build(node: yaml.Node, loc: Loc, lines: dict[Loc, int], file: str, loader: yaml.SafeLoader,
           budget: _Budget) -> Any:
    budget.spend(node)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise InputError.at(file, key_node.start_mark.line + 1, dotted(loc),
                                    "YAML merge keys (<<) are not supported; write the keys out")
            key = _build(key_node, loc, {}, file, loader, budget)
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise InputError.at(file, key_node.start_mark.line + 1, dotted(loc),
                                    f"keys must be strings (got {key!r})")
            if key in out:
                raise InputError.at(file, key_node.start_mark.line + 1, dotted(loc + (key,)),
                                    f"duplicate key '{key}' (first defined on line {lines[loc + (key,)]})")
            lines[loc + (key,)] = key_node.start_mark.line + 1
            out[key] = _build(value_node, loc + (key,), lines, file, loader, budget)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            lines[loc + (index,)] = item.start_mark.line + 1
            items.append(_build(item, loc + (index,), lines, file, loader, budget))
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
        if path.is_file() and path.stat().st_size > MAX_BYTES:
            raise InputError.at(file, None, "", f"{path.stat().st_size:,} bytes; a manifest may be at most "
                                                f"{MAX_BYTES:,}")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError.at(file, None, "", "file not found") from None
    except IsADirectoryError:
        raise InputError.at(file, None, "", "is a directory, expected a YAML file") from None
    except UnicodeDecodeError as exc:
        raise InputError.at(file, None, "", f"not UTF-8 text ({exc.reason})") from None
    try:
        _check_structure(text, file)
        nodes = list(yaml.compose_all(text, Loader=FAST_LOADER))
    except yaml.MarkedYAMLError as exc:
        line, what = _where_it_went_wrong(exc, text)
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
        data = _build(nodes[0], (), lines, file, loader, _Budget(file))
    except yaml.constructor.ConstructorError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise InputError.at(file, line, "", f"unsupported YAML value: {exc.problem}") from None
    finally:
        loader.dispose()
    return data, lines


def _where_it_went_wrong(exc: yaml.MarkedYAMLError, text: str) -> tuple[int | None, str]:
    """(line, what): an unclosed quote or bracket is the mistake of the line that opened it, not of the line
    where the parser noticed (the next key, or the end of the file)."""
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark else None
    what = exc.problem or exc.context or "invalid YAML"
    start, problem = exc.context_mark, exc.problem_mark
    if not (exc.context and start and problem and start.line != problem.line):
        return line, what
    opened = text.splitlines()[start.line] if start.line < len(text.splitlines()) else ""
    unclosed_bracket = exc.context.startswith("while parsing a flow") and \
        opened.count("[") + opened.count("{") > opened.count("]") + opened.count("}")
    if exc.context.startswith("while scanning a quoted scalar") or unclosed_bracket:
        kind = "quote" if "quoted" in exc.context else "bracket"
        return start.line + 1, f"this {kind} is never closed ({what} on line {problem.line + 1})"
    return line, f"{what} ({exc.context} started on line {start.line + 1})"


def line_for(lines: dict[Loc, int], loc: Loc) -> int:
    """The line of the deepest known prefix of ``loc``."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1
