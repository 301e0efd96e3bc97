"""The one API the command line uses: each command's work as a function that returns data.

No printing and no exit codes here (the CLI does both); progress and live reporting come in as
callbacks. Heavy modules (onnx, onnxruntime, paramiko) are imported by the functions that need them,
so `edgeops --help` and `validate` stay quick.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeops.errors import EdgeopsError, InputError, Problem
from edgeops.settings import Settings

if TYPE_CHECKING:
    from edgeops.compress.cache import Cache as BuildCache
    from edgeops.compress.pipeline import BuildResult
    from edgeops.fleetpage import Snapshot
    from edgeops.gitdiff import Touched
    from edgeops.lab import LabDevice
    from edgeops.manifest.models import Deployment, Fleet
    from edgeops.manifest.workspace import Document, Workspace
    from edgeops.operations import Repo, StatusRow
    from edgeops.plan import Plan
    from edgeops.render import RenderedConfig
    from edgeops.rollout import Reporter
    from edgeops.rollout import RolloutResult as RolloutResult  # re-exported: the CLI names it
    from edgeops.selectors import LabelSelector
    from edgeops.targets import TargetDevice
    from edgeops.webhooks import Webhook

Progress = Callable[[str], None]  # progress lines; ``notify`` gets what the user must hear (trust on first use)


def _quiet(message: str) -> None:
    """The default progress callback: say nothing."""


def workspace_root(paths: tuple[Path, ...] | list[Path], settings: Settings) -> Path:
    """The repository root: the one configured, else found from the first path (or the working directory)."""
    from edgeops.manifest.workspace import find_root

    return settings.root or find_root(paths[0] if paths else Path.cwd())


def _load(paths: tuple[Path, ...] | list[Path], settings: Settings, selection: bool = False,
          **options: Any) -> Workspace:
    """The repository the paths are in (or the configured one), under the settings' code-execution rule.
    ``selection`` (validate, plan, apply): target selectors and waves that take no device are errors too
    (warnings with --allow-empty), and waves that add nothing to a fleet this small are warnings."""
    from edgeops.manifest.workspace import load_workspace
    from edgeops.targets import selection_problems, wave_warnings

    strict = selection and not settings.allow_empty
    ws = load_workspace(workspace_root(paths, settings), allow_code=settings.allow_code,
                        secrets_dir=settings.secrets_dir, checks=(selection_problems,) if strict else (), **options)
    if selection:
        docs = list(ws.deployments.values())
        ws.warnings += wave_warnings(ws, docs) + ([] if strict else selection_problems(ws, docs))
    _warn_unrelated(ws.unrelated, settings)
    return ws


def _warn_unrelated(problems: list[Problem], settings: Settings) -> None:
    """A broken file the command does not use: said once, not in the way."""
    for file in dict.fromkeys(p.file for p in problems):
        first = next(p for p in problems if p.file == file)
        more = sum(1 for p in problems if p.file == file) - 1
        settings.warn(f"{first}{f' (and {more} more)' if more else ''}; not used here, so skipped "
                      "(`edgeops validate` reports it in full)")


def _scoped(name: str, kind: str, settings: Settings) -> tuple[Workspace, Document[Any]]:
    """The repository, and one deployment or fleet (by name or file) with only what it uses checked: a broken
    file it does not use is a warning, not an error."""
    ws, docs = _scoped_many([name], kind, settings)
    return ws, docs[0]


def _scoped_many(names: Sequence[str], kind: str, settings: Settings,
                 **options: Any) -> tuple[Workspace, list[Document[Any]]]:
    from edgeops.manifest.checks import closure

    ws = _load(_existing(list(names), settings), settings, tolerant=True, **options)
    table = ws.deployments if kind == "Deployment" else ws.fleets
    docs: list[Document[Any]] = []
    for name in names:
        named = _existing([name], settings)
        by_path = [d for d in table.values() if named and d.path == named[0].resolve()]
        if by_path or name in table:
            docs.append(by_path[0] if by_path else table[name])
        elif name in ws.broken_files or named:  # the one asked for is broken: its own problems are the answer
            own = {ws.broken_files.get(name, "")} | {p.file for p in ws.problems for n in named
                                                     if Path(p.file).resolve() == n.resolve()}
            raise InputError([p for p in ws.problems if p.file in own] or
                             [Problem(name, None, "", f"no {kind} with this name or path")])
        else:
            docs.append(ws.deployment(name) if kind == "Deployment" else ws.fleet(name))
    keep = closure(ws, [d.path for d in docs])
    mine = [p for p in ws.problems if p.file in keep]
    if mine:
        raise InputError(mine)
    _warn_unrelated([p for p in ws.problems if p.file not in keep], settings)
    return ws, docs


def state_location(settings: Settings) -> str:
    """The ledger the repository's commands use, as a URL without a password."""
    from edgeops.state import open_ledger

    return open_ledger(settings.state_url, settings.ledger_in(workspace_root([], settings))).location


