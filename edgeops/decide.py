"""Deciding on the device: an ``auto`` build's finalists measured side by side on a device of each hardware class.

``quantize: {mode: auto, decide_on: device}`` makes the build keep its finalists (the best candidates that meet
the quality goal, each with the step that builds it alone, and the input). Before an apply rolls out, one
reachable device of each hardware class (a ``ring: canary`` one first) receives every finalist as a complete
release — pushed like any release, never switched to: what the device runs does not change — and the agent
measures them interleaved in one rotation. ``choose`` (pure) picks per class by the step's objective; the
decision and every measurement are a ledger record of kind ``decide``, and git's desired state for the class's
devices is that finalist's artifact while the host build it came from is what git builds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from edgeops.compress.cache import Artifact, Cache
from edgeops.compress.pipeline import build, cached
from edgeops.compress.request import BuildRequest
from edgeops.connections import Connections
from edgeops.device import Device
from edgeops.errors import DeviceError, EdgeopsError, TransportError
from edgeops.gitinfo import head_info
from edgeops.manifest.models import Deployment
from edgeops.manifest.workspace import Document, Workspace
from edgeops.plan import CANARY_LABEL
from edgeops.pull.fleet import is_pull
from edgeops.release import make_release
from edgeops.render import environment, render_device
from edgeops.state.ledger import Ledger
from edgeops.targets import TargetDevice, target_devices

if TYPE_CHECKING:
    from edgeops.state.ledger import Lease

DECIDE = "decide"
SAME_SPEED = 1.05          # finalists within this of the fastest p50 on the device: the smaller file wins
DEFAULT_MIN_SPEEDUP = 1.1  # as on the host: the input stays unless a candidate is this much faster


@dataclass(frozen=True)
class Finalist:
    label: str
    index: int                   # the auto step's place in the recipe (1-based)
    step: dict[str, Any] | None  # the quantize options that build it alone; None: the step left out (the input)
    artifact: Artifact
    host: dict[str, Any]         # what the build host measured: host_p50_ms, size_bytes, quality


def auto_stage(artifact: Artifact) -> dict[str, Any] | None:
    """The build report's stage of an auto step with ``decide_on: device`` (it lists finalists), if any."""
    return next((s for s in artifact.report.get("stages", []) if s.get("finalists")), None)


def finalists_of(doc: Document[Deployment], accelerator: str, cache: Cache,
                 progress: Callable[[str], None] = lambda m: None) -> tuple[list[Finalist], list[str]]:
    """(the finalists of what git builds for ``accelerator``, each built alone (cache hits are free); why any
    was left out)."""
    request = BuildRequest.of(doc, accelerator)
    stage = auto_stage(build(request, cache, progress=progress).artifact)
    if stage is None:
        return [], []
    found, left_out = [], []
    for entry in stage["finalists"]:
        variant = request.with_step(stage["index"], entry["step"], entry["label"])
        try:
            built = build(variant, cache, progress=progress)
        except EdgeopsError as exc:  # confirmed on the whole evaluation set, a screened candidate may miss
            left_out.append(f"{entry['label']}: {str(exc).splitlines()[0]}")
            continue
        host_figures = {k: entry.get(k) for k in ("host_p50_ms", "size_bytes", "quality")}
        found.append(Finalist(entry["label"], stage["index"], entry["step"], built.artifact, host_figures))
    return found, left_out


def declares(doc: Document[Deployment], accelerator: str | None = None) -> bool:
    """Whether the recipe (for ``accelerator``, or any) has an auto step with ``decide_on: device``."""
    spec = doc.obj.spec
    recipes = [spec.recipe_for_accelerator(accelerator)] if accelerator else [spec.recipe, *spec.recipe_for.values()]
    return any(step.quantize is not None and step.quantize.decide_on == "device" for recipe in recipes for step in recipe)


