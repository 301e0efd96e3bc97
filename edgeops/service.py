"""The one API the command line uses: each command's work as a function that returns data.

No printing and no exit codes here (the CLI does both); progress and live reporting come in as
callbacks. Heavy modules (onnx, onnxruntime, paramiko) are imported by the functions that need them,
so `edgeops --help` and `validate` stay quick.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeops.errors import EdgeopsError, InputError, Problem

if TYPE_CHECKING:
    from edgeops.build.cache import Cache as BuildCache
    from edgeops.build.pipeline import BuildResult
    from edgeops.gitdiff import Touched
    from edgeops.lab import LabDevice
    from edgeops.ledger import Ledger
    from edgeops.operations import StatusRow
    from edgeops.plan import Plan
    from edgeops.render import RenderedConfig
    from edgeops.rollout import Reporter, RolloutResult
    from edgeops.spec.models import Deployment, Fleet
    from edgeops.spec.workspace import Document, Workspace
    from edgeops.targets import TargetDevice

Progress = Callable[[str], None]


def _quiet(message: str) -> None:
    """The default progress callback: say nothing."""


def workspace_root(paths: tuple[Path, ...] | list[Path], root: Path | None) -> Path:
    """The repository root: ``root`` when given, else found from the first path (or the working directory)."""
    from edgeops.spec.workspace import find_root

    return root.resolve() if root else find_root(paths[0] if paths else Path.cwd())


def _existing(names: tuple[str, ...] | list[str]) -> list[Path]:
    return [Path(n) for n in names if Path(n).exists()]


def _context(deployment: str, root: Path | None) -> tuple[Workspace, Document[Deployment], Ledger]:
    """The workspace, one deployment (by name or manifest path) and its ledger."""
    from edgeops.ledger import default_ledger
    from edgeops.spec.workspace import load_workspace

    ws = load_workspace(workspace_root(_existing([deployment]), root))
    return ws, ws.deployment(deployment), default_ledger(ws.root)


def _selected(manifests: tuple[str, ...], changed_since: str | None,
              root: Path | None) -> tuple[Workspace, list[Document[Deployment]], Ledger]:
    """The deployments named or touched since ``changed_since``, sorted by name.

    Named by path only, a broken manifest elsewhere in the repository does not stop them.
    """
    from edgeops.gitdiff import changed_files, touched_deployments
    from edgeops.ledger import default_ledger
    from edgeops.spec.workspace import load_workspace

    paths = _existing(manifests)
    focused = not changed_since and len(paths) == len(manifests)
    ws = load_workspace(workspace_root(paths, root), focus=paths if focused else None, deep=True)
    docs = {ws.deployment(m).name: ws.deployment(m) for m in manifests}
    if changed_since:
        for touched in touched_deployments(ws, changed_files(ws.root, changed_since)):
            docs[touched.deployment] = ws.deployments[touched.deployment]
    return ws, [docs[name] for name in sorted(docs)], default_ledger(ws.root)


# ------------------------------------------------------------------ offline: validate, schema, build, render


@dataclass(frozen=True)
class Validation:
    documents: list[Any]          # Document of any kind, sorted by file
    warnings: list[Problem]


def validate(paths: tuple[Path, ...], root: Path | None) -> Validation:
    """The given files (or the whole repository) and the fleets and profiles they use, checked offline."""
    from edgeops.spec.workspace import load_workspace, yaml_files

    for path in paths:
        if not path.exists():
            raise InputError.at(str(path), None, "", "file not found")
    files = yaml_files(list(paths))
    ws = load_workspace(workspace_root(paths, root), extra=files, focus=list(paths) or None, deep=True)
    docs: list[Any] = [*ws.deployments.values(), *ws.fleets.values(), *ws.profiles.values()]
    if paths:
        wanted = {p.resolve() for p in files}
        docs = [d for d in docs if d.path in wanted]
    return Validation(sorted(docs, key=lambda d: d.display), ws.warnings)


def json_schema() -> dict[str, Any]:
    from edgeops.spec.schema import json_schema as schema

    return schema()


def build_targets(manifest: Path, accelerators: tuple[str, ...],
                  root: Path | None) -> tuple[Document[Deployment], list[str], BuildCache]:
    """What `build` will build: the deployment, its accelerator classes (or those asked for), the cache."""
    from edgeops.build.pipeline import default_cache
    from edgeops.spec.workspace import load_workspace

    ws = load_workspace(workspace_root([manifest], root))
    doc = ws.deployment(str(manifest))
    return doc, list(accelerators) or sorted(ws.accelerators_of(doc)), default_cache(ws)


def build(doc: Document[Deployment], accelerator: str, cache: BuildCache, force: bool = False,
          progress: Progress = _quiet) -> BuildResult:
    from edgeops.build.pipeline import build as run_build

    return run_build(doc, accelerator, cache, force=force, progress=progress)


def render(manifest: Path, device: str | None, root: Path | None) -> list[tuple[TargetDevice, RenderedConfig]]:
    """The runtime config of each target device (or of ``device``); builds first (cache hits are free)."""
    from edgeops.build.pipeline import build as run_build
    from edgeops.build.pipeline import default_cache
    from edgeops.render import render_device
    from edgeops.spec.workspace import load_workspace
    from edgeops.targets import target_devices

    ws = load_workspace(workspace_root([manifest], root))
    doc = ws.deployment(str(manifest))
    targets = [t for t in target_devices(ws, doc.name) if device in (None, t.name, t.key)]
    if not targets:
        raise InputError.at(str(manifest), None, "", f"no target device named {device!r}")
    cache = default_cache(ws)
    artifacts = {acc: run_build(doc, acc, cache).report["artifact"] for acc in sorted({t.accelerator for t in targets})}
    return [(t, render_device(ws, doc, t, artifacts[t.accelerator])) for t in targets]


# ------------------------------------------------------------------ the lab


def _lab_fleet(fleet: str, root: Path | None) -> tuple[Workspace, Document[Fleet]]:
    from edgeops.spec.workspace import load_workspace

    ws = load_workspace(workspace_root(_existing([fleet]), root))
    by_path = [f for f in ws.fleets.values() if f.path == Path(fleet).resolve()]
    return ws, (by_path[0] if by_path else ws.fleet(fleet))


def lab_up(fleet: str, root: Path | None, login_home: Path | None,
           report: Progress = _quiet) -> tuple[str, list[LabDevice]]:
    from edgeops.lab import lab_up as start
    from edgeops.targets import fleet_targets

    ws, doc = _lab_fleet(fleet, root)
    return doc.name, start(ws, doc, fleet_targets(ws, doc), login_home.resolve() if login_home else None, report)


def lab_status(fleet: str, root: Path | None) -> tuple[str, list[LabDevice]]:
    from edgeops.lab import lab_status as read

    ws, doc = _lab_fleet(fleet, root)
    return doc.name, read(ws, doc)


def lab_down(fleet: str, root: Path | None, wipe: bool) -> tuple[str, list[LabDevice]]:
    from edgeops.lab import lab_down as stop

    ws, doc = _lab_fleet(fleet, root)
    return doc.name, stop(ws, doc, wipe)


# ------------------------------------------------------------------ plan, apply, the paused rollout


@dataclass(frozen=True)
class PlanEntry:
    plan: Plan
    reports: dict[str, dict[str, Any]]    # build report by accelerator
    warnings: list[str]


def plan(manifests: tuple[str, ...], changed_since: str | None, root: Path | None,
         progress: Progress = _quiet) -> list[PlanEntry]:
    """What apply would do, per deployment named or touched, with every device's facts and preflight."""
    from edgeops.connections import Connections
    from edgeops.operations import plan_deployment, plan_warnings

    ws, docs, ledger = _selected(manifests, changed_since, root)
    entries = []
    with Connections(parallelism=16) as connections:
        for doc in docs:
            result, desired = plan_deployment(ws, doc, connections, ledger, progress=progress)
            entries.append(PlanEntry(result, {acc: a.report for acc, a in desired.artifacts.items()},
                                     plan_warnings(doc, desired)))
    return entries