def state_migrate(source: str | None, target: str, settings: Settings) -> dict[str, Any]:
    """Copy one ledger's history into another, empty one (``source`` default: the one in use)."""
    from edgeops.state import LedgerError, open_ledger

    default = settings.ledger_in(workspace_root([], settings))
    origin = open_ledger(source or settings.state_url, default, "--from" if source else "EDGEOPS_STATE")
    destination = open_ledger(target, default, "--to")
    if origin.location == destination.location:
        raise LedgerError(f"--to names the ledger in use ({origin.location})", hint="name another ledger")
    if not destination.is_empty():
        raise LedgerError(f"{destination.location} already holds rollouts: nothing was copied",
                          hint="migrate into an empty database, so that no history is mixed or doubled")
    return {**destination.import_rows(origin.export_rows()), "to": destination.location}


def _selector(text: str | None) -> LabelSelector | None:
    from edgeops.selectors import parse_selector

    try:
        return parse_selector(text) if text else None
    except ValueError as exc:
        raise InputError.at("--selector", None, "", f"{exc}") from None


def _signing_key_exists(settings: Settings) -> None:
    if settings.signing_key and not settings.signing_key.is_file():
        raise InputError.at("EDGEOPS_SIGNING_KEY", None, "", f"{settings.signing_key} is not a file (the private "
                            "release key that signs releases)")


def _selector_takes_some(ws: Workspace, docs: list[Document[Deployment]], picked: LabelSelector,
                         text: str) -> None:
    """-l that matches none of a deployment's devices is a mistake (--allow-empty: an empty plan is meant)."""
    from edgeops.targets import label_summary, target_devices

    for doc in docs:
        devices = target_devices(ws, doc.name)
        if devices and not any(picked.matches(d.device.labels) for d in devices):
            raise InputError.at("--selector", None, "", f"{text!r} matches none of the {len(devices)} device(s) "
                                f"of {doc.name} (their labels: {label_summary([d.device for d in devices])}); "
                                "pass --allow-empty if an empty plan is meant")


def _hooks(settings: Settings) -> list[Webhook]:
    from edgeops.webhooks import Webhook

    try:
        return [Webhook.parse(url) for url in settings.webhooks]
    except ValueError as exc:
        raise InputError.at("EDGEOPS_WEBHOOKS", None, "", f"{exc}; the variable holds URLs separated by white "
                                                          "space") from None


def _announce(kind: str, result: RolloutResult, repo: Repo, hooks: list[Webhook], notify: Progress) -> None:
    """Tell the webhooks how a rollout ended (a delivery that fails is kept as a dead letter and said)."""
    if result.outcome == "no-op" or not hooks:
        return
    from edgeops.rollout import summarize as counts
    from edgeops.types import Decision
    from edgeops.webhooks import deliver

    summary = counts(result)
    event = {"event": "rollout.finished", "kind": kind, "deployment": result.deployment, "outcome": result.outcome,
             "message": result.message, "rollout": result.number, "actor": repo.actor,
             "decisions": {str(d): summary[str(d).lower()] for d in Decision},
             "devices": [{"device": d.key, "decision": d.decision, "release": d.release_id, "reason": d.reason}
                         for d in result.devices]}
    dead_letter = repo.ws.root / ".edgeops" / "webhooks-dead-letter.jsonl"
    for url in deliver(hooks, event, dead_letter):
        notify(f"webhook {url} did not take the {kind} event after its retries; kept in {dead_letter}")


def _existing(names: tuple[str, ...] | list[str], settings: Settings) -> list[Path]:
    """The names that are files: relative ones inside the configured repository (``--root``), else here."""
    def where(name: str) -> Path:
        return settings.root / name if settings.root and not Path(name).is_absolute() else Path(name)

    return [where(n) for n in names if where(n).exists()]


def _context(deployment: str, settings: Settings) -> tuple[Repo, Document[Deployment]]:
    """The repository and one deployment (by name or manifest path)."""
    from edgeops.operations import Repo

    ws, doc = _scoped(deployment, "Deployment", settings)
    return Repo.open(ws, settings), doc


