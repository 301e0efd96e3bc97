"""Imports flow one way: down the layers, the pure core imports no I/O, the CLI only reaches the service."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "edgeops"
PURE = {"edgeops.types", "edgeops.errors", "edgeops.facts", "edgeops.plan", "edgeops.plan_operations", "edgeops.verify",
        "edgeops.health"}
IO = {"edgeops.transport", "edgeops.pull", "edgeops.labpull", "edgeops.connections", "edgeops.device", "edgeops.lab", "edgeops.lablink", "edgeops.labplace", "edgeops.state",
      "edgeops.rollout", "edgeops.operations", "edgeops.cli", "edgeops.ui", "edgeops.compress", "edgeops.desired",
      "edgeops.generative", "edgeops.adapt", "edgeops.decide",
      "edgeops.endpoints", "edgeops.running_quality"}
FRONT = {"edgeops.cli", "edgeops.ui", "edgeops.__main__"}  # __main__ only starts the CLI

# every module belongs to one layer and imports only from its own layer or those below
LAYERS = [
    {"edgeops.types", "edgeops.errors", "edgeops.hints", "edgeops.metrics", "edgeops.settings", "edgeops.runtime_config",
     "edgeops.selectors", "edgeops.agent", "edgeops.adapt.aggregate", "edgeops.adapt.privacy",
     "edgeops.blocks"},                                                              # vocabulary, leaves
    {"edgeops.manifest"},                                                            # manifests, offline
    {"edgeops.facts", "edgeops.plan", "edgeops.plan_operations", "edgeops.verify", "edgeops.health",
     "edgeops.targets"},                                                             # pure decisions
    {"edgeops.compress", "edgeops.render", "edgeops.release", "edgeops.transport", "edgeops.state",
     "edgeops.signing", "edgeops.exporter", "edgeops.webhooks", "edgeops.report", "edgeops.gitinfo",
     "edgeops.gitdiff", "edgeops.pull.broker", "edgeops.pull.registry", "edgeops.pull",
     "edgeops.generative", "edgeops.adapt", "edgeops.fleetpage"},                    # one job, one resource
    {"edgeops.device", "edgeops.connections", "edgeops.lab", "edgeops.desired", "edgeops.pull.fleet",
     "edgeops.labpull", "edgeops.labcgroup", "edgeops.lablink", "edgeops.labplace", "edgeops.endpoints", "edgeops.running_quality"},
    {"edgeops.rollout", "edgeops.pull.roller", "edgeops.decide"},                    # the executor, staging
    {"edgeops.operations", "edgeops.review", "edgeops.adapt.rounds"},                # composed operations
    {"edgeops.service"},                                                             # the one API of the CLI
    {"edgeops.ui"},
    {"edgeops.cli", "edgeops.__main__"},
]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "edgeops":
            found.add(node.module)
        elif isinstance(node, ast.Import):  # the agent's files import each other as siblings (edgeops_gate)
            found.update(a.name for a in node.names if a.name.split(".")[0] == "edgeops")
    return found


GRAPH = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _under(module: str, packages: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _layer(module: str) -> int:
    """The layer of the most specific entry naming ``module`` or a package above it."""
    found = [(len(p), n) for n, layer in enumerate(LAYERS) for p in layer if _under(module, {p})]
    assert found, f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}"
    return max(found)[1]


def test_every_module_imports_only_its_own_layer_or_those_below() -> None:
    upward = {m: sorted(i for i in imports if i != "edgeops" and _layer(i) > _layer(m))
              for m, imports in GRAPH.items() if m != "edgeops"}
    assert not {m: i for m, i in upward.items() if i}


def test_the_pure_core_does_no_io() -> None:
    offenders = {m: sorted(i for i in imports if _under(i, IO)) for m, imports in GRAPH.items() if m in PURE}
    assert not {m: i for m, i in offenders.items() if i}


OPERATIONS = {"edgeops.operations", "edgeops.review", "edgeops.adapt.rounds"}


def test_only_the_cli_reaches_the_ui_and_only_the_service_reaches_the_operations() -> None:
    for module, imports in GRAPH.items():
        if not _under(module, FRONT):
            assert not [i for i in imports if _under(i, FRONT)], module
        if module != "edgeops.service" and module not in OPERATIONS:
            assert not imports & OPERATIONS, module


def test_the_agent_is_one_file_that_imports_nothing_of_edgeops() -> None:
    assert GRAPH["edgeops.agent.edgeops_agent"] == set()


def test_the_cli_talks_to_the_service_layer_only() -> None:
    allowed = {"edgeops", "edgeops.service", "edgeops.ui", "edgeops.errors", "edgeops.types", "edgeops.settings"}
    assert GRAPH["edgeops.cli"] <= allowed, GRAPH["edgeops.cli"] - allowed


PROCESS_WIDE = {"os.environ", "os.getenv", "os.putenv", "os.chdir", "logging.basicConfig", "setLevel",
                "torch.set_num_threads"}
# distillation pins torch to one thread while it trains (and restores it): the same seed then gives the same
# student on any CPU; builds finish before a rollout starts its threads
ALLOWED = {("edgeops.cli", "os.environ"), ("edgeops.cli", "logging.basicConfig"),
           ("edgeops.compress.distill", "torch.set_num_threads")}


def _process_wide(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            name = f"{node.value.id}.{node.attr}" if isinstance(node.value, ast.Name) else node.attr
            found.update(n for n in PROCESS_WIDE if name == n or (n == node.attr and "." not in n))
    return found


def test_library_code_changes_no_process_wide_state_and_reads_no_environment() -> None:
    offenders = {(m, use) for m, p in ((_module(p), p) for p in PACKAGE.rglob("*.py"))
                 if not m.startswith("edgeops.agent") for use in _process_wide(p)}
    assert offenders <= ALLOWED, sorted(offenders - ALLOWED)
