"""Planning: a pure function from desired and observed state to a frozen, serialisable Plan.

Waves: the first wave is a canary with at least the policy's first wave, every device labelled
``ring: canary`` and one device of every other hardware class (when ``canary_per_hardware_class``).
Every later wave brings the cumulative count to its target: a count, or a
percentage of the devices that change, rounded up, never fewer than one more
device, never more than are left. Devices with nothing to change, and
unreachable ones, are in no wave.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

from edgeops.facts import DeviceFacts, DeviceNeeds, preflight
from edgeops.manifest.models import (
    ClusterOptions,
    DistillOptions,
    PruneOptions,
    QuantizeOptions,
    RolloutPolicy,
    WaveSelector,
    parse_count,
)
from edgeops.types import Action, DeviceStatus

PLAN_SCHEMA = "edgeops.plan/v1"
CHANGING = (Action.INSTALL, Action.UPDATE, Action.REPAIR, Action.REVERIFY,  # the actions that touch a device
            Action.ROLLBACK, Action.PROMOTE, Action.ABORT)
APPLY = "apply"  # the kind of plan apply makes; rollback, promote and abort plans are made in plan_operations
RESUME = "resume"  # apply's plan when `edgeops resume` or `promote` continues a paused rollout
FORWARD = (APPLY, RESUME)  # kinds that move devices to the release git asks for


@dataclass(frozen=True)
class DesiredDevice:
    key: str                 # fleet/device
    fleet: str
    device: str
    profile: str
    hardware_class: str
    labels: tuple[tuple[str, str], ...]
    release_id: str
    files: tuple[tuple[str, str, int], ...]   # (name, sha256, size)
    needs: DeviceNeeds | None = None          # what the device must have to run the release
    slo: dict[str, Any] | None = None         # the SLO git asks for now (a change means re-verification)


@dataclass(frozen=True)
class ObservedDevice:
    key: str
    reachable: bool
    error: str = ""
    current: str | None = None
    previous: str | None = None
    status: str | None = None
    committed: str | None = None              # the release the device last committed (a rollback's landing)
    blobs: frozenset[str] | None = None       # None: unknown (agent not installed yet)
    verification: dict[str, Any] | None = None
    last_change: str | None = None            # time of the last switch or verdict on the device
    facts: DeviceFacts | None = None          # None: not read (unreachable)
    last_rejected: dict[str, Any] | None = None  # the release this device last rejected, and why
    damaged: tuple[str, ...] = ()             # what is wrong with the current release's files
    untrusted: bool = False                   # unreachable for a security reason (host key, refused key)
    rejected: frozenset[str] = frozenset()    # releases that failed verification on this device
    half_done: tuple[str, ...] = ()           # what a crash or a cut left half done (the next apply finishes it)
    damaged_other: tuple[str, ...] = ()       # damaged files of the committed or previous (rollback target) release
    state_error: str | None = None            # state.json is corrupt


@dataclass(frozen=True)
class PlannedDevice:
    key: str
    fleet: str
    device: str
    profile: str
    hardware_class: str
    action: Action
    release_id: str
    current: str | None
    bytes_to_move: int
    wave: int | None
    reason: str = ""
    facts: dict[str, Any] | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    deployment: str
    artifacts: dict[str, str]                 # accelerator -> artifact sha256
    recipe: dict[str, list[dict[str, Any]]]   # accelerator -> steps
    recipe_diff: list[str]
    devices: tuple[PlannedDevice, ...]
    waves: int
    observed_digest: str
    desired_digest: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    release: str = ""                         # the fleet-wide release (rel-...); devices list their materialisation
    kind: str = APPLY                         # apply, rollback, promote or abort: what the rollout is recorded as

    @property
    def changes(self) -> list[PlannedDevice]:
        return [d for d in self.devices if d.action in CHANGING]

    @property
    def has_changes(self) -> bool:
        return bool(self.changes)

    @property
    def refused(self) -> list[PlannedDevice]:
        """Devices the preflight found unable to run the release: nothing is pushed to them."""
        return [d for d in self.devices if d.action == Action.REFUSED]

    @property
    def is_noop(self) -> bool:
        """Nothing to change and every device reachable and able: apply touches no device."""
        return not self.has_changes and all(d.action not in (Action.UNREACHABLE, Action.REFUSED) for d in self.devices)

    def wave(self, number: int) -> list[PlannedDevice]:
        return [d for d in self.devices if d.wave == number]

    def to_json(self) -> str:
        return json.dumps({"schema": PLAN_SCHEMA, **asdict(self)}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        if data.pop("schema", None) != PLAN_SCHEMA:
            raise ValueError(f"not an {PLAN_SCHEMA} document")
        data["devices"] = tuple(PlannedDevice(**{**d, "action": Action(d["action"]),
                                                 "warnings": tuple(d.get("warnings", ()))}) for d in data["devices"])
        data["notes"] = tuple(data.get("notes", ()))
        return cls(**data)


def digest_observed(observed: dict[str, ObservedDevice], refused: Collection[str] = ()) -> str:
    """What a saved plan must still find on the devices to be applied."""
    view = {k: [o.reachable, o.current, o.status, k in refused] for k, o in sorted(observed.items())}
    return hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()


def digest_desired(desired: list[DesiredDevice]) -> str:
    view = {d.key: d.release_id for d in desired}
    return hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()


def _action(want: DesiredDevice, seen: ObservedDevice) -> tuple[Action, str]:
    if not seen.reachable:
        return (Action.REFUSED, f"not trusted: {seen.error}") if seen.untrusted else (Action.UNREACHABLE, seen.error)
    if seen.state_error:
        return Action.REPAIR, f"{seen.state_error}: it is rebuilt from the release directories and the ledger"
    if seen.current is None:
        return Action.INSTALL, "no release of this deployment on the device"
    if seen.current != want.release_id and want.release_id in seen.rejected:
        why = (seen.last_rejected or {}).get("reason") if (seen.last_rejected or {}).get("release") == \
            want.release_id else ""
        return Action.REFUSED, f"this device already rejected {want.release_id}" + (f" ({why})" if why else "") + \
            ": change what git asks for (a rejected release is not tried again), or run it by name with " \
            "`edgeops rollback --to RELEASE --allow-rejected`"
    if seen.current != want.release_id:
        reason = "device was rolled back" if seen.status == DeviceStatus.ROLLED_BACK else "device runs another release"
        return Action.UPDATE, reason
    if seen.damaged:
        return Action.REPAIR, f"the running release is damaged ({'; '.join(seen.damaged)}): its files are restored " \
                         "and it is verified again"
    if seen.damaged_other:
        return Action.REPAIR, f"the rollback target is damaged ({'; '.join(seen.damaged_other)}): its files are " \
                         "restored from the device's blobs"
    if seen.status not in (DeviceStatus.COMMITTED, DeviceStatus.INCONCLUSIVE):
        return Action.REVERIFY, f"release is there but its last verification did not finish (status {seen.status})"
    judged = (seen.verification or {}).get("slo")
    if want.slo is not None and judged is not None and judged != want.slo:
        latency = (seen.verification or {}).get("latency") or {}
        measured = f"; measured p95 {latency['p95_ms']:.3f} ms" if latency.get("p95_ms") is not None else ""
        return Action.REVERIFY, f"the SLO changed since this release was verified ({_slo_change(judged, want.slo)}" \
                           f"{measured}); no transfer"
    return Action.NO_CHANGE, ""


def _slo_change(before: dict[str, Any], after: dict[str, Any]) -> str:
    return ", ".join(f"{k} {before.get(k)} -> {after.get(k)}" for k in sorted(set(before) | set(after))
                     if before.get(k) != after.get(k))


def _bytes(want: DesiredDevice, seen: ObservedDevice) -> int:
    return sum(size for _, sha, size in want.files if seen.blobs is None or sha not in seen.blobs)


CANARY_LABEL = ("ring", "canary")   # devices labelled so form the first wave by default (docs/rollout.md)


class WaveMember(Protocol):
    @property
    def key(self) -> str: ...
    @property
    def hardware_class(self) -> str: ...
    @property
    def labels(self) -> tuple[tuple[str, str], ...]: ...


def assign_waves(changing: Sequence[WaveMember], policy: RolloutPolicy) -> dict[str, int]:
    """Wave number (1-based) per device key (see ``waves_of``)."""
    return waves_of(changing, policy)[0]


def waves_of(changing: Sequence[WaveMember], policy: RolloutPolicy) -> tuple[dict[str, int], list[int]]:
    """(wave number per device key, indexes of the policy's waves that took no device; a last wave of 100%
    is the rest, which may be nothing).

    Counts and percentages are cumulative over the devices to change; a ``{selector: ...}`` wave takes
    every device it matches that no earlier wave took. Whatever is left forms a last wave. Unless the
    first wave is a selector, it holds every device labelled ``ring: canary`` and one device of every
    hardware class without such a label.
    """
    total = len(changing)
    if not total:
        return {}, []
    labels = {d.key: dict(d.labels) for d in changing}

    def is_canary(key: str) -> bool:
        return labels[key].get(CANARY_LABEL[0]) == CANARY_LABEL[1]

    canary: list[str] = []
    if policy.canary_per_hardware_class and not isinstance(policy.waves[0], WaveSelector):
        canary = [d.key for d in changing if is_canary(d.key)]
        covered = {d.hardware_class for d in changing if d.key in canary}
        for device in changing:
            if device.hardware_class not in covered:
                covered.add(device.hardware_class)
                canary.append(device.key)
    pending = canary + [d.key for d in sorted(changing, key=lambda d: not is_canary(d.key)) if d.key not in canary]
    waves: dict[str, int] = {}
    empty: list[int] = []
    number = 0
    written = len(policy.waves) - (1 if policy.waves[-1] == "100%" else 0)
    for index, wave in enumerate([*policy.waves, "100%"]):
        if not pending:
            if index < written:
                empty.append(index)
            continue
        if isinstance(wave, WaveSelector):
            selector = wave.parsed
            members = [key for key in pending if selector.matches(labels[key])]
        else:
            kind, amount = parse_count(wave)
            target = min(total, int(amount) if kind == "count" else math.ceil(total * amount / 100))
            goal = min(total, max(target, len(waves) + 1, len(canary) if index == 0 else 0))
            members = pending[:max(0, goal - len(waves))]
        if not members:
            if index < written:
                empty.append(index)
            continue
        number += 1
        for key in members:
            waves[key] = number
        pending = [key for key in pending if key not in waves]
    return waves, empty


def recipe_diff(previous: dict[str, list[dict[str, Any]]] | None,
                current: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Step-by-step differences from the recipe of the last successful rollout, per accelerator."""
    if previous is None:
        return ["no earlier successful rollout in the ledger"]
    lines = []
    for accelerator in sorted(set(previous) | set(current)):
        before_steps, after_steps = previous.get(accelerator, []), current.get(accelerator, [])
        for index in range(max(len(before_steps), len(after_steps))):
            before = before_steps[index] if index < len(before_steps) else None
            after = after_steps[index] if index < len(after_steps) else None
            if before != after and (change := _step_change(before, after)):
                lines.append(f"{accelerator} step {index + 1}: {change}")
    return lines


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list) and value:
        base = prefix.rstrip(".")
        return {k: v for index, item in enumerate(value) for k, v in _flat(item, f"{base}[{index}].").items()}
    return {prefix.rstrip("."): value}