def _selected(manifests: tuple[str, ...], changed_since: str | None,
              settings: Settings) -> tuple[Repo, list[Document[Deployment]]]:
    """The deployments named or touched since ``changed_since``, sorted by name.

    Named (by path or name), a broken file they do not use is a warning; what changed since a revision is
    judged over the whole repository.
    """
    from edgeops.gitdiff import changed_files, touched_deployments
    from edgeops.operations import Repo

    if not changed_since:
        ws, named = _scoped_many(manifests, "Deployment", settings, deep=True, selection=True)
        return Repo.open(ws, settings), sorted(named, key=lambda d: d.name)
    ws = _load(_existing(manifests, settings), settings, deep=True, selection=True)
    docs = {ws.deployment(m).name: ws.deployment(m) for m in manifests}
    if changed_since:
        for touched in touched_deployments(ws, changed_files(ws.root, changed_since)):
            docs[touched.deployment] = ws.deployments[touched.deployment]
    return Repo.open(ws, settings), [docs[name] for name in sorted(docs)]


# ------------------------------------------------------------------ offline: validate, schema, build, render


@dataclass(frozen=True)
class Validation:
    documents: list[Any]          # Document of any kind, sorted by file
    warnings: list[Problem]


def validate(paths: tuple[Path, ...], settings: Settings) -> Validation:
    """The given files (or the whole repository) and the fleets and profiles they use, checked offline."""
    from edgeops.manifest.workspace import yaml_files

    for path in paths:
        if not path.exists():
            raise InputError.at(str(path), None, "", "file not found")
    files = yaml_files(list(paths))
    ws = _load(paths, settings, extra=files, focus=list(paths) or None, deep=True, selection=True)
    docs: list[Any] = [*ws.deployments.values(), *ws.fleets.values(), *ws.profiles.values()]
    if paths:  # what was checked: the files given and the fleets and profiles they use
        from edgeops.manifest.checks import closure

        checked = closure(ws, files)
        docs = [d for d in docs if d.display in checked]
    return Validation(sorted(docs, key=lambda d: d.display), ws.warnings)


def json_schema() -> dict[str, Any]:
    from edgeops.manifest.schema import json_schema as schema

    return schema()


def build_targets(manifest: Path, accelerators: tuple[str, ...],
                  settings: Settings) -> tuple[Document[Deployment], list[str], BuildCache]:
    """What `build` will build: the deployment, its accelerator classes (or those asked for), the cache."""
    from edgeops.compress.cache import Cache

    ws = _load([manifest], settings)
    doc = ws.deployment(str(manifest))
    return doc, list(accelerators) or sorted(ws.accelerators_of(doc)), Cache(settings.cache_in(ws.root))


def build(doc: Document[Deployment], accelerator: str, cache: BuildCache, force: bool = False,
          progress: Progress = _quiet) -> BuildResult:
    from edgeops.compress.pipeline import build as run_build
    from edgeops.compress.request import BuildRequest

    return run_build(BuildRequest.of(doc, accelerator), cache, force=force, progress=progress)


def build_finalists(doc: Document[Deployment], accelerator: str, cache: BuildCache, settings: Settings,
                    progress: Progress = _quiet) -> dict[str, Any] | None:
    """quantize.decide_on: device: the finalists built alone (what apply stages on the devices) and the decisions
    recorded for this build; None for a deployment whose build host decides."""
    from edgeops.decide import current_decisions, declares, finalists_of

    if not declares(doc, accelerator):
        return None  # a cache hit stays light: nothing below is imported
    from edgeops.state import open_ledger

    found, left_out = finalists_of(doc, accelerator, cache, progress=progress)
    ledger = open_ledger(settings.state_url, settings.ledger_in(workspace_root([doc.path], settings)))
    return {"finalists": [{"label": f.label, "step": f.step, "size_bytes": f.artifact.report["artifact"]["size_bytes"],
                           "host_p50_ms": f.host.get("host_p50_ms"), "key": f.artifact.key} for f in found],
            "left_out": left_out,
            "decisions": {c: d for c, d in current_decisions(ledger, doc, cache).items()
                          if d.get("accelerator") == accelerator}}


def render(manifest: Path, device: str | None, settings: Settings) -> list[tuple[TargetDevice, RenderedConfig]]:
    """The runtime config of each target device (or of ``device``); builds first (cache hits are free)."""
    from edgeops.compress.cache import Cache
    from edgeops.compress.pipeline import build as run_build
    from edgeops.compress.request import BuildRequest
    from edgeops.render import environment, render_device
    from edgeops.targets import target_devices

    ws = _load([manifest], settings)
    doc = ws.deployment(str(manifest))
    targets = [t for t in target_devices(ws, doc.name) if device in (None, t.name, t.key)]
    if not targets:
        raise InputError.at(str(manifest), None, "", f"no target device named {device!r}")
    cache = Cache(settings.cache_in(ws.root))
    artifacts = {acc: run_build(BuildRequest.of(doc, acc), cache).report["artifact"]
                 for acc in sorted({t.accelerator for t in targets})}
    templates = environment(ws.templates_dir)
    return [(t, render_device(ws, doc, t, artifacts[t.accelerator], templates)) for t in targets]


