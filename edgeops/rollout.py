"""Executing a Plan: waves, per-device push -> switch -> verify -> commit | rollback, budgets, halting.

The plan decides what to do; this module only does it and records what happened.
Every stage runs under its timeout (a timeout is a failure, never a hang).
Ctrl-C sets a stop flag: devices in flight finish the step they are in (never
mid-switch), nothing new starts.
"""

from __future__ import annotations

import importlib.metadata
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeops.connections import Connections
from edgeops.desired import Desired
from edgeops.device import AgentFailed, Device, DeviceState
from edgeops.errors import (
    AuthRefused,
    ConnectTimeout,
    EdgeopsError,
    HostKeyChanged,
    HostKeyUnknown,
    HostUnreachable,
    IdentityFileMissing,
)
from edgeops.manifest.models import Deployment, RolloutPolicy, parse_count
from edgeops.manifest.workspace import Document
from edgeops.plan import FORWARD, DesiredDevice, ObservedDevice, Plan, PlannedDevice
from edgeops.plan_operations import ABORT, PROMOTE, ROLLBACK, UNINSTALL, policy_for
from edgeops.pull.fleet import PullLinks, is_pull, read_reports
from edgeops.release import Release
from edgeops.signing import SignedMetadata, SignedOrder, SigningError, sign_order, sign_release
from edgeops.state import Ledger
from edgeops.state.ledger import Lease, LockLost, now
from edgeops.targets import TargetDevice
from edgeops.types import KEPT, Action, Decision, DeviceStatus, Outcome, ReleaseState
from edgeops.verify import (
    FAILED,
    INCONCLUSIVE,
    PASSED,
    GateSpec,
    Verdict,
    host_golden_value,
    measure,
    out_of_memory,
)

UNREACHABLE_ERRORS = (HostUnreachable, ConnectTimeout)
# where a rollback, promote or abort leaves a device that it counts as done
SETTLED = (Decision.UNCHANGED, Decision.ROLLED_BACK, Decision.PASSED, Decision.INCONCLUSIVE)
SECURITY_ERRORS = (HostKeyChanged, HostKeyUnknown, AuthRefused, IdentityFileMissing)  # failures, never "unreachable"


class Reporter(Protocol):
    def stage(self, key: str, stage: str, detail: str = "") -> None: ...
    def transfer(self, key: str, done: int, total: int) -> None: ...
    def message(self, text: str) -> None: ...


class SilentReporter:
    def stage(self, key: str, stage: str, detail: str = "") -> None:
        pass

    def transfer(self, key: str, done: int, total: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass


@dataclass
class DeviceOutcome:
    key: str
    action: str
    decision: Decision
    reason: str = ""
    release_id: str | None = None
    from_release: str | None = None
    bytes_moved: int = 0
    wave: int | None = None
    committed: bool = False  # left on the new release
    measurements: dict[str, Any] = field(default_factory=dict)
    switched: bool = False   # this rollout changed what the device runs (a halt undoes exactly these)
    switched_from: str | None = None  # the committed release the device ran before this rollout switched it


@dataclass
class RolloutResult:
    deployment: str
    outcome: Outcome
    message: str
    devices: list[DeviceOutcome]
    rollout_id: int | None = None  # the ledger's own key
    number: int | None = None      # the rollout's number within its deployment (what people are shown)
    lock_lost: str | None = None   # why the fleets' lock was gone mid-rollout (the command exits 5)

    def count(self, decision: str) -> int:
        return sum(1 for d in self.devices if d.decision == decision)

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.NO_OP, Outcome.SUCCEEDED)


# ------------------------------------------------------------------ observing


def device_for(target: TargetDevice, connections: Connections, deployment: str) -> Device:
    return Device(connections.get(target), target.root, target.python, deployment)


def _observed(key: str, state: DeviceState) -> ObservedDevice:
    history = state.state.get("history") or []
    return ObservedDevice(key, True, current=state.current, previous=state.previous, status=state.status,
                          committed=state.committed,
                          blobs=state.blobs, verification=state.state.get("verification"),
                          last_change=history[-1]["at"] if history else None, facts=state.facts,
                          last_rejected=state.state.get("last_rejected"),
                          damaged=tuple(state.damaged.get(state.current, ())) if state.current else (),
                          rejected=frozenset(r for r, e in (state.state.get("releases") or {}).items()
                                             if e.get("state") == ReleaseState.REJECTED), half_done=state.half_done,
                          damaged_other=tuple(f"{release}: {'; '.join(problems)}" for release, problems
                                              in sorted(state.damaged.items()) if release != state.current),
                          state_error=state.state_error)