@dataclass(frozen=True)
class Applied:
    results: list[RolloutResult]
    not_applied: list[str]       # deployments after the first one that did not succeed
    selected: int                # deployments that were to be applied


def apply(manifests: tuple[str, ...], changed_since: str | None, plan_file: Path | None, root: Path | None,
          reporter: Reporter, progress: Progress = _quiet, lock_timeout_s: float = 0,
          on_result: Callable[[RolloutResult], None] = lambda result: None) -> Applied:
    """Roll out each deployment in name order; the first that does not succeed stops the rest."""
    from edgeops.connections import Connections
    from edgeops.operations import apply_deployment, load_plan

    ws, docs, ledger = _selected(manifests, changed_since, root)
    saved = load_plan(plan_file) if plan_file else None
    if saved and len(docs) != 1:
        raise InputError.at(str(plan_file), None, "", "--plan applies exactly one deployment")
    results: list[RolloutResult] = []
    for doc in docs:
        with Connections(parallelism=doc.obj.spec.rollout.parallelism) as connections:
            _, result = apply_deployment(ws, doc, connections, ledger, reporter, saved, progress=progress,
                                         lock_timeout_s=lock_timeout_s)
        results.append(result)
        on_result(result)
        if not result.ok:
            return Applied(results, [d.name for d in docs[len(results):]], len(docs))
    return Applied(results, [], len(docs))