# ------------------------------------------------------------------ the lab


def _fleet(fleet: str, settings: Settings) -> tuple[Workspace, Document[Fleet]]:
    """The repository and one fleet (by name or file)."""
    return _scoped(fleet, "Fleet", settings)


def lab_up(fleet: str, settings: Settings, login_home: Path | None, port_base: int | None = None,
           report: Progress = _quiet) -> tuple[str, list[LabDevice]]:
    from edgeops.lab import lab_up as start
    from edgeops.labplace import arrange, one_lab_up_at_a_time
    from edgeops.targets import fleet_targets

    ws, doc = _fleet(fleet, settings)
    if doc.obj.spec.pull is not None:
        from edgeops.labpull import pull_lab_up
        return doc.name, pull_lab_up(ws, doc, fleet_targets(ws, doc), report=report)
    with one_lab_up_at_a_time():
        if arrange(ws, doc, port_base, report):
            ws, doc = _fleet(fleet, settings)  # the devices where the lab now puts them
        home = login_home.resolve() if login_home else None
        return doc.name, start(ws, doc, fleet_targets(ws, doc), home, report)


def _lab_fleets(fleet: str | None, settings: Settings) -> tuple[Workspace, list[Document[Fleet]]]:
    """The fleet named, or every fleet `lab up` has started devices for (a broken manifest elsewhere does not
    keep a lab from being stopped)."""
    from edgeops.lab import lab_dir

    if fleet is not None:
        ws, doc = _fleet(fleet, settings)
        return ws, [doc]
    ws = _load([], settings, tolerant=True)
    return ws, [f for name, f in sorted(ws.fleets.items()) if (lab_dir(ws) / name).is_dir()]


def lab_status(fleet: str | None, settings: Settings) -> list[tuple[str, list[LabDevice]]]:
    """Each lab device of the fleet (or of every lab fleet) and whether its sshd runs."""
    from edgeops.lab import lab_status as read
    from edgeops.labpull import pull_lab_status
    from edgeops.targets import fleet_targets

    ws, docs = _lab_fleets(fleet, settings)
    return [(doc.name, pull_lab_status(ws, doc, fleet_targets(ws, doc)) if doc.obj.spec.pull else read(ws, doc))
            for doc in docs]


def lab_link(device: str, up: bool, settings: Settings) -> tuple[str, LabDevice]:
    """Cut or heal a lab device's own link; ``device`` is DEVICE or FLEET/DEVICE."""
    from edgeops.lab import LabError, set_link

    fleet_name, _, name = device.rpartition("/")
    ws, docs = _lab_fleets(fleet_name or None, settings)
    found = [doc for doc in docs if any(d.name == name for d in doc.obj.spec.devices)]
    if len(found) != 1:
        raise LabError(f"{'no' if not found else 'more than one'} lab fleet has a device {name}",
                       hint="name it FLEET/DEVICE, as `edgeops lab status` shows it")
    return found[0].name, set_link(ws, found[0], name, up)


def lab_down(fleet: str | None, settings: Settings, wipe: bool) -> list[tuple[str, list[LabDevice]]]:
    """Stop the lab devices of the fleet (or of every lab fleet)."""
    from edgeops.lab import lab_down as stop
    from edgeops.labpull import pull_lab_down
    from edgeops.targets import fleet_targets

    ws, docs = _lab_fleets(fleet, settings)
    return [(doc.name, pull_lab_down(ws, doc, fleet_targets(ws, doc), wipe) if doc.obj.spec.pull
             else stop(ws, doc, wipe)) for doc in docs]


# ------------------------------------------------------------------ trust


@dataclass(frozen=True)
class Enrolled:
    device: str
    changed: bool = False
    rotated: bool = False
    error: str = ""