def observe_targets(deployment: str, targets: list[TargetDevice], connections: Connections,
                    verify: bool = False) -> dict[str, ObservedDevice]:
    """Read every device's state and facts in parallel; unreachable devices are marked, not raised.

    ``verify`` hashes every file of the running and committed releases instead of checking sizes and times.
    A device refused for a security reason (host key, key refused) is marked untrusted, not unreachable.
    """
    observed: dict[str, ObservedDevice] = {}
    pulled = [t for t in targets if is_pull(t)]
    if pulled:
        observed.update(observe_pull(deployment, pulled, connections.pull))
    targets = [t for t in targets if not is_pull(t)]
    by_key = {t.key: t for t in targets}
    results = connections.map(lambda t: device_for(t, connections, deployment).observe(t.power_sensor, verify),
                              targets)
    for key, result in results.items():
        if isinstance(result, EdgeopsError):
            connections.drop(by_key[key])
            observed[key] = ObservedDevice(key, False, error=result.message,
                                           untrusted=isinstance(result, SECURITY_ERRORS))
        else:
            observed[key] = _observed(key, result)
    return observed


def observe_pull(deployment: str, targets: list[TargetDevice], links: PullLinks) -> dict[str, ObservedDevice]:
    """Pull-mode devices as they last reported (retained status); an offline one keeps what it last said it runs.

    Its own report is the only source: a device that never reported has no release as far as anyone
    knows, and is planned as an install (its desired state waits on the broker until it connects).
    """
    try:
        reports = read_reports(links, deployment, targets)
    except EdgeopsError as exc:
        return {t.key: ObservedDevice(t.key, False, error=exc.message) for t in targets}
    observed = {}
    for target in targets:
        report = reports[target.key]
        state = (report.status or {}).get("state") or {}
        where = "online" if report.online else "never connected" if report.online is None else "offline"
        age = f", last report {report.age_s:.0f} s ago" if report.age_s is not None else ""
        note = "" if report.online else f"pull device {where}{age}"
        if "current" not in state:
            observed[target.key] = ObservedDevice(target.key, True, error=note or "has not reported this deployment",
                                                  blobs=None)
        else:
            observed[target.key] = replace(_observed(target.key, DeviceState.from_agent(state)), error=note)
    return observed


def desired_devices(desired: Desired) -> list[DesiredDevice]:
    out = []
    slo = desired.deployment.obj.spec.slo
    genai = _installed_version("onnxruntime-genai")
    for target in desired.targets:
        release = desired.releases[target.key]
        runtime = next(f.content for f in release.files if f.name == "runtime.json")
        generation = json.loads(runtime or b"{}").get("generation")
        needs = target.needs(slo, generation, release.model_bytes if generation else 0, genai)
        out.append(DesiredDevice(target.key, target.fleet.name, target.name, target.profile.name,
                                 target.hardware_class, tuple(sorted(target.device.labels.items())), release.id,
                                 tuple((f.name, f.sha256, f.size) for f in release.files), needs,
                                 slo.model_dump(mode="json")))
    return out


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------ applying


def measure_release(device: Device, release_id: str, baseline: str | None, gate: GateSpec,
                    host_golden: float | None, seed: str = "",
                    on_retry: Callable[[int, str], None] = lambda runs, why: None) -> Verdict:
    """Verify on the device and decide; a Failed is confirmed (and an Inconclusive retried) before it stands."""
    def run(runs: int, attempt: int) -> dict[str, Any]:
        return device.verify(release_id, baseline, runs, gate.verification.block,
                             timeout=gate.verify_timeout_s * (2 ** min(attempt, 3)))

    try:
        return measure(run, gate, host_golden, f"{seed}:{release_id}", on_retry)
    except AgentFailed as exc:
        if exc.kind != "out-of-memory":
            raise
        return out_of_memory(exc.message)


@dataclass
class ApplyContext:
    """What the executor works with. ``desired`` for an apply (what git asks for); a rollback, promote or abort
    plan names releases already on the devices and comes with ``doc`` and its ``members`` instead."""

    desired: Desired | None
    connections: Connections
    ledger: Ledger
    actor: str
    git: dict[str, str | None]
    reporter: Reporter = field(default_factory=SilentReporter)
    stop: threading.Event = field(default_factory=threading.Event)
    signing_key: Path | None = None   # overrides the fleets' trust.signing_key
    lease: Lease | None = None        # the fleets' lock: checked before every device step, its fencing tokens sent
    doc: Document[Deployment] | None = None
    members: dict[str, TargetDevice] = field(default_factory=dict)
    allow_rejected: bool = False      # a rollback plan may land on a release a device rejected (as a trial)
    rollout_id: int | None = None     # set by the executor once the ledger has the rollout
    max_parallel: int | None = None   # at most this many devices at once (below the policy's parallelism)

    @property
    def deployment(self) -> Document[Deployment]:
        if self.desired is not None:
            return self.desired.deployment
        assert self.doc is not None, "an ApplyContext needs desired or doc"
        return self.doc

    def target(self, key: str) -> TargetDevice:
        return self.desired.target(key) if self.desired is not None else self.members[key]


def _allowed(spec: int | str, base: int) -> float:
    kind, amount = parse_count(spec)
    return amount if kind == "count" else amount * base / 100