@dataclass(frozen=True)
class Settled:
    settled: RolloutResult | None     # promote or abort of the paused devices
    continued: RolloutResult | None   # the rollout that resume and promote go on with


def settle_paused(deployment: str, accept: bool | None, root: Path | None, reporter: Reporter,
                  progress: Progress = _quiet, lock_timeout_s: float = 0) -> Settled:
    """``accept`` None: resume; True: promote then continue; False: abort."""
    from edgeops.connections import Connections
    from edgeops.operations import apply_deployment, paused_devices
    from edgeops.operations import settle_paused as settle

    ws, doc, ledger = _context(deployment, root)
    with Connections(parallelism=doc.obj.spec.rollout.parallelism) as connections:
        settled = None
        if accept is None and not paused_devices(ws, doc, connections):
            raise EdgeopsError(f"nothing to resume: no device of {doc.name} is paused",
                               hint="edgeops apply starts a new rollout")
        if accept is not None:
            settled = settle(ws, doc, connections, ledger, accept, lock_timeout_s)
            if not settled.ok or not accept:
                return Settled(settled, None)
        _, result = apply_deployment(ws, doc, connections, ledger, reporter, progress=progress,
                                     lock_timeout_s=lock_timeout_s)
    return Settled(settled, result)


# ------------------------------------------------------------------ reading: diff, status, history


def diff(base: str, head: str | None, root: Path | None) -> list[Touched]:
    from edgeops.gitdiff import changed_files, touched_deployments
    from edgeops.spec.workspace import load_workspace

    ws = load_workspace(workspace_root([], root))
    return touched_deployments(ws, changed_files(ws.root, base, head))


def status(manifests: tuple[str, ...], root: Path | None, verify: bool = False,
           progress: Progress = _quiet) -> dict[str, list[StatusRow]]:
    """Rows per deployment (every deployment when none is named), read from the devices now."""
    from edgeops.connections import Connections
    from edgeops.operations import status_rows
    from edgeops.spec.workspace import load_workspace

    ws = load_workspace(workspace_root(_existing(manifests), root))
    docs = [ws.deployment(m) for m in manifests] or [ws.deployments[n] for n in sorted(ws.deployments)]
    with Connections(parallelism=16) as connections:
        return {doc.name: status_rows(ws, doc, connections, progress=progress, verify=verify) for doc in docs}


def reconcile(manifests: tuple[str, ...], interval_s: float, iterations: int, verify_every: int,
              root: Path | None, log: Progress = _quiet) -> int:
    """The drift loop; returns how many applies failed."""
    from edgeops.operations import reconcile_loop
    from edgeops.spec.workspace import load_workspace

    ws = load_workspace(workspace_root(_existing(manifests), root))
    names = [ws.deployment(m).name for m in manifests] or sorted(ws.deployments)
    return reconcile_loop(ws.root, names, interval_s, iterations, log=log, verify_every=verify_every)


def history(deployment: str, limit: int, root: Path | None) -> tuple[str, list[dict[str, Any]]]:
    _, doc, ledger = _context(deployment, root)
    return doc.name, ledger.history(doc.name, limit)


def rollback(deployment: str, to: str | None, devices: list[str] | None, root: Path | None, reporter: Reporter,
             allow_rejected: bool = False, lock_timeout_s: float = 0) -> RolloutResult:
    from edgeops.connections import Connections
    from edgeops.operations import rollback_deployment

    ws, doc, ledger = _context(deployment, root)
    with Connections(parallelism=doc.obj.spec.rollout.parallelism) as connections:
        return rollback_deployment(ws, doc, connections, ledger, to, devices, reporter, allow_rejected,
                                   lock_timeout_s=lock_timeout_s)


def summarize(result: RolloutResult) -> dict[str, Any]:
    """Counts per decision and bytes moved, as the ledger keeps them."""
    from edgeops.rollout import summarize as counts

    return counts(result)