def enroll(fleet: str, settings: Settings, signed_by: Path | None = None,
           notify: Progress = _quiet) -> tuple[str, list[Enrolled]]:
    """Install the fleet's trust.allowed_signers on its devices. A device that already trusts a file takes a
    new one only signed (namespace edgeops-trust) by a key it trusts: ``signed_by``, else the release key."""
    from edgeops.connections import Connections
    from edgeops.rollout import device_for
    from edgeops.signing import TRUST_NAMESPACE, sign
    from edgeops.targets import fleet_targets

    ws, doc = _fleet(fleet, settings)
    trust = doc.obj.spec.trust
    if doc.obj.spec.pull is not None:
        raise InputError([doc.problem(("spec", "pull"), "this fleet's devices pull: nothing connects to them, so "
                                                        "they get trust/allowed_signers when they are provisioned "
                                                        "(see docs/pull.md); enroll does not reach them")])
    if trust is None:
        raise InputError([doc.problem(("spec",), "this fleet has no trust block: add trust.allowed_signers (and "
                                                 "trust.signing_key) to sign its releases")])
    signers_path = doc.resolve(trust.allowed_signers)
    if not signers_path.is_file():
        raise InputError([doc.problem(("spec", "trust", "allowed_signers"), f"{trust.allowed_signers} does not "
                                                                            f"exist (resolved to {signers_path})")])
    signers = signers_path.read_bytes()
    targets = fleet_targets(ws, doc)
    key = signed_by or settings.signing_key or targets[0].signing_key
    signature = sign(key, TRUST_NAMESPACE, signers) if key else None
    with Connections(parallelism=16, notify=notify, broker_password=settings.broker_password) as connections:
        found = connections.map(lambda t: device_for(t, connections, "").enroll(signers, signature, t.key), targets)
    return doc.name, [Enrolled(t.name, error=r.message) if isinstance(r, EdgeopsError) else
                      Enrolled(t.name, bool(r.get("changed")), bool(r.get("rotated"))) for t, r in
                      ((t, found[t.key]) for t in targets)]


# ------------------------------------------------------------------ plan, apply, the paused rollout


@dataclass(frozen=True)
class PlanEntry:
    plan: Plan
    reports: dict[str, dict[str, Any]]    # build report by accelerator
    warnings: list[str]
    compared: list[str]                   # each new artifact against the one the fleet runs
    changes: list[str]                    # field by field, since --changed-since (manifest, fleets, profiles)

    @property
    def checked_nothing(self) -> bool:
        """Every device the plan tried to read was unreachable (those a pull request's plan withholds until
        merge are not tried): a PR check must not pass on it."""
        from edgeops.endpoints import CONTACT_AFTER_MERGE
        from edgeops.types import Action

        tried = [d for d in self.plan.devices if CONTACT_AFTER_MERGE not in d.reason]
        return bool(tried) and all(d.action == Action.UNREACHABLE for d in tried)


def plan(manifests: tuple[str, ...], changed_since: str | None, settings: Settings,
         progress: Progress = _quiet, notify: Progress = _quiet, selector: str | None = None,
         untrusted_base: str | None = None, accept_quality_drop: bool = False) -> list[PlanEntry]:
    """What apply would do, per deployment named or touched, with every device's facts and preflight.

    ``untrusted_base``: a pull request's plan; devices are contacted only where the endpoints and credentials
    are as in that revision, and no field that runs code is allowed whatever the settings say.
    """
    from edgeops.connections import Connections
    from edgeops.gitdiff import manifest_changes
    from edgeops.operations import plan_deployment
    from edgeops.review import against_what_runs, plan_warnings

    picked = _selector(selector)
    if untrusted_base:
        settings = replace(settings, allow_code=False, signing_key=None)
    repo, docs = _selected(manifests, changed_since, settings)
    _signing_key_exists(settings)
    if picked and not settings.allow_empty:
        _selector_takes_some(repo.ws, docs, picked, selector or "")
    entries = []
    with Connections(parallelism=16, notify=notify, broker_password=settings.broker_password) as connections:
        for doc in docs:
            result, desired = plan_deployment(repo, doc, connections, progress=progress, selector=picked,
                                              untrusted_base=untrusted_base, accept_quality_drop=accept_quality_drop)
            compared, worse = against_what_runs(repo, doc, desired)
            changes = manifest_changes(repo.ws, doc, changed_since) if changed_since else []
            entries.append(PlanEntry(result, {acc: a.report for acc, a in desired.artifacts.items()},
                                     [str(w) for w in repo.ws.warnings if w.file == doc.display]
                                     + plan_warnings(doc, desired) + worse, compared, changes))
    return entries


def plan_rollback(deployment: str, to: str | None, settings: Settings, notify: Progress = _quiet,
                  selector: str | None = None) -> Plan:
    """What ``edgeops rollback`` would do, device by device, read from the devices and the ledger now."""
    from edgeops.connections import Connections
    from edgeops.operations import plan_rollback as planned

    repo, doc = _context(deployment, settings)
    with Connections(parallelism=16, notify=notify, broker_password=settings.broker_password) as connections:
        return planned(repo, doc, connections, to, selector=_selector(selector))


@dataclass(frozen=True)
class Applied:
    results: list[RolloutResult]
    not_applied: list[str]       # deployments after the first one that did not succeed
    selected: int                # deployments that were to be applied