def choose(rows: list[dict[str, Any]], objective: str, min_speedup: float | None,
           standing: str | None = None) -> tuple[str, str]:
    """(the label to run, why) from one device's side-by-side figures: ``p50_ms``, ``energy_mj`` per inference
    (None without a sensor), ``size_bytes`` per finalist; the input is labelled ``original``.

    latency: the fastest p50 (finalists within ``SAME_SPEED`` of it count as equally fast: the smaller file);
    energy: the least energy per inference, latency standing in when the device has no sensor. ``standing``,
    the class's pick before this measurement, stays while it is among the equally fast (measuring again does
    not flip between equals). The input is kept unless the pick is ``min_speedup`` faster than it on the device
    (latency and energy alike)."""
    if not rows:
        raise ValueError("no finalist measured")
    use_energy = objective == "energy" and all(r.get("energy_mj") is not None for r in rows)
    figure = "energy_mj" if use_energy else "p50_ms"
    unit = "mJ per inference" if use_energy else "ms p50"
    best_value = min(float(r[figure]) for r in rows)
    close = [r for r in rows if float(r[figure]) <= best_value * SAME_SPEED]
    kept = next((r for r in close if r["label"] == standing), None)
    pick = kept or min(close, key=lambda r: (r.get("size_bytes") or math.inf, float(r[figure])))
    measured = f"{pick['label']} {float(pick[figure]):.4g} {unit}"
    tie = "the pick before this measurement" if kept is not None else "the smaller file"
    why = (f"least energy per inference on the device ({measured})" if use_energy else
           f"fastest on the device ({measured}; within {SAME_SPEED - 1:.0%} of the fastest, {tie})")
    if objective == "energy" and not use_energy:
        why += "; objective energy: the device has no power reading, its latency stands in"
    original = next((r for r in rows if r["label"] == "original"), None)
    if original is not None and pick is not original:
        needed = min_speedup or DEFAULT_MIN_SPEEDUP
        gain = float(original[figure]) / float(pick[figure])
        if gain < needed:
            return "original", (f"kept the input: the best finalist, {pick['label']}, is {gain:.2f}x the input on "
                                f"the device ({unit}), below min_speedup {needed:g}")
        why += f", {gain:.2f}x the input"
    return str(pick["label"]), why


def _auto_options(doc: Document[Deployment], accelerator: str, index: int) -> tuple[str, float | None]:
    step = doc.obj.spec.recipe_for_accelerator(accelerator)[index - 1].quantize
    assert step is not None
    return step.objective or "latency", step.min_speedup


def _order(targets: list[TargetDevice]) -> list[TargetDevice]:
    """A canary first, then the rest in the fleet's order."""
    return sorted(targets, key=lambda t: t.device.labels.get(CANARY_LABEL[0]) != CANARY_LABEL[1])


@dataclass
class ClassDecision:
    hardware_class: str
    accelerator: str
    label: str | None = None         # None: no device measured, the host's choice stands
    index: int = 0
    step: dict[str, Any] | None = None
    device: str | None = None        # target key it was measured on
    why: str = ""
    rows: list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"accelerator": self.accelerator, "label": self.label, "index": self.index, "step": self.step,
                "device": self.device, "why": self.why, "candidates": self.rows or []}