def orders_for(target: TargetDevice, key: Path | None, deployment: str,
               allow_rejected: bool = False) -> Callable[..., SignedOrder | None]:
    """What signs the controller's orders to ``target`` (rollback, uninstall, desired states, training): the
    release key when its fleet signs releases (``key`` overrides the fleet's), else nothing (the device is not
    enrolled). ``bindings``: see ``sign_order``."""
    def order(action: str, release: str | None, bindings: dict[str, Any] | None = None) -> SignedOrder | None:
        if target.fleet.obj.spec.trust is None:
            return None
        signing_key = key or target.signing_key
        if signing_key is None:
            raise SigningError(f"fleet {target.fleet.name} signs releases: its devices take a {action} only as an "
                               "order signed by the release key, and no signing key is set",
                               hint="set trust.signing_key in the fleet or EDGEOPS_SIGNING_KEY")
        return sign_order(signing_key, deployment, target.key, action, release,
                          allow_rejected and action == "rollback", bindings)
    return order


class DeviceRoller:
    """One device at a time: push, switch, verify, then commit, pause or revert."""

    def __init__(self, ctx: ApplyContext, sharing: DeviceRoller | None = None) -> None:
        """``sharing``: another roller of the same apply, whose generation, signatures and golden values this one
        uses (one apply signs each release once, whichever way its devices are reached)."""
        self.ctx = ctx
        self.doc = ctx.deployment
        self.spec = self.doc.obj.spec
        self.policy = self.spec.rollout
        self.generation: int
        self._signed: dict[str, SignedMetadata]
        self._signing: threading.Lock
        self._host_golden: dict[str, float]  # golden set digest -> the build host's value on it
        if sharing is not None:
            self.generation, self._signed, self._signing = sharing.generation, sharing._signed, sharing._signing
            self._host_golden = sharing._host_golden
            return
        self.generation = time.time_ns() // 1_000_000  # one per apply; devices refuse anything older than committed
        self._signed = {}
        self._signing = threading.Lock()
        self._host_golden = {}

    def host_golden(self, target: TargetDevice) -> float:
        """The build host's golden value for the release ``target`` gets (a device's own learned head has its own
        golden set: adapt.personalize)."""
        assert self.ctx.desired is not None
        golden = next(f for f in self.ctx.desired.releases[target.key].files if f.name == "golden.npz")
        with self._signing:
            if golden.sha256 not in self._host_golden:
                assert golden.local is not None
                self._host_golden[golden.sha256] = host_golden_value(dict(np.load(golden.local)), self.spec.quality)
            return self._host_golden[golden.sha256]

    def device(self, target: TargetDevice) -> Device:
        device = device_for(target, self.ctx.connections, self.doc.name)
        device.fence = self.ctx.lease.token(target.fleet.name) if self.ctx.lease else None
        return device

    def last_committed(self, key: str) -> str | None:
        """The release the ledger last saw kept on this device (what a rebuilt state.json takes as committed)."""
        for rollout in self.ctx.ledger.history(self.doc.name, 50):
            for event in rollout.get("devices") or []:
                if event["device"] == key and event["decision"] in KEPT and event.get("release_id"):
                    return str(event["release_id"])
        return None

    def lease_held(self, outcome: DeviceOutcome, when: str) -> bool:
        """Whether the fleets' lock is still ours; when it is gone nothing new starts (and the reason says so)."""
        if self.ctx.lease is None:
            return True
        try:
            self.ctx.lease.check()
        except LockLost as exc:
            self.ctx.stop.set()
            outcome.reason = f"{when}: {exc.message}"
            return False
        return True

    def signed(self, target: TargetDevice, release: Release) -> SignedMetadata | None:
        """The release's signed metadata when the target's fleet signs releases (signed once per release)."""
        trust = target.fleet.obj.spec.trust
        if trust is None:
            return None
        key = self.ctx.signing_key or target.signing_key
        if key is None:
            raise SigningError(f"fleet {target.fleet.name} signs releases but no signing key is set",
                               hint="set trust.signing_key in the fleet or EDGEOPS_SIGNING_KEY")
        with self._signing:
            if release.id not in self._signed:
                self._signed[release.id] = sign_release(key, release, self.generation, trust.release_ttl_s)
            return self._signed[release.id]

    def measure(self, device: Device, planned: PlannedDevice, baseline: str | None) -> Verdict:
        target = self.ctx.target(planned.key)
        gate = GateSpec.of(self.spec, target.profile.obj.spec.limits.max_memory_mb,
                           trial_window_s=target.profile.obj.spec.device.trial_window_s)
        return measure_release(device, planned.release_id, baseline, gate, self.host_golden(target),
                               seed=planned.key, on_retry=lambda runs, why: self.ctx.reporter.stage(
                                   planned.key, "verify", f"{why} ({runs} runs)"))

    def starting(self, planned: PlannedDevice) -> tuple[TargetDevice, DeviceOutcome]:
        """The device's target and outcome so far (Skipped; with a reason when the rollout was stopped)."""
        outcome = DeviceOutcome(planned.key, planned.action, Decision.SKIPPED,
                                release_id=None if planned.release_id == UNINSTALL else planned.release_id,
                                from_release=planned.current, wave=planned.wave)
        if self.ctx.stop.is_set():
            outcome.reason = "interrupted before this device started"
        return self.ctx.target(planned.key), outcome

    STEPS = {Action.INSTALL: "install", Action.UPDATE: "install", Action.REPAIR: "install",
             Action.REVERIFY: "install", Action.ROLLBACK: "roll_back", Action.PROMOTE: "promote",
             Action.ABORT: "abort"}

    def roll(self, planned: PlannedDevice) -> DeviceOutcome:
        """Carry out the planned action on one device (the only code that changes what a device runs)."""
        target, outcome = self.starting(planned)
        if outcome.reason or not self.lease_held(outcome, "not started"):
            return outcome
        return getattr(self, self.STEPS[planned.action])(planned, target, outcome)  # type: ignore[no-any-return]

    def install(self, planned: PlannedDevice, target: TargetDevice, outcome: DeviceOutcome) -> DeviceOutcome:
        """Push, switch, verify, then commit, pause or revert (install, update, repair, re-verification)."""
        assert self.ctx.desired is not None
        release = self.ctx.desired.releases[planned.key]
        report = self.ctx.reporter
        switching, verdict = False, None
        try:
            device = self.device(target)
            with device.session():  # one agent process for the whole device: push, switch, verify, commit
                if planned.action == Action.REPAIR:
                    healed = device.heal(self.last_committed(planned.key), by=self.ctx.actor)
                    report.stage(planned.key, "heal", f"{len(healed['healed'])} restored from the device's blobs"
                                 + (f", {len(healed['unhealed'])} not" if healed["unhealed"] else ""))
                report.stage(planned.key, "push", f"{planned.bytes_to_move} bytes to move")
                pushed = device.push(release, timeout=self.policy.timeouts.push_s, repair=planned.action == Action.REPAIR,
                                     progress=lambda done: report.transfer(planned.key, done, release.model_bytes))
                outcome.bytes_moved = pushed.bytes_moved
                if not self.lease_held(outcome, "after the push, before the switch: still on the previous release"):
                    return outcome
                if self.ctx.stop.is_set():
                    outcome.reason = "interrupted after the push, before the switch: still on the previous release"
                    return outcome
                signed = self.signed(target, release)
                report.stage(planned.key, "switch", "signed" if signed else "")
                switching = True  # from here a cut may or may not have switched: read the device before deciding
                before = device.activate(release.id, by=self.ctx.actor, timeout=self.policy.timeouts.switch_s,
                                         trial_window_s=target.profile.obj.spec.device.trial_window_s, signed=signed)
                outcome.switched, outcome.switched_from = bool(before.get("switched")), before.get("committed")
                # only a committed release is ever a baseline: never a rejected or unverified one
                baseline = before.get("committed") if before.get("committed") != release.id else None
                report.stage(planned.key, "verify", f"interleaved with the committed {baseline}" if baseline else "")
                verdict = self.measure(device, planned, baseline)
                outcome.measurements = verdict.measurements
                outcome.reason = verdict.reason
                return self.conclude(device, planned, verdict, outcome)
        except EdgeopsError as exc:
            self.ctx.connections.drop(target)
            outcome.reason = exc.message
            if not switching:
                outcome.decision = Decision.UNREACHABLE if isinstance(exc, UNREACHABLE_ERRORS) else FAILED
                return outcome
            return self.settle_after_error(target, release.id, verdict, outcome,
                                           lost=isinstance(exc, UNREACHABLE_ERRORS))

    def settle_after_error(self, target: TargetDevice, release_id: str, verdict: Verdict | None,
                           outcome: DeviceOutcome, lost: bool = False) -> DeviceOutcome:
        """After a failure past the push: reconnect, read what the device runs, then revert or keep. A device lost
        mid-rollout that cannot be read again is Unreachable (it counts against max_unreachable_devices)."""
        outcome.decision = FAILED
        try:
            state = self.device(target).observe()
        except EdgeopsError as exc:
            self.ctx.connections.drop(target)
            if lost or isinstance(exc, UNREACHABLE_ERRORS):
                outcome.decision = Decision.UNREACHABLE
            outcome.reason += (f"; state unknown ({exc.message}): if it switched, the device reverts by itself "
                               f"within its trial window of {target.profile.obj.spec.device.trial_window_s:g} s")
            return outcome
        if state.current != release_id:
            outcome.reason += f"; the device runs {state.current or 'no release'} (the switch did not happen " \
                              "or was reverted)"
            return outcome
        if state.committed == release_id and verdict is not None:  # the commit landed, its answer was lost
            outcome.decision, outcome.committed = verdict.outcome, True
            outcome.reason += "; the device had committed the release before the connection failed"
            return outcome
        outcome.reason += "; " + self.revert(target, "after an error past the switch", verdict=False)
        return outcome

    def conclude(self, device: Device, planned: PlannedDevice, verdict: Verdict, outcome: DeviceOutcome) -> DeviceOutcome:
        report = self.ctx.reporter
        record = {"verification": {"outcome": verdict.outcome, "reason": verdict.reason, **verdict.on_device,
                                   "slo": self.spec.slo.model_dump(mode="json"), "measured_at": now()}}
        pause = (verdict.outcome == FAILED and self.policy.on_failure == "pause") or \
            (verdict.outcome == INCONCLUSIVE and self.policy.on_inconclusive == "pause")
        keep = verdict.outcome == PASSED or (verdict.outcome == INCONCLUSIVE and self.policy.on_inconclusive == "retry")
        if pause:  # left as it is, trial timer disarmed, until `edgeops resume`, `promote` or `abort`
            device.record({**record, "status": DeviceStatus.PAUSED}, by=self.ctx.actor, release=planned.release_id)
            report.stage(planned.key, "paused", verdict.reason[:80])
            outcome.decision = Decision.PAUSED
            outcome.reason = f"{verdict.outcome}: {verdict.reason}; paused on {planned.release_id} " \
                             "(edgeops resume, promote or abort)"
            return outcome
        if keep:
            status = DeviceStatus.COMMITTED if verdict.outcome == PASSED else DeviceStatus.INCONCLUSIVE
            try:
                device.record({**record, "status": status}, by=self.ctx.actor, release=planned.release_id)
            except AgentFailed as exc:
                if exc.kind not in ("trial-expired", "not-current"):
                    raise
                outcome.decision, outcome.reason = FAILED, f"{verdict.reason}; not committed: {exc.message}"
                return outcome
            report.stage(planned.key, "done", f"{verdict.outcome}: kept")
            try:
                device.prune(self.doc_keep(planned))
                device.keep_facts(self.ctx.target(planned.key).power_sensor)  # next reads: files only
            except EdgeopsError as exc:  # housekeeping: the release stays committed
                report.message(f"{planned.key}: housekeeping after the commit failed: {exc.message}")
            outcome.decision, outcome.committed = verdict.outcome, True
            return outcome
        report.stage(planned.key, "rollback", verdict.reason[:80])
        device.record(record, by=self.ctx.actor)  # the rejected release keeps the numbers that rejected it
        outcome.reason += "; " + self.revert(self.ctx.target(planned.key),
                                             f"the new release's verification was {verdict.outcome}")
        outcome.decision = FAILED if verdict.outcome == FAILED else Decision.ROLLED_BACK
        return outcome

    def doc_keep(self, planned: PlannedDevice) -> int:
        return self.ctx.target(planned.key).profile.obj.spec.device.keep_releases

    def revert(self, target: TargetDevice, why: str, verdict: bool = True) -> str:
        """Leave the trial release (rejected on a verdict, aborted on an error) for the last committed one."""
        try:
            back = self.device(target).revert(by=self.ctx.actor, verdict=verdict, reason=why)
        except EdgeopsError as exc:
            return f"REVERT FAILED: {exc.message}"
        if back.get("current"):
            return f"rolled back to {back['current']}: {why}"
        return f"first install removed ({why}); the device runs no release of this deployment"

    def undo(self, key: str, why: str, back: str | None) -> tuple[bool, str]:
        """Take back a release this rollout switched to and committed: to ``back``, the committed release the
        device ran before (none: it ran none before this rollout's first install). (done, what happened)."""
        target = self.ctx.target(key)
        held = DeviceOutcome(key, "rollback", Decision.SKIPPED)
        if not self.lease_held(held, "not rolled back"):
            return False, held.reason
        try:
            done = self.device(target).rollback(to=back or "none", by=self.ctx.actor,
                                                order=orders_for(target, self.ctx.signing_key, self.doc.name))
        except EdgeopsError as exc:
            return False, f"ROLLBACK FAILED: {exc.message}"
        if done.get("current"):
            return True, f"rolled back to {done['current']}: {why}"
        return True, f"first install removed ({why}); the device ran no release of this deployment before it"

    def roll_back(self, planned: PlannedDevice, target: TargetDevice, outcome: DeviceOutcome) -> DeviceOutcome:
        """Back to a release the device holds (signed order on enrolled devices), then measure it there against
        the SLO: absolute limits only, since the release was built by another commit (no host golden value).
        A release named with --allow-rejected runs as a trial and stays only if it passes this time."""
        landing, report, actor = planned.release_id, self.ctx.reporter, self.ctx.actor
        report.stage(planned.key, "rollback", planned.reason)
        outcome.decision = FAILED
        try:
            with self.device(target).session() as device:
                switched = device.rollback(to=landing, by=actor, allow_rejected=self.ctx.allow_rejected,
                                           trial_window_s=target.profile.obj.spec.device.trial_window_s,
                                           order=orders_for(target, self.ctx.signing_key, self.doc.name,
                                                            self.ctx.allow_rejected))
                outcome.decision = Decision.ROLLED_BACK
                if landing == UNINSTALL:
                    outcome.reason = f"{planned.reason}; the device runs no release"
                    return outcome
                report.stage(planned.key, "verify")
                gate = GateSpec.of(self.spec, target.profile.obj.spec.limits.max_memory_mb,
                           trial_window_s=target.profile.obj.spec.device.trial_window_s)
                verdict = measure_release(device, landing, None, gate, None, seed=planned.key)
                slo = self.spec.slo.model_dump(mode="json")
                kept: dict[str, Any] = {"verification": {"outcome": verdict.outcome, "reason": verdict.reason,
                                                         **verdict.on_device, "slo": slo, "measured_at": now()}}
                if switched.get("trial_until"):  # a release never committed here (named with --allow-rejected)
                    if verdict.outcome not in KEPT:
                        device.record(kept, by=actor, release=landing)
                        back = device.revert(by=actor, reason=f"{landing} named by --allow-rejected failed again")
                        outcome.decision = FAILED
                        outcome.reason = (f"{landing} failed its verification again ({verdict.reason}); the device "
                                          f"is back on {back.get('current') or 'no release'}")
                        return outcome
                    kept["status"] = DeviceStatus.COMMITTED if verdict.outcome == PASSED else DeviceStatus.INCONCLUSIVE
                device.record(kept, by=actor, release=landing)
                report.stage(planned.key, "done", verdict.outcome)
                outcome.measurements = {**verdict.measurements, "verification": verdict.outcome}
                outcome.reason = f"{planned.reason}: on {landing}; verification {verdict.outcome}: {verdict.reason}"
                return outcome
        except EdgeopsError as exc:
            self.ctx.connections.drop(target)
            landed = outcome.decision == Decision.ROLLED_BACK
            outcome.decision = Decision.UNREACHABLE if isinstance(exc, UNREACHABLE_ERRORS) and not landed else FAILED
            outcome.reason = f"{planned.reason}: {exc.message}" + (
                f"; the switch to {landing} had happened: it runs there, not verified" if landed else "")
            return outcome

    def promote(self, planned: PlannedDevice, target: TargetDevice, outcome: DeviceOutcome) -> DeviceOutcome:
        """Commit the paused release as it was measured."""
        try:
            self.device(target).record({"status": DeviceStatus.COMMITTED}, by=self.ctx.actor,
                                       release=planned.release_id)
        except EdgeopsError as exc:
            outcome.decision, outcome.reason = FAILED, exc.message
            return outcome
        outcome.decision, outcome.committed = Decision.PASSED, True
        outcome.reason = f"{planned.release_id} accepted by {self.ctx.actor} as it was measured"
        return outcome

    def abort(self, planned: PlannedDevice, target: TargetDevice, outcome: DeviceOutcome) -> DeviceOutcome:
        """Reject the paused release; the device goes back to its committed one."""
        try:
            back = self.device(target).revert(by=self.ctx.actor, reason=f"rollout aborted by {self.ctx.actor}")
        except EdgeopsError as exc:
            outcome.decision, outcome.reason = FAILED, exc.message
            return outcome
        outcome.decision, outcome.release_id = Decision.ROLLED_BACK, back.get("current")
        outcome.reason = f"{planned.release_id} rejected; back on {back.get('current') or 'no release'}"
        return outcome


