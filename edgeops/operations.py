"""The operations the service offers, composed from the library: plan, apply, status, rollback, promote, abort."""

from __future__ import annotations

import importlib.metadata
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgeops.adapt.artifact import Adaptation, put_tensors_file, store_tensors, tensors_file
from edgeops.compress.cache import Cache
from edgeops.connections import Connections
from edgeops.decide import ClassDecision, current_decisions, decide, declares, figures, pending
from edgeops.desired import Desired, desired_state
from edgeops.endpoints import Withheld, withhold
from edgeops.errors import EdgeopsError, InputError
from edgeops.facts import preflight, runtime_of
from edgeops.gitinfo import head_info
from edgeops.health import health_of, sync_of
from edgeops.manifest.checks import missing_identity_file, missing_trust_files
from edgeops.manifest.models import Deployment
from edgeops.manifest.workspace import Document, Workspace
from edgeops.plan import APPLY, FORWARD, ObservedDevice, Plan, make_plan
from edgeops.plan_operations import rollback_plan, settle_plan
from edgeops.pull.fleet import is_pull
from edgeops.pull.roller import RoutedWork
from edgeops.rollout import (
    ApplyContext,
    Reporter,
    RolloutResult,
    SilentReporter,
    desired_devices,
    execute,
    observe_targets,
)
from edgeops.running_quality import quality_drops
from edgeops.selectors import LabelSelector
from edgeops.settings import Settings
from edgeops.state import Ledger, open_ledger
from edgeops.state.ledger import Lease
from edgeops.targets import TargetDevice, target_devices
from edgeops.types import Health, Sync

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Repo:
    """One repository and where its state lives: what every operation shares."""

    ws: Workspace
    ledger: Ledger
    cache: Cache
    actor: str
    signing_key: Path | None = None   # overrides the fleets' trust.signing_key

    @classmethod
    def open(cls, ws: Workspace, settings: Settings) -> Repo:
        return cls(ws, open_ledger(settings.state_url, settings.ledger_in(ws.root)), Cache(settings.cache_in(ws.root)),
                   settings.actor, settings.signing_key)


def recipes(doc: Document[Deployment], desired: Desired) -> dict[str, list[dict[str, Any]]]:
    return {acc: [s.model_dump(mode="json", exclude_none=True) for s in doc.obj.spec.recipe_for_accelerator(acc)]
            for acc in desired.artifacts}


def require_key_files(targets: Iterable[TargetDevice], signing: bool = False,
                      signing_key: Path | None = None, will_sign: bool = False) -> None:
    """A fleet whose SSH key (or trust) file is missing is an input error, found before any device is dialled.

    ``signing`` (plan, apply): also the fleets' allowed signers; ``will_sign`` (apply): and the signing key
    (a pull request's plan runs without the secret), which ``signing_key`` overrides.
    """
    problems = []
    by_fleet = {t.fleet.path: t for t in targets}
    fleets = [t.fleet for t in by_fleet.values()]
    secrets = {t.fleet.path: t.secrets_dir for t in by_fleet.values()}
    if will_sign and signing_key is not None and not signing_key.is_file() and any(f.obj.spec.trust for f in fleets):
        raise EdgeopsError(f"EDGEOPS_SIGNING_KEY names {signing_key}, which does not exist",
                           hint="point it at the private release key")
    for fleet in fleets:
        if path := missing_identity_file(fleet, secrets[fleet.path]):
            problems.append(fleet.problem(("spec", "ssh", "identity_file"),
                                          f"identity file {fleet.obj.spec.ssh.identity_file} does not exist "
                                          f"(in the secrets directory: {path}): put the deploy key there, or run "
                                          "`edgeops lab up` for a lab fleet"))
        for loc, name, path in (missing_trust_files(fleet, secrets[fleet.path]) if signing else []):
            if loc[-1] == "signing_key" and (signing_key is not None or not will_sign):
                continue
            problems.append(fleet.problem(loc, f"{name} does not exist (resolved to {path}): releases to this "
                                               "fleet are signed; `edgeops lab up` creates the lab's"))
    if problems:
        raise InputError(problems)