def apply(manifests: tuple[str, ...], changed_since: str | None, plan_file: Path | None, settings: Settings,
          reporter: Reporter, progress: Progress = _quiet, lock_timeout_s: float = 0,
          on_result: Callable[[RolloutResult], None] = lambda result: None, notify: Progress = _quiet,
          selector: str | None = None, accept_quality_drop: bool = False, max_parallel: int | None = None) -> Applied:
    """Roll out each deployment in name order; the first that does not succeed stops the rest."""
    from edgeops.connections import Connections
    from edgeops.operations import apply_deployment, load_plan

    picked, hooks = _selector(selector), _hooks(settings)
    repo, docs = _selected(manifests, changed_since, settings)
    _signing_key_exists(settings)
    saved = load_plan(plan_file) if plan_file else None
    if saved and len(docs) != 1:
        raise InputError.at(str(plan_file), None, "", "--plan applies exactly one deployment")
    results: list[RolloutResult] = []
    for doc in docs:
        parallelism = min(doc.obj.spec.rollout.parallelism, max_parallel or doc.obj.spec.rollout.parallelism)
        with Connections(parallelism=parallelism, notify=notify,
                         broker_password=settings.broker_password) as connections:
            _, result = apply_deployment(repo, doc, connections, reporter, saved, progress=progress,
                                         lock_timeout_s=lock_timeout_s, selector=picked,
                                         accept_quality_drop=accept_quality_drop, max_parallel=max_parallel)
        results.append(result)
        _announce("apply", result, repo, hooks, notify)
        on_result(result)
        if not result.ok:
            return Applied(results, [d.name for d in docs[len(results):]], len(docs))
    return Applied(results, [], len(docs))


@dataclass(frozen=True)
class Settled:
    settled: RolloutResult | None     # promote or abort of the paused devices
    continued: RolloutResult | None   # the rollout that resume and promote go on with


def settle_paused(deployment: str, accept: bool | None, settings: Settings, reporter: Reporter,
                  progress: Progress = _quiet, lock_timeout_s: float = 0, notify: Progress = _quiet) -> Settled:
    """``accept`` None: resume; True: promote then continue; False: abort."""
    from edgeops.connections import Connections
    from edgeops.operations import apply_deployment, plan_settle
    from edgeops.operations import settle_paused as settle
    from edgeops.plan import RESUME
    from edgeops.types import Action

    repo, doc = _context(deployment, settings)
    hooks = _hooks(settings)
    with Connections(parallelism=doc.obj.spec.rollout.parallelism, notify=notify,
                         broker_password=settings.broker_password) as connections:
        settled = None
        if accept is None:
            paused = plan_settle(repo, doc, connections, accept=True)
            unread = [d.key for d in paused.devices if d.action in (Action.UNREACHABLE, Action.REFUSED)]
            if unread:
                raise EdgeopsError(f"cannot read every device ({', '.join(unread)}): one of them may be paused",
                                   hint="try again when they answer")
            if not paused.has_changes:
                raise EdgeopsError(f"nothing to resume: no device of {doc.name} is paused",
                                   hint="edgeops apply starts a new rollout")
        if accept is not None:
            settled = settle(repo, doc, connections, accept, lock_timeout_s, reporter)
            _announce("promote" if accept else "abort", settled, repo, hooks, notify)
            if not settled.ok or not accept:
                return Settled(settled, None)
        _, result = apply_deployment(repo, doc, connections, reporter, progress=progress,
                                     lock_timeout_s=lock_timeout_s, kind=RESUME)
    _announce(RESUME, result, repo, hooks, notify)
    return Settled(settled, result)


# ------------------------------------------------------------------ reading: diff, status, history


def diff(base: str, head: str | None, settings: Settings) -> list[Touched]:
    from edgeops.gitdiff import changed_files, touched_deployments

    ws = _load([], settings)
    return touched_deployments(ws, changed_files(ws.root, base, head))


@dataclass(frozen=True)
class StatusReport:
    rows: dict[str, list[StatusRow]]     # by deployment
    broken: dict[str, list[str]]         # deployment (or file) -> what keeps it from being shown


def status(manifests: tuple[str, ...], settings: Settings, verify: bool = False,
           progress: Progress = _quiet, notify: Progress = _quiet, selector: str | None = None) -> StatusReport:
    """Rows per deployment (every deployment when none is named), read from the devices now.

    Over the whole repository a broken manifest, fleet or profile is reported on its own and every other
    deployment still shows; named manifests must be valid (and only what they use must be).
    """
    return _status(manifests, settings, verify, progress, notify, selector)[0]