class DeviceWork(Protocol):
    """What the wave runner asks of each device: take it to the planned release, or take that back."""

    def roll(self, planned: PlannedDevice) -> DeviceOutcome: ...
    def undo(self, key: str, why: str, back: str | None) -> tuple[bool, str]: ...


class WaveRunner:
    """The rollout policy over the waves: budgets, bake time, pause, halt and the halt's rollback.

    Device work comes in as ``work``; this class only decides what runs next and when to stop.
    """

    def __init__(self, plan: Plan, policy: RolloutPolicy, work: DeviceWork, stop: threading.Event,
                 reporter: Reporter, decided: Callable[[DeviceOutcome], None] = lambda outcome: None,
                 fleet_limits: dict[str, int] | None = None) -> None:
        """``fleet_limits``: at most this many devices of a fleet (by name) at once, within the policy's."""
        self.plan, self.policy, self.work, self.stop, self.reporter, self.decided = \
            plan, policy, work, stop, reporter, decided
        self.fleet_limits = fleet_limits or {}

    def over_budget(self, outcomes: list[DeviceOutcome], base: int, scope: str) -> str | None:
        failed = sum(1 for o in outcomes if o.decision in (FAILED, Decision.REFUSED))
        refused = sum(1 for o in outcomes if o.decision == Decision.REFUSED)
        unreachable = sum(1 for o in outcomes if o.decision == Decision.UNREACHABLE)
        if failed > _allowed(self.policy.max_failed_devices, base):
            what = f"failed device(s) ({refused} refused by the preflight)" if refused else "failed device(s)"
            return f"{failed} {what} {scope} exceed max_failed_devices {self.policy.max_failed_devices}"
        if unreachable > _allowed(self.policy.max_unreachable_devices, base):
            return (f"{unreachable} unreachable device(s) {scope} exceed max_unreachable_devices "
                    f"{self.policy.max_unreachable_devices}")
        return None

    def run_wave(self, devices: list[PlannedDevice]) -> list[DeviceOutcome]:
        outcomes: list[DeviceOutcome] = []
        limit = getattr(self.work, "parallelism", None)  # 0: every device at once (pull devices only wait)
        workers = len(devices) if limit == 0 else self.policy.parallelism
        shared = {fleet: threading.Semaphore(n) for fleet, n in self.fleet_limits.items()}

        def roll(device: PlannedDevice) -> DeviceOutcome:
            turn = shared.get(device.key.split("/", 1)[0])
            if turn is None:
                return self.work.roll(device)
            with turn:  # a fleet behind one slow link: its uploads do not share it ten ways
                return self.work.roll(device)

        with ThreadPoolExecutor(max_workers=min(workers, len(devices))) as pool:
            pending = {pool.submit(roll, d) for d in devices}
            while pending:
                try:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:
                    self.stop.set()
                    self.reporter.message("interrupt: letting devices in flight finish their step")
                    continue
                for future in done:
                    outcomes.append(future.result())
                    self.decided(outcomes[-1])  # written when made: a killed apply keeps what it did
        order = [d.key for d in devices]
        return sorted(outcomes, key=lambda o: order.index(o.key))

    def halt_rollback(self, outcomes: list[DeviceOutcome]) -> None:
        """Undo exactly what this rollout switched: a device it moved and committed goes back to the committed
        release it ran before; one it only verified or repaired in place stays on what it runs."""
        for outcome in outcomes:
            if outcome.committed and outcome.switched:
                undone, what = self.work.undo(outcome.key, "rollout halted", outcome.switched_from)
                outcome.reason += "; " + what
                if undone:  # otherwise it stays what it is: the device still runs the release it committed
                    outcome.decision, outcome.committed = Decision.ROLLED_BACK, False
                self.decided(outcome)
            elif outcome.committed:
                outcome.reason += f"; rollout halted: left on {outcome.release_id}, which this rollout did not switch"
                self.decided(outcome)

    def run(self) -> RolloutResult:
        unchanged = [DeviceOutcome(d.key, d.action, Decision.UNCHANGED, d.reason, d.release_id, d.current)
                     for d in self.plan.devices if d.action == Action.NO_CHANGE]
        unreachable = [DeviceOutcome(d.key, d.action, Decision.UNREACHABLE, d.reason, d.release_id, d.current)
                       for d in self.plan.devices if d.action == Action.UNREACHABLE]
        refused = [DeviceOutcome(d.key, d.action, Decision.REFUSED, d.reason, d.release_id, d.current,
                                 measurements={"facts": d.facts})
                   for d in self.plan.refused]
        if self.plan.is_noop:
            return RolloutResult(self.plan.deployment, Outcome.NO_OP, self.nothing_to_do(unchanged), unchanged)
        total = len(self.plan.devices)
        rolled: list[DeviceOutcome] = []
        for outcome in unreachable + refused:
            self.decided(outcome)
        halted = self.over_budget(unreachable + refused, total, "before the first wave")
        pausing = False  # a pause stops the waves like a halt, but keeps what it did for the operator
        for number in range(1, self.plan.waves + 1):
            if halted or self.stop.is_set():
                break
            wave = self.plan.wave(number)
            self.reporter.message(f"wave {number}/{self.plan.waves}: {', '.join(d.key for d in wave)}")
            results = self.run_wave(wave)
            rolled.extend(results)
            halted = self.over_budget(results, len(wave), f"in wave {number}") or \
                self.over_budget(rolled + unreachable + refused, total, "in total")
            paused = [r for r in results if r.decision == Decision.PAUSED]
            if paused:
                pausing = True
                halted = (f"{', '.join(r.key for r in paused)} left on the new release as it is "
                          f"({paused[0].reason.split(';')[0]}); `edgeops resume` measures again and continues, "
                          "`edgeops promote` accepts it and continues, `edgeops abort` reverts it")
            if not halted and number < self.plan.waves and self.policy.bake_time_s:
                self.reporter.message(f"baking {self.policy.bake_time_s:g} s before the next wave")
                self.stop.wait(self.policy.bake_time_s)
        skipped = [DeviceOutcome(d.key, d.action, Decision.SKIPPED, "not started: the rollout stopped earlier",
                                 d.release_id, d.current, wave=d.wave)
                   for d in self.plan.changes if d.key not in {o.key for o in rolled}]
        for skip in skipped:
            self.decided(skip)
        if halted and not pausing and self.policy.on_failure == "rollback":
            self.halt_rollback(rolled)
        every = unchanged + unreachable + refused + rolled + skipped
        if self.plan.kind not in FORWARD and not halted and any(o.decision not in SETTLED for o in every):
            halted = self.tally(every)  # every device was tried; one that did not get there makes it Halted
        ended = Outcome.INTERRUPTED if self.stop.is_set() else (
            Outcome.PAUSED if pausing else Outcome.HALTED if halted
            else Outcome.SUCCEEDED)
        done = f"{sum(o.committed for o in rolled)} device(s) updated and verified" if self.plan.kind in FORWARD \
            else self.tally(every)
        message = halted or ("interrupted by the user" if ended == Outcome.INTERRUPTED else done)
        return RolloutResult(self.plan.deployment, ended, message, every)

    def nothing_to_do(self, unchanged: list[DeviceOutcome]) -> str:
        if self.plan.kind in FORWARD:
            return f"no changes: {len(unchanged)} device(s) already run the release git asks for; no device was touched"
        verb = {ROLLBACK: "roll back"}.get(self.plan.kind, self.plan.kind)
        return f"nothing to {verb}: " + "; ".join(sorted({o.reason for o in unchanged if o.reason}))

    def tally(self, outcomes: list[DeviceOutcome]) -> str:
        """``2 device(s) rolled back, 1 failed, 1 unreachable, 3 unchanged`` (a rollback, promote or abort)."""
        done = {ROLLBACK: "rolled back", PROMOTE: "promoted", ABORT: "aborted"}[self.plan.kind]
        goal = Decision.PASSED if self.plan.kind == PROMOTE else Decision.ROLLED_BACK
        counts = {"failed": sum(o.decision in (FAILED, Decision.REFUSED) for o in outcomes),
                  "unreachable": sum(o.decision == Decision.UNREACHABLE for o in outcomes),
                  "not started": sum(o.decision == Decision.SKIPPED for o in outcomes),
                  "unchanged": sum(o.decision == Decision.UNCHANGED for o in outcomes)}
        return ", ".join([f"{sum(o.decision == goal for o in outcomes)} device(s) {done}",
                          *(f"{n} {what}" for what, n in counts.items() if n or what in ("failed", "unchanged"))])