def current_adaptation(repo: Repo, doc: Document[Deployment]) -> Adaptation | None:
    """The head a federated deployment's fleet learned and released last (the ledger's word), if any; its tensors
    in this controller's cache (from the ledger, when another controller learned it)."""
    if doc.obj.spec.adapt is None:
        return None
    released = [r["summary"] for r in repo.ledger.summaries(doc.name, "adapt") if r["outcome"] == "released"]
    if not released:
        return None
    found = Adaptation(released[-1]["tensors_sha256"], released[-1]["bases"], released[-1].get("personal") or {})
    for digest in {found.tensors_sha256, *found.personal.values()}:
        fetch_learned(repo, digest)
    return found


def keep_learned(repo: Repo, tensors: dict[str, Any]) -> str:
    """Tensors a federated round learned, in this controller's cache and in the ledger (which every controller
    sharing it reads): their digest."""
    digest = store_tensors(repo.cache, tensors)
    repo.ledger.keep_learned(digest, tensors_file(repo.cache, digest).read_bytes())
    return digest


def fetch_learned(repo: Repo, digest: str) -> None:
    """Learned tensors the ledger holds, into this controller's cache if it lacks them (nothing when the ledger
    lacks them too: loading them names what is missing)."""
    if tensors_file(repo.cache, digest).is_file():
        return
    if (data := repo.ledger.learned(digest)) is not None:
        put_tensors_file(repo.cache, digest, data)


def plan_deployment(repo: Repo, doc: Document[Deployment], connections: Connections,
                    progress: Progress = lambda m: None, selector: LabelSelector | None = None,
                    untrusted_base: str | None = None, accept_quality_drop: bool = False,
                    verify: bool = False, adaptation: Adaptation | None = None) -> tuple[Plan, Desired]:
    """Build and render (cache hits are free), read every device (those ``selector`` picks), and decide.

    ``untrusted_base``: the plan of a pull request; only devices whose endpoints and credentials are the
    ones this base revision has are contacted (the rest are shown, contacted only after merge). A release
    whose quality is lower than what the fleet runs is refused on every device it would change, unless
    ``accept_quality_drop``. ``adaptation``: a learned head to propose instead of the one the fleet released.
    """
    require_key_files(target_devices(repo.ws, doc.name), signing=True, signing_key=repo.signing_key)
    decisions = current_decisions(repo.ledger, doc, repo.cache)
    desired = desired_state(repo.ws, doc, repo.cache, progress, adaptation=adaptation or current_adaptation(repo, doc),
                            decisions=decisions).selected(selector)
    targets = list(desired.targets)
    withheld = withhold(repo.ws, untrusted_base, targets) if untrusted_base else Withheld({})
    progress(f"reading the state of {len(targets) - len(withheld.reasons)} device(s)")
    observed = observe_targets(doc.name, [t for t in targets if withheld.allows(t)], connections, verify)
    observed |= {key: ObservedDevice(key, False, error=reason) for key, reason in withheld.reasons.items()}
    previous = repo.ledger.last_successful_summary(doc.name)
    drops = {} if accept_quality_drop else {d.accelerator: d for d in quality_drops(repo.ledger, repo.cache, doc,
                                                                                     desired)}
    refuse = {t.key: drops[t.accelerator].message() for t in targets if t.accelerator in drops}
    plan = make_plan(doc.name, doc.obj.spec.rollout, {a: x.model_sha256 for a, x in desired.artifacts.items()},
                     recipes(doc, desired), previous.get("recipe") if previous else None,
                     desired_devices(desired), observed, importlib.metadata.version("onnxruntime"), desired.release_id,
                     refuse)
    return replace(plan, notes=plan.notes + decision_notes(repo, doc, decisions)), desired