def _status(manifests: tuple[str, ...], settings: Settings, verify: bool, progress: Progress, notify: Progress,
            selector: str | None) -> tuple[StatusReport, Repo]:
    from edgeops.connections import Connections
    from edgeops.operations import Repo, status_rows

    picked = _selector(selector)
    paths = _existing(manifests, settings)
    ws = _load(paths, settings, focus=paths if manifests else None, tolerant=not manifests)
    repo = Repo.open(ws, settings)
    broken: dict[str, list[str]] = {}
    for problem in ws.problems:
        broken.setdefault(problem.file, []).append(str(problem))
    docs = [ws.deployment(m) for m in manifests] or [ws.deployments[n] for n in sorted(ws.deployments)
                                                     if ws.deployments[n].display not in broken]
    rows: dict[str, list[StatusRow]] = {}
    with Connections(parallelism=16, notify=notify, broker_password=settings.broker_password) as connections:
        for doc in docs:
            try:
                rows[doc.name] = status_rows(repo, doc, connections, progress=progress, verify=verify,
                                             selector=picked)
            except EdgeopsError as exc:
                if manifests:  # asked for by name: its error is the answer (exit code included)
                    raise
                broken[doc.name] = exc.lines()
    return StatusReport(rows, broken), repo


def snapshot(manifests: tuple[str, ...], settings: Settings, notify: Progress = _quiet,
             selector: str | None = None, refresh_s: float = 60) -> tuple[Snapshot, Repo]:
    """What status reads from the devices now, with the newest rollouts of each deployment from the ledger:
    the one source of the fleet page and of /metrics."""
    import time

    from edgeops.fleetpage import Snapshot

    report, repo = _status(manifests, settings, False, _quiet, notify, selector)
    rollouts = {name: repo.ledger.history(name, 20) for name in report.rows}
    return Snapshot(time.time(), report.rows, report.broken, rollouts, refresh_s), repo


def metrics_of(snap: Snapshot) -> bytes:
    """OpenMetrics text of a snapshot: device state and measurements, each device's last rollout decision."""
    from edgeops.exporter import openmetrics, registry_of

    last: dict[str, dict[str, str]] = {name: {} for name in snap.rows}
    for name in snap.rows:
        for rollout in snap.rollouts.get(name, []):  # newest first: the first decision seen is the last made
            for event in rollout["devices"]:
                last[name].setdefault(event["device"], event["decision"])
    newest = {name: found[0] for name, found in snap.rollouts.items() if found}
    return openmetrics(registry_of(snap.rows, last, snap.broken, newest, snap.taken_at))


def metrics(manifests: tuple[str, ...], settings: Settings, notify: Progress = _quiet,
            selector: str | None = None) -> bytes:
    """Fleet health as OpenMetrics text, read from the devices now."""
    return metrics_of(snapshot(manifests, settings, notify, selector)[0])