def _measure_on(device: Device, target: TargetDevice, ws: Workspace, doc: Document[Deployment],
                finalists: list[Finalist], progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Push every finalist as a release (not switched to), then measure them interleaved."""
    templates = environment(ws.templates_dir)
    releases = []
    for finalist in finalists:
        config = render_device(ws, doc, target, finalist.artifact.report["artifact"], templates)
        release = make_release(doc.name, finalist.artifact, config)
        progress(f"{target.key}: staging finalist {finalist.label} ({release.id})")
        device.push(release)
        releases.append(release)
    policy = doc.obj.spec.rollout
    progress(f"{target.key}: measuring {len(releases)} finalists side by side")
    result = device.bench_candidates([r.id for r in releases], policy.verification.runs, policy.verification.block,
                                      timeout=policy.timeouts.verify_s * len(releases))
    rows = []
    for side, finalist, release in zip("abcdefgh", finalists, releases):
        measured = result[side]
        power = measured.get("power") or {}
        rows.append({"label": finalist.label, "release": release.id,
                     "p50_ms": measured["latency"]["p50_ms"], "p95_ms": measured["latency"].get("p95_ms"),
                     "energy_mj": power.get("energy_per_inference_mj"),
                     "size_bytes": finalist.artifact.report["artifact"]["size_bytes"],
                     "host_p50_ms": finalist.host.get("host_p50_ms")})
    return rows


def decide(ws: Workspace, doc: Document[Deployment], cache: Cache, ledger: Ledger, connections: Connections,
           actor: str, lease: Lease | None = None, progress: Callable[[str], None] = lambda m: None,
           ) -> dict[str, ClassDecision]:
    """Measure the finalists on one device of every hardware class the deployment targets over SSH, choose per
    class, and record it (kind ``decide``). Classes without finalists are not listed."""
    targets = target_devices(ws, doc.name)
    before = current_decisions(ledger, doc, cache)
    bases: dict[str, str] = {}
    decisions: dict[str, ClassDecision] = {}
    by_accelerator: dict[str, tuple[list[Finalist], list[str]]] = {}
    for hardware_class in sorted({t.hardware_class for t in targets}):
        members = [t for t in targets if t.hardware_class == hardware_class]
        accelerator = members[0].accelerator
        if accelerator not in by_accelerator:
            by_accelerator[accelerator] = finalists_of(doc, accelerator, cache, progress=progress)
            host = cached(BuildRequest.of(doc, accelerator), cache)
            if host is not None:
                bases[accelerator] = host.artifact.key
        finalists, left_out = by_accelerator[accelerator]
        if len(finalists) < 2:  # nothing to choose between: the host's build stands
            continue
        decision = ClassDecision(hardware_class, accelerator, index=finalists[0].index)
        decisions[hardware_class] = decision
        reachable = [t for t in members if not is_pull(t)]
        if not reachable:
            decision.why = "its devices pull: the host's choice stands (decide_on: device needs SSH devices)"
            continue
        failures = []
        for target in _order(reachable):
            try:
                device = Device(connections.get(target), target.root, target.python, doc.name)
                device.fence = lease.token(target.fleet.name) if lease is not None else None
                with device.session():
                    rows = _measure_on(device, target, ws, doc, finalists, progress)
            except (DeviceError, TransportError, OSError) as exc:  # unreachable, refused: the next device
                failures.append(f"{target.key}: {str(exc).splitlines()[0]}")
                continue
            objective, min_speedup = _auto_options(doc, accelerator, decision.index)
            label, why = choose(rows, objective, min_speedup, (before.get(hardware_class) or {}).get("label"))
            chosen = next(f for f in finalists if f.label == label)
            decision.label, decision.step, decision.device, decision.rows = label, chosen.step, target.key, rows
            decision.why = why + (f" (not built: {'; '.join(left_out)})" if left_out else "")
            break
        else:
            decision.why = f"no device of the class could be measured ({'; '.join(failures)}): the host's choice stands"
    if decisions:
        rollout = ledger.start_rollout(doc.name, DECIDE, actor, head_info(ws.root), bases)
        for d in decisions.values():
            if d.device is not None:
                release = next(r["release"] for r in d.rows or [] if r["label"] == d.label)
                ledger.device_event(rollout, doc.name, d.device, DECIDE, "Passed", release_id=release, reason=d.why,
                                    measurements={"candidates": d.rows, "chosen": d.label})
        measured = sum(d.label is not None for d in decisions.values())
        ledger.finish_rollout(rollout, "decided" if measured else "undecided",
                              {"bases": bases, "classes": {c: d.as_dict() for c, d in decisions.items()},
                               "message": f"decided on the device for {measured} of {len(decisions)} hardware "
                                          "class(es)"})
    return decisions


def standing(records: list[dict[str, Any]], bases: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per hardware class, the newest decision among ``records`` (oldest first, ledger summaries of kind
    ``decide``) made for the host builds ``bases``: a later run that could not measure a class (its device
    was away) does not take back what an earlier one decided."""
    found: dict[str, dict[str, Any]] = {}
    for record in reversed(records):
        summary = record["summary"]
        if summary.get("bases") != bases:
            continue
        for hardware_class, decision in (summary.get("classes") or {}).items():
            if hardware_class not in found and decision.get("label") is not None:
                found[hardware_class] = decision
    return found


def current_decisions(ledger: Ledger, doc: Document[Deployment], cache: Cache) -> dict[str, dict[str, Any]]:
    """Per hardware class, the finalist decided last for the host builds git asks for now (none when git
    changed the model, the data or the recipe since: they are measured again)."""
    if not declares(doc):
        return {}
    records = ledger.summaries(doc.name, DECIDE)
    if not records:
        return {}
    bases = {}
    for accelerator in sorted(records[-1]["summary"].get("bases") or {}):
        host = cached(BuildRequest.of(doc, accelerator), cache)
        if host is None:
            return {}
        bases[accelerator] = host.artifact.key
    return standing(records, bases)


def pending(ws: Workspace, doc: Document[Deployment], decided: dict[str, dict[str, Any]]) -> list[str]:
    """The hardware classes reached over SSH whose recipe decides on the device and that ``decided`` (what
    ``current_decisions`` read) has no decision for: apply measures them first, plan shows the host's choice."""
    return sorted({t.hardware_class for t in target_devices(ws, doc.name)
                   if not is_pull(t) and declares(doc, t.accelerator)} - set(decided))


def figures(decision: dict[str, Any]) -> str:
    """Every finalist's device p50 in a recorded decision, for one line of text."""
    return ", ".join(f"{r['label']} {r['p50_ms']:.3f} ms" for r in decision.get("candidates") or [])