def decision_notes(repo: Repo, doc: Document[Deployment], decisions: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """What the plan says about quantize.decide_on: device: per class, what was decided where, or that apply
    measures the finalists first."""
    notes = [f"{hardware_class}: runs the {d['label']} finalist, decided on {d['device']}: {d['why']} [{figures(d)}]"
             for hardware_class, d in sorted(decisions.items())]
    waiting = pending(repo.ws, doc, decisions)
    if waiting:
        notes.append(f"decide_on: device: no decision yet for {', '.join(waiting)}: apply first measures the "
                     "finalists on one of its devices; this plan shows the host's choice")
    return tuple(notes)


class StalePlan(EdgeopsError):
    """A saved plan no longer matches the repository or the devices."""


def plan_differences(saved: Plan, fresh: Plan) -> list[str]:
    """What a saved plan would do differently from the plan made now (devices, actions, releases, waves)."""
    def view(plan: Plan) -> dict[str, tuple[str, str, int | None]]:
        return {d.key: (d.action, d.release_id, d.wave) for d in plan.devices}

    before, now = view(saved), view(fresh)
    out = [f"{key}: not in the saved plan" for key in sorted(set(now) - set(before))]
    out += [f"{key}: not a target now" for key in sorted(set(before) - set(now))]
    for key in sorted(set(before) & set(now)):
        if before[key] != now[key]:
            (action, release, wave), (action_now, release_now, wave_now) = before[key], now[key]
            out.append(f"{key}: saved {action} {release} in wave {wave}, now {action_now} {release_now} in wave "
                       f"{wave_now}")
    if (saved.waves, saved.artifacts) != (fresh.waves, fresh.artifacts):
        out.append(f"saved {saved.waves} wave(s) of {saved.artifacts}, now {fresh.waves} of {fresh.artifacts}")
    return out


def apply_deployment(repo: Repo, doc: Document[Deployment], connections: Connections,
                     reporter: Reporter | None = None, saved: Plan | None = None,
                     progress: Progress = lambda m: None, lock_timeout_s: float = 0,
                     selector: LabelSelector | None = None, accept_quality_drop: bool = False,
                     max_parallel: int | None = None, adaptation: Adaptation | None = None,
                     kind: str = APPLY) -> tuple[Plan, RolloutResult]:
    """Plan (or check a saved plan), then execute it under the fleets' lock (``max_parallel``: at most this
    many devices at once, below the rollout policy's parallelism: a slow link shared by fewer uploads)."""
    fleets = [t.fleet for t in doc.obj.spec.targets]
    require_key_files(target_devices(repo.ws, doc.name), signing=True, signing_key=repo.signing_key,
                           will_sign=True)
    with repo.ledger.lock(fleets, holder=f"{repo.actor} applying {doc.name}", wait_s=lock_timeout_s) as lease:
        if saved is None and pending(repo.ws, doc, current_decisions(repo.ledger, doc, repo.cache)):
            decide(repo.ws, doc, repo.cache, repo.ledger, connections, repo.actor, lease, progress)
        # apply hashes what runs and the rollback targets (sizes and times cannot prove a same-size change)
        plan, desired = plan_deployment(repo, doc, connections, progress, selector,
                                        accept_quality_drop=accept_quality_drop, verify=True, adaptation=adaptation)
        if saved is not None:
            if saved.deployment != doc.name:
                raise InputError.at(doc.display, None, "", f"the saved plan is for deployment {saved.deployment}")
            if saved.desired_digest != plan.desired_digest:
                raise StalePlan("the saved plan is stale: the repository now asks for other releases",
                                hint="run edgeops plan again")
            if saved.observed_digest != plan.observed_digest:
                raise StalePlan("the saved plan is stale: devices changed since it was made "
                                "(another apply, a rollback or a device change)", hint="run edgeops plan again")
            if differences := plan_differences(saved, plan):
                raise StalePlan("the saved plan is not the plan edgeops makes now from git and the devices "
                                f"({'; '.join(differences[:3])}); it was edited or made by another version",
                                hint="run edgeops plan again and apply that")
        plan = replace(plan, kind=kind)  # resume: recorded as what it was
        git = head_info(repo.ws.root)
        ctx = ApplyContext(desired, connections, repo.ledger, repo.actor, git, reporter or SilentReporter(),
                           signing_key=repo.signing_key, lease=lease, max_parallel=max_parallel)
        slots = min(connections.parallelism, max_parallel or connections.parallelism)
        result = execute(plan, ctx, _work(ctx, desired.targets, slots))
    return plan, result


def decide_deployment(repo: Repo, doc: Document[Deployment], connections: Connections,
                      progress: Progress = lambda m: None, lock_timeout_s: float = 0) -> dict[str, ClassDecision]:
    """Measure the finalists of a ``decide_on: device`` build on its devices again, under the fleets' lock, and
    record what each hardware class runs from the next apply on."""
    if not declares(doc):
        raise InputError.at(doc.display, None, "spec.recipe", "no quantize step with mode: auto and decide_on: "
                                                              "device: the build host decides")
    fleets = [t.fleet for t in doc.obj.spec.targets]
    with repo.ledger.lock(fleets, holder=f"{repo.actor} deciding {doc.name}", wait_s=lock_timeout_s) as lease:
        return decide(repo.ws, doc, repo.cache, repo.ledger, connections, repo.actor, lease, progress)


# ------------------------------------------------------------------ status


@dataclass(frozen=True)
class StatusRow:
    fleet: str
    device: str
    profile: str
    release: str | None
    sync: Sync
    health: Health
    p95_ms: float | None
    slo_p95_ms: float | None
    power: str
    last_deploy: str | None
    message: str
    runtime: str = ""                       # interpreter, onnxruntime and architecture, read just now
    facts: dict[str, Any] | None = None
    p50_ms: float | None = None
    energy: dict[str, Any] | None = None    # numbers with their units, source and boundary (power: for people)
    fleet_release: str | None = None        # the fleet-wide release (rel-...) whose materialisation the device runs
    tokens_per_s: float | None = None       # text-generation: median decode speed at the last verification
    ttft_ms: float | None = None            # text-generation: median time to first token
    peak_rss_mb: float | None = None        # the measuring process's peak memory at the last verification
    verified_at: str | None = None          # when the last verification was measured (UTC, ISO 8601)
    verdict: str | None = None              # its outcome: Passed | Failed | Inconclusive
    transport: str = "ssh"                  # ssh | pull
    hardware_class: str = ""
    labels: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def drifted(self) -> bool:
        """Not what git asks for: another release, or the right one with damaged files."""
        return self.sync != Sync.SYNCED or self.health == Health.DAMAGED


def _energy(verification: dict[str, Any] | None) -> dict[str, Any] | None:
    power = (verification or {}).get("power") or {}
    if power.get("energy_per_inference_mj") is None:
        return None
    return {"energy_per_inference_mj": power["energy_per_inference_mj"],
            "average_power_mw": power.get("average_power_mw"), "source": power.get("source"),
            "boundary": power.get("boundary"), "where": "device, during the last verification"}


def _power(verification: dict[str, Any] | None) -> str:
    power = (verification or {}).get("power") or {}
    if power.get("energy_per_inference_mj") is not None:
        per = "token" if (verification or {}).get("generation") else "inf"  # a decoder's sample is one token
        return (f"{power['energy_per_inference_mj']:.3g} mJ/{per}, {power['average_power_mw']:.0f} mW "
                f"[{power['source']}, {power['boundary']}]")
    return power.get("error", "—") if power else "—"


def status_rows(repo: Repo, doc: Document[Deployment], connections: Connections,
                progress: Progress = lambda m: None, verify: bool = False,
                selector: LabelSelector | None = None) -> list[StatusRow]:
    """One row per target device, read from the device now (``verify``: hash every file, not just sizes).

    Never builds: when the artifact git asks for is not in the cache, or the deployment cannot be built or
    rendered now, sync is Unknown and the rows say why; the devices are still read.
    """
    targets = [t for t in target_devices(repo.ws, doc.name) if selector is None or selector.matches(t.device.labels)]
    require_key_files(targets)
    wanted: dict[str, str] = {}
    unknown = ""
    try:
        desired = desired_state(repo.ws, doc, repo.cache, progress, build_missing=False,
                                adaptation=current_adaptation(repo, doc),
                                decisions=current_decisions(repo.ledger, doc, repo.cache))
        wanted = {key: release.id for key, release in desired.releases.items()}
    except EdgeopsError as exc:
        unknown = "the release git asks for is unknown: " + "; ".join(exc.lines())
    progress(f"reading the state of {len(targets)} device(s)")
    observed = observe_targets(doc.name, targets, connections, verify)
    names = repo.ledger.release_names(doc.name)  # only names what the devices report; never stands in for them
    rows = []
    for target in targets:
        o = observed[target.key]
        want = wanted.get(target.key)
        sync = sync_of(o, want) if want else Sync.UNKNOWN
        checked = preflight(target.name, o.facts, target.needs(doc.obj.spec.slo), 0) if o.facts else None
        health, message = health_of(o, checked, doc.obj.spec.slo)
        if unknown:
            message = f"{unknown}; {message}".rstrip("; ")
        if sync == Sync.OUT_OF_SYNC and health != Health.UNREACHABLE:
            rejected = o.last_rejected or {}
            why = f" (rejected on this device: {rejected.get('reason') or 'failed verification'})" \
                if rejected.get("release") == want else ""
            message = (f"git asks for {want}{why}; " + message).rstrip("; ")
        if o.reachable and o.error:  # a pull device's own last report, while it is offline or has never reported
            message = f"{o.error}; {message}".rstrip("; ")
        verification = o.verification if o.current else None  # a removed release's numbers no longer apply
        latency = (verification or {}).get("latency") or {}
        generation = (verification or {}).get("generation") or {}
        rows.append(StatusRow(target.fleet.name, target.name, target.profile.name, o.current, sync, health,
                              latency.get("p95_ms"), doc.obj.spec.slo.latency_p95_ms, _power(verification),
                              o.last_change, message, runtime_of(o.facts.as_dict() if o.facts else None),
                              o.facts.as_dict() if o.facts else None, latency.get("p50_ms"), _energy(verification),
                              names.get((target.key, o.current)) if o.current else None,
                              generation.get("tokens_per_s"), generation.get("ttft_ms"),
                              (verification or {}).get("peak_rss_mb"),
                              (verification or {}).get("measured_at") or (o.last_change if verification else None),
                              (verification or {}).get("outcome"), "pull" if is_pull(target) else "ssh",
                              target.hardware_class, tuple(sorted(target.device.labels.items()))))
    return rows


# ------------------------------------------------------------------ rollback, promote, abort


def _last_apply(ledger: Ledger, deployment: str) -> dict[str, Any] | None:
    """The newest apply of the deployment in the ledger (what a plain rollback undoes)."""
    return next((r for r in ledger.history(deployment, 50) if r["kind"] in FORWARD), None)


def _release_landed_on(ledger: Ledger, deployment: str, plan: Plan) -> dict[str, Any] | None:
    """The fleet-wide release every device a rollback moves lands on, when there is exactly one."""
    names = ledger.release_names(deployment)
    found = {names.get((d.key, d.release_id)) for d in plan.changes}
    only = found.pop() if len(found) == 1 else None
    return ledger.release(deployment, only) if only else None


def _picked(repo: Repo, doc: Document[Deployment], devices: list[str] | None,
            selector: LabelSelector | None) -> list[TargetDevice]:
    targets = [t for t in target_devices(repo.ws, doc.name) if (not devices or t.name in devices or t.key in devices)
               and (selector is None or selector.matches(t.device.labels))]
    if not targets:
        asked = ", ".join([*(devices or []), *([f"selector {selector}"] if selector else [])])
        raise InputError.at(doc.display, None, "", f"no target device matches {asked}")
    return targets


def plan_rollback(repo: Repo, doc: Document[Deployment], connections: Connections, to: str | None = None,
                  devices: list[str] | None = None, selector: LabelSelector | None = None) -> Plan:
    """Read the devices (and the ledger) and plan the rollback: the last apply undone where it left a
    release, or every device to ``to`` (a release on the devices, or a fleet-wide rel-... from the ledger)."""
    targets = _picked(repo, doc, devices, selector)
    require_key_files(targets, signing=True, signing_key=repo.signing_key)
    return _plan_rollback(repo, doc, connections, targets, to)


def _plan_rollback(repo: Repo, doc: Document[Deployment], connections: Connections, targets: list[TargetDevice],
                   to: str | None, allow_rejected: bool = False) -> Plan:
    fleet_release = None
    if to and to.startswith("rel-"):
        fleet_release = repo.ledger.release(doc.name, to)
        if fleet_release is None:
            raise InputError.at(doc.display, None, "", f"no release '{to}' of {doc.name} in the ledger: "
                                "`edgeops history` lists the releases rolled out")
    last = None if to else _last_apply(repo.ledger, doc.name)
    observed = observe_targets(doc.name, targets, connections)
    plan = rollback_plan(doc.name, targets, observed, to, last, fleet_release, allow_rejected)
    landed = fleet_release or _release_landed_on(repo.ledger, doc.name, plan)
    if landed:
        plan = replace(plan, artifacts=dict(landed["artifacts"]), release=landed["id"])
    return plan


def _work(ctx: ApplyContext, targets: Iterable[TargetDevice], slots: int) -> RoutedWork | None:
    """The device work for ``targets``: None (the executor's SSH roller) unless some of them pull."""
    return RoutedWork(ctx, slots) if any(is_pull(t) for t in targets) else None


def _execute(repo: Repo, doc: Document[Deployment], connections: Connections, plan: Plan,
             targets: list[TargetDevice], lease: Lease, reporter: Reporter | None,
             allow_rejected: bool = False) -> RolloutResult:
    ctx = ApplyContext(None, connections, repo.ledger, repo.actor, head_info(repo.ws.root),
                       reporter or SilentReporter(), signing_key=repo.signing_key, lease=lease, doc=doc,
                       members={t.key: t for t in targets}, allow_rejected=allow_rejected)
    return execute(plan, ctx, _work(ctx, targets, connections.parallelism))


def rollback_deployment(repo: Repo, doc: Document[Deployment], connections: Connections,
                        to: str | None = None, devices: list[str] | None = None,
                        reporter: Reporter | None = None, allow_rejected: bool = False,
                        lock_timeout_s: float = 0, selector: LabelSelector | None = None) -> RolloutResult:
    """Under the fleets' lock: read the devices, plan the rollback, execute it (no transfer; each device is
    measured on the release it lands on)."""
    targets = _picked(repo, doc, devices, selector)
    require_key_files(targets, signing=True, signing_key=repo.signing_key, will_sign=True)
    fleets = sorted({t.fleet.name for t in targets})
    with repo.ledger.lock(fleets, holder=f"{repo.actor} rolling back {doc.name}", wait_s=lock_timeout_s) as lease:
        plan = _plan_rollback(repo, doc, connections, targets, to, allow_rejected)
        return _execute(repo, doc, connections, plan, targets, lease, reporter, allow_rejected)


def plan_settle(repo: Repo, doc: Document[Deployment], connections: Connections, accept: bool,
                targets: list[TargetDevice] | None = None) -> Plan:
    """Read the devices and plan a promote (``accept``) or abort of those a rollout left paused."""
    targets = targets if targets is not None else target_devices(repo.ws, doc.name)
    require_key_files([t for t in targets if not is_pull(t)])
    pulled = frozenset(t.key for t in targets if is_pull(t))  # they revert by themselves, never pause
    observed = observe_targets(doc.name, [t for t in targets if t.key not in pulled], connections)
    observed |= {key: ObservedDevice(key, True) for key in pulled}
    return settle_plan(doc.name, targets, observed, accept, pulled)


def settle_paused(repo: Repo, doc: Document[Deployment], connections: Connections, accept: bool,
                  lock_timeout_s: float = 0, reporter: Reporter | None = None) -> RolloutResult:
    """``accept``: commit what the paused devices run (promote); else reject it and revert them (abort)."""
    kind = "promote" if accept else "abort"
    targets = target_devices(repo.ws, doc.name)
    fleets = sorted({t.fleet.name for t in targets})
    with repo.ledger.lock(fleets, holder=f"{repo.actor} {kind} {doc.name}", wait_s=lock_timeout_s) as lease:
        plan = plan_settle(repo, doc, connections, accept, targets)
        return _execute(repo, doc, connections, plan, targets, lease, reporter)


def load_plan(path: Path) -> Plan:
    try:
        return Plan.from_json(path.read_text())
    except FileNotFoundError:
        raise InputError.at(str(path), None, "", "file not found") from None
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        raise InputError.at(str(path), None, "", f"not a saved edgeops plan ({exc})") from None



def _adapt_if_due(repo: Repo, doc: Document[Deployment], connections: Connections, log: Callable[[str], None]) -> int:
    """Federated rounds from the reconcile loop, when ``adapt.every`` says they are due (a fleet in sync only);
    1 when a round's release failed on the devices."""
    from edgeops.adapt.rounds import adapt_deployment

    adapt = doc.obj.spec.adapt
    if adapt is None or adapt.every_s is None:
        return 0
    done = repo.ledger.summaries(doc.name, "adapt")
    last = done[-1]["finished_at"] if done else None
    if last is not None and time.time() - _epoch(last) < adapt.every_s:
        return 0
    results = adapt_deployment(repo, doc, connections, progress=lambda m: log(f"{doc.name}: {m}"))
    return int(any(r.outcome == "rejected" for r in results))


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def reconcile_loop(root: Path, settings: Settings, deployments: list[str], interval_s: float, iterations: int,
                   log: Callable[[str], None], verify_every: int = 12) -> int:
    """Check for drift every ``interval_s``; apply the drifted deployments. Returns how many applies failed.

    Every ``verify_every``-th check hashes every release file on the devices (the others check sizes and
    times), so damage that kept a file's size and time is found too.
    """

    from edgeops.manifest.workspace import load_workspace

    failures, count = 0, 0
    while True:
        count += 1
        # re-read git's truth every time: a pull may have changed it
        repo = Repo.open(load_workspace(root, allow_code=settings.allow_code, secrets_dir=settings.secrets_dir),
                         settings)
        for name in deployments:
            doc = repo.ws.deployments[name]
            with Connections(parallelism=16, broker_password=settings.broker_password) as connections:
                full = verify_every > 0 and (count - 1) % verify_every == 0  # the first check, then every n-th
                rows = status_rows(repo, doc, connections, verify=full)
                drifted = [f"{r.fleet}/{r.device}" for r in rows if r.drifted and r.health != Health.UNREACHABLE]
                if not drifted:
                    log(f"{name}: in sync ({len(rows)} device(s))")
                    failures += _adapt_if_due(repo, doc, connections, log)
                    continue
                log(f"{name}: drift on {', '.join(drifted)}; applying")
                _, result = apply_deployment(repo, doc, connections)
                log(f"{name}: {result.outcome}: {result.message}")
                failures += 0 if result.ok else 1
        if iterations and count >= iterations:
            return failures
        time.sleep(interval_s)