def _fleet_limits(plan: Plan, ctx: ApplyContext) -> dict[str, int]:
    limits = {}
    for device in plan.devices:
        try:
            fleet = ctx.target(device.key).fleet
        except (KeyError, StopIteration):  # a device the plan names but the context does not (unreachable)
            continue
        if fleet.obj.spec.max_parallel is not None:
            limits[fleet.name] = fleet.obj.spec.max_parallel
    return limits


def execute(plan: Plan, ctx: ApplyContext, work: DeviceWork | None = None) -> RolloutResult:
    """Execute exactly ``plan`` (apply, rollback, promote or abort), recording each device decision in the
    ledger as it is made. The only code that changes devices and writes rollout records.

    ``work`` does each device (default: over SSH); one with a ``begin()`` method is called first (even for a
    plan with nothing to do), one with a ``finish(result)`` method hears how it ended.
    """
    work = work or DeviceRoller(ctx)
    policy = policy_for(plan, ctx.deployment.obj.spec.rollout)
    if ctx.max_parallel:
        policy = policy.model_copy(update={"parallelism": min(policy.parallelism, ctx.max_parallel)})
    runner = WaveRunner(plan, policy, work, ctx.stop, ctx.reporter, fleet_limits=_fleet_limits(plan, ctx))
    begin = getattr(work, "begin", None)
    if begin is not None:
        begin()
    if plan.is_noop:
        return runner.run()
    desired = ctx.desired
    if desired is not None:
        ctx.ledger.record_release(plan.deployment, desired.release_id, plan.artifacts, desired.configs(),
                                  {key: release.id for key, release in desired.releases.items()})
    rollout_id = ctx.ledger.start_rollout(plan.deployment, plan.kind, ctx.actor, ctx.git, plan.artifacts,
                                          desired.release_id if desired is not None else plan.release or None)
    ctx.rollout_id = rollout_id

    def decided(o: DeviceOutcome) -> None:
        ctx.ledger.device_event(rollout_id, plan.deployment, o.key, o.action, o.decision, wave=o.wave,
                                release_id=o.release_id, from_release=o.from_release, reason=o.reason,
                                bytes_moved=o.bytes_moved, measurements=o.measurements)

    runner.decided = decided
    result = runner.run()
    result.rollout_id = rollout_id
    result.number = ctx.ledger.number_of(plan.deployment, rollout_id)
    if ctx.lease is not None and ctx.lease.lost:
        result.outcome, result.lock_lost = Outcome.INTERRUPTED, ctx.lease.lost
        result.message = (f"stopped: the fleets' lock was lost ({ctx.lease.lost}); no device step started after "
                          f"that, steps in flight finished or reverted; {result.message}")
    finish = getattr(work, "finish", None)
    if finish is not None:
        finish(result)
    summary: dict[str, Any] = {**summarize(result), "git": ctx.git}
    if desired is not None:
        summary |= {"recipe": plan.recipe, "quality": {acc: (a.report.get("stages") or [{}])[-1].get("quality")
                                                       for acc, a in desired.artifacts.items()},
                    "build_keys": {acc: a.key for acc, a in desired.artifacts.items()}}  # the report plan quoted
    ctx.ledger.finish_rollout(rollout_id, result.outcome, summary)
    return result


def summarize(result: RolloutResult) -> dict[str, Any]:
    return {"message": result.message, **{str(n).lower(): result.count(n) for n in Decision},
            "bytes_moved": sum(d.bytes_moved for d in result.devices)}

