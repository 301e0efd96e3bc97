"""Imports flow one way: the pure core imports no I/O, the library never imports the CLI or the UI."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edgeops"
PURE = {"edgeops.types", "edgeops.errors", "edgeops.facts", "edgeops.plan", "edgeops.verify", "edgeops.health"}
IO = {"edgeops.transport", "edgeops.connections", "edgeops.device", "edgeops.lab", "edgeops.ledger",
      "edgeops.rollout", "edgeops.operations", "edgeops.cli", "edgeops.ui", "edgeops.build", "edgeops.desired"}
FRONT = {"edgeops.cli", "edgeops.ui", "edgeops.__main__"}  # __main__ only starts the CLI


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgeops"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("edgeops"))
    return found


GRAPH = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _under(module: str, packages: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_pure_core_does_no_io() -> None:
    offenders = {m: sorted(i for i in imports if _under(i, IO)) for m, imports in GRAPH.items() if m in PURE}
    assert not {m: i for m, i in offenders.items() if i}


def test_only_the_cli_reaches_the_ui_and_only_the_service_reaches_the_operations() -> None:
    for module, imports in GRAPH.items():
        if not _under(module, FRONT):
            assert not [i for i in imports if _under(i, FRONT)], module
        if module != "edgeops.service":
            assert "edgeops.operations" not in imports, module


def test_the_agent_is_one_file_that_imports_nothing_of_edgeops() -> None:
    assert GRAPH["edgeops.agent.edgeops_agent"] == set()


def test_the_cli_talks_to_the_service_layer_only() -> None:
    allowed = {"edgeops", "edgeops.service", "edgeops.ui", "edgeops.errors", "edgeops.types"}
    assert GRAPH["edgeops.cli"] <= allowed, GRAPH["edgeops.cli"] - allowed