def field_changes(old: Any, new: Any, limit: int = 20) -> list[str]:
    """``spec.quality.max_drop: 1.0 → 0.5``, one line per field that differs (lists by index), at most ``limit``."""
    before, after = _flat(old), _flat(new)
    absent = object()
    lines = [f"{key}: {_shown(before.get(key, '(absent)'))} → {_shown(after.get(key, '(absent)'))}"
             for key in sorted(set(before) | set(after)) if before.get(key, absent) != after.get(key, absent)]
    return lines if len(lines) <= limit else [*lines[:limit], f"… and {len(lines) - limit} more"]


def _shown(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _step_change(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    """Field by field: ``quantize.mode static → dynamic``; a step added or removed is shown whole."""
    if before is None or after is None:
        step: dict[str, Any] = after if before is None else before  # type: ignore[assignment]
        kind = next(iter(step), "")
        defaults = _step_defaults(kind)
        chosen = {k: v for k, v in sorted(_flat(step).items()) if defaults.get(k, object()) != v}
        fields = ", ".join(f"{k} {_shown(v)}" for k, v in chosen.items()) or f"{kind}, all defaults"
        return f"{'added' if before is None else 'removed'}: {fields}"
    old, new = _flat(before), _flat(after)
    defaults, absent = _step_defaults(next(iter(after), "")), object()

    def differs(key: str) -> bool:
        a, b = old.get(key, absent), new.get(key, absent)
        if a is absent or b is absent:  # an option one side lacks (added by an upgrade) at its default: no change
            return bool((b if a is absent else a) != defaults.get(key, absent))
        return bool(a != b)

    changed = [f"{k} {_shown(old.get(k, '(default)'))} → {_shown(new.get(k, '(default)'))}"
               for k in sorted(set(old) | set(new)) if differs(k)]
    return ", ".join(changed)


def _step_defaults(kind: str) -> dict[str, Any]:
    """What a step of this kind holds when the manifest sets nothing (a shown step lists only what differs)."""
    kinds: dict[str, type[BaseModel]] = {"quantize": QuantizeOptions, "prune": PruneOptions,
                                         "cluster": ClusterOptions, "distill": DistillOptions}
    options = kinds.get(kind)
    if options is None:
        return {}
    values = {name: f.default.model_dump(mode="json") if isinstance(f.default, BaseModel) else f.default
              for name, f in options.model_fields.items() if not f.is_required() and f.default is not None}
    return _flat({kind: values})


def _checked(want: DesiredDevice, seen: ObservedDevice,
             build_onnxruntime: str | None) -> tuple[Action, str, int, tuple[str, ...]]:
    """(action, reason, bytes to move, warnings): the device's action after its preflight."""
    action, reason = _action(want, seen)
    moving = _bytes(want, seen) if action in (Action.INSTALL, Action.UPDATE, Action.REPAIR) else 0
    over = _over_new_slo(want, seen) if action in (Action.REVERIFY, Action.UPDATE) else ()
    if seen.facts is None or want.needs is None:
        return action, reason, moving, over
    release_bytes = sum(size for _, _, size in want.files) if action in (Action.INSTALL, Action.UPDATE) else 0
    checked = preflight(want.device, seen.facts, want.needs, moving, build_onnxruntime, release_bytes)
    if not checked.ok and action != Action.UNREACHABLE:
        return Action.REFUSED, "; ".join(checked.refusals), 0, checked.warnings
    return action, reason, moving, over + checked.warnings


def _over_new_slo(want: DesiredDevice, seen: ObservedDevice) -> tuple[str, ...]:
    """Warnings for a device whose recorded numbers already miss the SLO that git asks for now."""
    latency = ((seen.verification or {}).get("latency") or {}).get("p95_ms")
    limit = (want.slo or {}).get("latency_p95_ms")
    if latency is None or limit is None or latency <= limit:
        return ()
    if seen.current is not None and want.release_id != seen.current:  # an update: the new release may do better
        measured_under = ((seen.verification or {}).get("slo") or {}).get("latency_p95_ms")
        if measured_under is None or measured_under <= limit:
            return ()  # not a tightened SLO: the release that runs met what it was verified against
        return (f"{want.device}: the SLO is tightened to {limit:g} ms, below the p95 of {latency:.3f} ms the release "
                "it runs measured: the new release must be faster than that on this device",)
    return (f"{want.device}: measured p95 {latency:.3f} ms is over the new SLO of {limit:g} ms: expect it to fail "
            "its re-verification",)


def _facts(seen: ObservedDevice) -> dict[str, Any] | None:
    return seen.facts.as_dict() if seen.facts else None


def make_plan(deployment: str, policy: RolloutPolicy, artifacts: dict[str, str], recipe: dict[str, list[dict[str, Any]]],
              previous_recipe: dict[str, list[dict[str, Any]]] | None, desired: list[DesiredDevice],
              observed: dict[str, ObservedDevice], build_onnxruntime: str | None = None, release: str = "",
              refuse: dict[str, str] | None = None) -> Plan:
    """Compare what git asks for with what the devices run and can run; decide per device and assign waves.

    ``refuse``: device key -> why a change to it is refused before any device check (a release of lower
    quality than what runs); a device that would not change is not affected."""
    checked = {d.key: _checked(d, observed[d.key], build_onnxruntime) for d in desired}
    for key, why in (refuse or {}).items():
        if key in checked and checked[key][0] in (Action.INSTALL, Action.UPDATE):
            checked[key] = (Action.REFUSED, why, 0, checked[key][3])
    changing = [d for d in desired if checked[d.key][0] in CHANGING]
    waves = assign_waves(changing, policy)
    devices = tuple(
        PlannedDevice(d.key, d.fleet, d.device, d.profile, d.hardware_class, checked[d.key][0], d.release_id,
                      observed[d.key].current, checked[d.key][2], waves.get(d.key), checked[d.key][1],
                      _facts(observed[d.key]), checked[d.key][3])
        for d in desired)
    unreachable = sum(1 for d in devices if d.action == Action.UNREACHABLE)
    refused = {d.key for d in devices if d.action == Action.REFUSED}
    notes = []
    if unreachable:
        notes.append(f"{unreachable} device(s) unreachable now; they count against max_unreachable_devices")
    resloped = [d.device for d in devices if d.action == Action.REVERIFY and d.reason.startswith("the SLO changed")]
    if resloped:
        notes.append(f"the SLO changed: {len(resloped)} device(s) are measured again against it, no transfer "
                     f"({', '.join(resloped)})")
    if refused:
        notes.append(f"{len(refused)} device(s) refused by the preflight: nothing is pushed to them, and they "
                     "count against max_failed_devices")
    return Plan(deployment, dict(sorted(artifacts.items())), recipe, recipe_diff(previous_recipe, recipe), devices,
                max(waves.values(), default=0), digest_observed(observed, refused), digest_desired(desired),
                tuple(notes), release)
