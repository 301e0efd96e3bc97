"""Plans for the operations that take devices back or settle them: rollback, promote, abort.

Pure functions, like ``make_plan``: what the devices run (observed) and what the operator asked for in,
a Plan out. The executor runs these plans exactly as it runs apply's: waves, budgets, the lock, Ctrl-C,
the ledger. None of them moves a byte: every release they land on is already on the device.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from edgeops.manifest.models import RolloutPolicy
from edgeops.plan import ObservedDevice, Plan, PlannedDevice, digest_observed
from edgeops.targets import TargetDevice
from edgeops.types import KEPT, Action, DeviceStatus

ROLLBACK, PROMOTE, ABORT = "rollback", "promote", "abort"
UNINSTALL = "none"  # a rollback's landing when the device ran no release of the deployment before


def rollback_landing(seen: ObservedDevice, key: str, to: str | None, last: dict[str, Any] | None,
                     fleet_release: dict[str, Any] | None = None) -> tuple[str | None, str]:
    """(release to go back to — ``none`` for no release — or None for nothing to do, why).

    ``to`` names a release on the device, ``fleet_release`` a fleet-wide one (rel-...) from the ledger;
    without either the last apply (``last``, from the ledger) is undone where it left a release.
    """
    if fleet_release is not None:
        mine = fleet_release["members"].get(key)
        if mine is None:
            return None, f"not a device of {fleet_release['id']}"
        if seen.current == mine:
            return None, f"already runs {fleet_release['id']} ({mine})"
        return mine, f"named by --to {fleet_release['id']} ({mine} on this device)"
    if to:
        return (None, f"already runs {to}") if seen.current == to else (to, "named by --to")
    if seen.current and seen.current != seen.committed:
        return seen.committed or UNINSTALL, f"{seen.current} was never committed: back to the committed release"
    if last is not None:
        event = next((e for e in last["devices"] if e["device"] == key), None)
        if event is None or event["decision"] not in KEPT:
            why = "already reverted" if event and event["release_id"] != seen.current else "not changed"
            return None, f"{why} by the last rollout (#{last['number']}, {last['outcome']}): nothing to undo"
        if event["release_id"] != seen.current:
            return None, f"runs {seen.current or 'no release'}, not {event['release_id']} from rollout " \
                         f"#{last['number']}: nothing to undo"
    if not seen.previous:
        return None, "no earlier committed release on the device: nothing to roll back to"
    return seen.previous, f"undoes {seen.current}"


def _planned(target: TargetDevice, seen: ObservedDevice, action: Action, release: str, reason: str) -> PlannedDevice:
    return PlannedDevice(target.key, target.fleet.name, target.name, target.profile.name, target.hardware_class,
                         action, release, seen.current, 0, 1 if action in (Action.ROLLBACK, Action.PROMOTE,
                                                                           Action.ABORT) else None, reason,
                         seen.facts.as_dict() if seen.facts else None)


def _not_read(target: TargetDevice, seen: ObservedDevice) -> PlannedDevice | None:
    if seen.reachable:
        return None
    if seen.untrusted:
        return _planned(target, seen, Action.REFUSED, "", f"not trusted: {seen.error}")
    return _planned(target, seen, Action.UNREACHABLE, "", seen.error)


def _plan(deployment: str, kind: str, devices: list[PlannedDevice], observed: dict[str, ObservedDevice],
          notes: tuple[str, ...]) -> Plan:
    landings = {d.key: d.release_id for d in devices if d.wave}
    digest = hashlib.sha256(json.dumps({"kind": kind, **landings}, sort_keys=True).encode()).hexdigest()
    return Plan(deployment, {}, {}, [], tuple(devices), 1 if landings else 0, digest_observed(observed), digest,
                notes, "", kind)


def rollback_plan(deployment: str, targets: list[TargetDevice], observed: dict[str, ObservedDevice],
                  to: str | None = None, last: dict[str, Any] | None = None,
                  fleet_release: dict[str, Any] | None = None, allow_rejected: bool = False) -> Plan:
    """Per device: back to the release ``rollback_landing`` picks, or no change (with why).

    A landing this device rejected is refused unless ``allow_rejected`` (then it runs as a trial and is
    measured again). All moving devices form one wave: a rollback returns to what ran before, and
    staging it would keep the fleet longer on what is being taken back.
    """
    devices = []
    for target in targets:
        seen = observed[target.key]
        if (not_read := _not_read(target, seen)) is not None:
            devices.append(not_read)
            continue
        landing, why = rollback_landing(seen, target.key, to, last, fleet_release)
        if landing is None:
            devices.append(_planned(target, seen, Action.NO_CHANGE, seen.current or "", why))
        elif landing in seen.rejected and not allow_rejected:
            devices.append(_planned(target, seen, Action.REFUSED, landing,
                                    f"{landing} was rejected on this device: `--allow-rejected` runs it as a trial "
                                    "and measures it again"))
        else:
            devices.append(_planned(target, seen, Action.ROLLBACK, landing, why))
    notes = ("a rollback moves no bytes: each device goes back to a release it holds and is measured on it "
             "against the SLO",)
    return _plan(deployment, ROLLBACK, devices, observed, notes)


def settle_plan(deployment: str, targets: list[TargetDevice], observed: dict[str, ObservedDevice],
                accept: bool, pulled: frozenset[str] = frozenset()) -> Plan:
    """Promote (``accept``) or abort every device a rollout left paused; the others are not changed.

    ``pulled``: keys of pull devices, which revert by themselves and never pause.
    """
    action, kind = (Action.PROMOTE, PROMOTE) if accept else (Action.ABORT, ABORT)
    devices = []
    for target in targets:
        seen = observed[target.key]
        if target.key in pulled:
            devices.append(_planned(target, seen, Action.NO_CHANGE, seen.current or "",
                                    "a pull device reverts by itself and never pauses"))
        elif (not_read := _not_read(target, seen)) is not None:
            devices.append(not_read)
        elif seen.status == DeviceStatus.PAUSED and seen.current:
            why = "accepted as it was measured" if accept else "rejected: back to the committed release"
            devices.append(_planned(target, seen, action, seen.current, f"paused on {seen.current}: {why}"))
        else:
            devices.append(_planned(target, seen, Action.NO_CHANGE, seen.current or "", "not paused"))
    return _plan(deployment, kind, devices, observed, ())


def policy_for(plan: Plan, policy: RolloutPolicy) -> RolloutPolicy:
    """The rollout policy a plan runs under. A rollback, promote or abort goes to every device it can and
    reports each one: its budgets never stop it half way (that would leave the fleet mixed), and one
    device failing makes the whole operation Halted."""
    if plan.kind not in (ROLLBACK, PROMOTE, ABORT):
        return policy
    return policy.model_copy(update={"max_failed_devices": "100%", "max_unreachable_devices": "100%",
                                     "bake_time_s": 0, "on_failure": "pause"})