def serve(manifests: tuple[str, ...], settings: Settings, address: str, port: int, interval_s: float,
          log: Progress = _quiet, notify: Progress = _quiet, selector: str | None = None) -> None:
    """Serve the fleet page (/, /deployments/NAME, /deployments/NAME/rollouts/N) and /metrics on
    ``address:port`` from one snapshot, read from the devices every ``interval_s``; runs until interrupted.
    Read-only: GET only, nothing a request does changes a device or the ledger."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from edgeops.fleetpage import respond

    first, repo = snapshot(manifests, settings, notify, selector, interval_s)
    latest: dict[str, Any] = {"snapshot": first, "metrics": metrics_of(first)}

    def report_page(deployment: str, number: int) -> str:
        if not repo.ledger.history(deployment, 1, number):
            raise KeyError(number)
        return report_html(deployment, number, settings)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            try:
                answer = respond(self.path, latest["snapshot"], lambda: bytes(latest["metrics"]), report_page)
            except EdgeopsError as exc:
                self.send_error(500, exc.message[:200])
                return
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                                        "script-src 'unsafe-inline'; img-src data:")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(answer.body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            pass

    server = ThreadingHTTPServer((address, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log(f"serving http://{address}:{server.server_address[1]}/ (fleet page) and /metrics, read from the devices "
        f"every {interval_s:g} s")
    try:
        while True:
            time.sleep(interval_s)
            try:
                fresh, repo = snapshot(manifests, settings, notify, selector, interval_s)
                latest.update(snapshot=fresh, metrics=metrics_of(fresh))
            except EdgeopsError as exc:  # keep serving the last good snapshot; say why it is old
                log(f"refresh failed, serving the previous snapshot: {exc.message}")
    finally:
        server.shutdown()
        server.server_close()


def reconcile(manifests: tuple[str, ...], interval_s: float, iterations: int, verify_every: int,
              settings: Settings, log: Progress = _quiet) -> int:
    """The drift loop; returns how many applies failed."""
    from edgeops.operations import reconcile_loop

    ws = _load(_existing(manifests, settings), settings)
    names = [ws.deployment(m).name for m in manifests] or sorted(ws.deployments)
    return reconcile_loop(ws.root, settings, names, interval_s, iterations, log=log, verify_every=verify_every)


def history(deployment: str, limit: int, settings: Settings) -> tuple[str, list[dict[str, Any]]]:
    repo, doc = _context(deployment, settings)
    return doc.name, repo.ledger.history(doc.name, limit)


def report(deployment: str, number: int | None, settings: Settings) -> tuple[str, dict[str, Any],
                                                                            dict[str, dict[str, Any] | None]]:
    """(deployment, rollout, build report per accelerator) for rollout ``number`` (default: the newest that
    verified devices). Reads the ledger and the build cache only."""
    repo, doc = _context(deployment, settings)
    found = repo.ledger.history(doc.name, 1 if number else 50, number)
    rollout = next((r for r in found if number or any((e["measurements"] or {}).get("latency") for e in r["devices"])),
                   None)
    if rollout is None:
        if number:
            raise InputError.at("--rollout", None, "", f"no rollout #{number} of {doc.name} in the ledger "
                                "(`edgeops history` lists the rollouts)")
        raise EdgeopsError(f"no rollout of {doc.name} in the ledger measured a device yet",
                           hint="`edgeops history` lists the rollouts")
    keys = (rollout.get("summary") or {}).get("build_keys") or {}
    return doc.name, rollout, {acc: repo.cache.report_of(sha, keys.get(acc))
                               for acc, sha in rollout["artifacts"].items()}


def report_html(deployment: str, number: int | None, settings: Settings) -> str:
    """``report`` as a self-contained HTML page with its plots."""
    from edgeops.decide import DECIDE, declares, standing
    from edgeops.report import render_html

    repo, doc = _context(deployment, settings)
    rounds = repo.ledger.summaries(doc.name, "adapt") if doc.obj.spec.adapt is not None else []
    name, rollout, reports = report(deployment, number, settings)
    builds = (rollout.get("summary") or {}).get("build_keys") or {}
    decided = standing(repo.ledger.summaries(doc.name, DECIDE), builds) if builds and declares(doc) else {}
    return render_html(name, rollout, reports, rounds=rounds, decided=decided)


def rollback(deployment: str, to: str | None, devices: list[str] | None, settings: Settings, reporter: Reporter,
             allow_rejected: bool = False, lock_timeout_s: float = 0, notify: Progress = _quiet,
             selector: str | None = None) -> RolloutResult:
    from edgeops.connections import Connections
    from edgeops.operations import rollback_deployment

    repo, doc = _context(deployment, settings)
    picked, hooks = _selector(selector), _hooks(settings)
    with Connections(parallelism=doc.obj.spec.rollout.parallelism, notify=notify,
                         broker_password=settings.broker_password) as connections:
        result = rollback_deployment(repo, doc, connections, to, devices, reporter, allow_rejected,
                                     lock_timeout_s=lock_timeout_s, selector=picked)
    _announce("rollback", result, repo, hooks, notify)
    return result


def adapt(deployment: str, rounds: int | None, settings: Settings, reporter: Reporter,
          notify: Progress = _quiet) -> list[Any]:
    """Federated rounds of a deployment with an adapt: section (edgeops.adapt.rounds); each round's result."""
    from edgeops.adapt.rounds import adapt_deployment
    from edgeops.connections import Connections

    repo, doc = _context(deployment, settings)
    with Connections(parallelism=doc.obj.spec.rollout.parallelism, notify=notify,
                     broker_password=settings.broker_password) as connections:
        return adapt_deployment(repo, doc, connections, rounds, progress=notify, reporter=reporter)


def decide(deployment: str, settings: Settings, lock_timeout_s: float = 0, notify: Progress = _quiet) -> dict[str, Any]:
    """Measure an auto build's finalists on a device of each hardware class again (quantize.decide_on: device);
    per class what was measured and chosen."""
    from edgeops.connections import Connections
    from edgeops.operations import decide_deployment

    repo, doc = _context(deployment, settings)
    with Connections(parallelism=doc.obj.spec.rollout.parallelism, notify=notify,
                     broker_password=settings.broker_password) as connections:
        decided = decide_deployment(repo, doc, connections, notify, lock_timeout_s)
    return {c: d.as_dict() for c, d in decided.items()}


def summarize(result: RolloutResult) -> dict[str, Any]:
    """Counts per decision and bytes moved, as the ledger keeps them."""
    from edgeops.rollout import summarize as counts

    return counts(result)
