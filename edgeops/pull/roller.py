"""Rolling out to devices that pull: publish the release and each device's desired state, collect their verdicts.

The device runs the lifecycle itself (fetch by digest, hash and signature checks, trial with a
dead-man timer, A/B measurement, the gate, commit or revert) and publishes the verdict; this side
keeps the rollout's waves, budgets and timeouts: a device that has not reported within
``pull.report_deadline_s`` counts as unreachable. Its desired state stays published when the
rollout goes on, so it catches up when it connects; a halted rollout takes it back.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from typing import Any

from edgeops.errors import EdgeopsError
from edgeops.plan import PlannedDevice
from edgeops.plan_operations import UNINSTALL
from edgeops.pull.fleet import (
    DESIRED_SCHEMA,
    PullLinks,
    device_topic,
    is_pull,
    online_topic,
    pull_settings,
    read_reports,
    repository,
)
from edgeops.pull.registry import PushedRelease, blockmaps
from edgeops.release import Release
from edgeops.rollout import ApplyContext, DeviceOutcome, DeviceRoller, DeviceWork, RolloutResult, orders_for
from edgeops.signing import SignedOrder
from edgeops.targets import TargetDevice
from edgeops.types import Decision, Outcome
from edgeops.verify import FAILED, GateSpec, Verdict

ROLLBACK_DEADLINE_S = 120.0


class PullRoller(DeviceRoller):
    """One pull-mode device: publish its desired state, wait for its report, turn it into the device's outcome."""

    def __init__(self, ctx: ApplyContext, sharing: DeviceRoller | None = None) -> None:
        super().__init__(ctx, sharing)
        self._pushed: dict[str, PushedRelease] = {}
        self._pushing = threading.Lock()
        self._ran: dict[str, str | None] = {}  # device key -> the release it ran before this rollout
        self._published: dict[str, dict[str, Any]] = {}  # device key -> the desired state this rollout sent it

    def publish_release(self, target: TargetDevice, release: Release) -> PushedRelease | None:
        """The release's blobs and manifest in the target's registry, once per release; None if already done."""
        registry = self.ctx.connections.pull.registry(target)
        key = f"{registry.base}/{registry.repository}:{release.id}"
        with self._pushing:
            if key in self._pushed:
                return None
            self._pushed[key] = registry.push_release(release)
            return self._pushed[key]

    def desired(self, target: TargetDevice, release: Release) -> dict[str, Any]:
        signed = self.signed(target, release)
        maps = blockmaps(release)
        order = orders_for(target, self.ctx.signing_key, self.doc.name)("activate", release.id)
        settings = pull_settings(target)
        profile = target.profile.obj.spec
        return {
            "schema": DESIRED_SCHEMA, "deployment": self.doc.name, "action": "install", "generation": self.generation,
            "release": release.id, "fleet_release": self.ctx.desired.release_id if self.ctx.desired else None,
            "by": self.ctx.actor,
            "files": {f.name: {"sha256": f.sha256, "size": f.size,
                               **({"blockmap": {"sha256": maps[f.name][0], "size": len(maps[f.name][1])}}
                                  if f.name in maps else {})} for f in release.files},
            "registry": {"url": settings.registry, "repository": repository(target)},
            "signed": {"metadata": base64.b64encode(signed.data).decode(),
                       "signature": base64.b64encode(signed.signature.encode()).decode()} if signed else None,
            "gate": GateSpec.of(self.spec, profile.limits.max_memory_mb, settings.report_deadline_s,
                                profile.device.trial_window_s).as_json(),
            "host_golden": self.host_golden(target),
            "trial_window_s": profile.device.trial_window_s, "keep_releases": profile.device.keep_releases,
            "power_sensor": target.power_sensor, "published_at": time.time(),
            "order": order.as_json() if order else None,
            "commit": "on-order",  # the verdict comes back first; this side decides (see commit())
            "rollout": self.ctx.rollout_id,  # a verdict that comes after the rollout ended names it (see begin())
        }

    def install(self, planned: PlannedDevice, target: TargetDevice, outcome: DeviceOutcome) -> DeviceOutcome:
        """Publish the desired state, wait for the verdict, then commit it here (the device never commits a
        release during a rollout on its own: one cut off from this controller reverts when its trial ends)."""
        assert self.ctx.desired is not None
        release = self.ctx.desired.releases[planned.key]
        report = self.ctx.reporter
        self._ran[planned.key] = planned.current
        deadline_s = pull_settings(target).report_deadline_s
        try:
            pushed = self.publish_release(target, release)
            if pushed is not None:
                report.stage(planned.key, "publish", f"{pushed.blobs_uploaded} blob(s), {pushed.bytes_uploaded} "
                                                     "bytes uploaded to the registry")
            broker = self.ctx.connections.pull.broker(target)
            document = self.desired(target, release)
            self._published[planned.key] = document
            broker.subscribe([device_topic(target, self.doc.name, "status"), online_topic(target)])
            broker.publish(device_topic(target, self.doc.name, "desired"), document)
            report.stage(planned.key, "waiting", f"for the device's verdict (at most {deadline_s:g} s)")
            found, gone = self.await_report(target, lambda s: s.get("phase") == "done" or
                                            s.get("result") == "awaiting-commit", deadline_s)
            if found is not None:
                outcome.bytes_moved = int(found.get("bytes_fetched") or 0)
            if found is not None and found.get("result") == "awaiting-commit":
                found, gone = self.commit(planned, target, found, outcome)
        except EdgeopsError as exc:
            outcome.decision, outcome.reason = FAILED, exc.message
            return outcome
        if found is None:
            if self.ctx.stop.is_set() or self.ctx.lease is not None and self.ctx.lease.lost:
                outcome.reason = outcome.reason or "interrupted while waiting for the device"
                return outcome
            outcome.decision, outcome.reason = Decision.UNREACHABLE, gone  # finish() says what becomes of it
            return outcome
        return self.concluded(planned, found, outcome)

    def await_report(self, target: TargetDevice, accept: Callable[[dict[str, Any]], bool],
                     deadline_s: float) -> tuple[dict[str, Any] | None, str]:
        """The device's report of this rollout's generation that ``accept`` takes, or (None, why not). A device
        the broker reports offline (its last will), or a broker this controller lost, for a heartbeat interval
        is given up at once rather than at the deadline."""
        broker = self.ctx.connections.pull.broker(target)
        status, presence = device_topic(target, self.doc.name, "status"), online_topic(target)
        grace = pull_settings(target).heartbeat_s
        end = time.monotonic() + deadline_s
        offline_since: float | None = None
        while True:
            found = broker.wait_for(status, lambda s: s.get("generation") == self.generation
                                    and s.get("action") == "install" and accept(s),
                                    min(end, time.monotonic() + 1.0), self.ctx.stop)
            now = time.monotonic()
            if found is not None or self.ctx.stop.is_set():
                return found, ""
            if now >= end:
                return None, f"no verdict within {deadline_s:g} s (offline or busy)"
            if broker.down_for() >= grace:
                return None, f"this controller lost the broker {broker.url} for {broker.down_for():.0f} s"
            if (broker.messages.get(presence) or {}).get("online") is False:
                offline_since = offline_since or now
                if now - offline_since >= grace:
                    return None, "the broker reports the device offline (its last will)"
            else:
                offline_since = None

    def commit(self, planned: PlannedDevice, target: TargetDevice, found: dict[str, Any],
               outcome: DeviceOutcome) -> tuple[dict[str, Any] | None, str]:
        """The verdict is in and keeps the release: send the commit order (the desired state again, ``on-pass``,
        with a new signed order) and wait for the device to confirm it."""
        if not self.lease_held(outcome, "verified, not committed") or self.ctx.stop.is_set():
            self.withdraw(target, planned.key)
            outcome.reason = outcome.reason or "interrupted before the commit: the device reverts"
            return None, ""
        self.ctx.reporter.stage(planned.key, "commit", str((found.get("verdict") or {}).get("outcome")))
        document = self.committing(target, self._published[planned.key])
        self._published[planned.key] = document
        self.ctx.connections.pull.broker(target).publish(device_topic(target, self.doc.name, "desired"), document)
        done, gone = self.await_report(target, lambda s: s.get("phase") == "done",
                                       min(ROLLBACK_DEADLINE_S, pull_settings(target).report_deadline_s))
        if done is None and gone:
            gone = f"verified, commit order sent, not confirmed: {gone}"
        return done, gone

    def committing(self, target: TargetDevice, document: dict[str, Any]) -> dict[str, Any]:
        order = orders_for(target, self.ctx.signing_key, self.doc.name)("activate", document["release"])
        return {**document, "commit": "on-pass", "published_at": time.time(),
                "order": order.as_json() if order else None}

    def withdraw(self, target: TargetDevice, key: str) -> str:
        """Take this rollout's desired state back (a retained ``withdraw``: a device that reconnects later reads
        it too): a device waiting for its commit reverts, one that never fetched it stays on what it runs."""
        try:
            self.ctx.connections.pull.broker(target).publish(
                device_topic(target, self.doc.name, "desired"),
                {"schema": DESIRED_SCHEMA, "deployment": self.doc.name, "action": "withdraw",
                 "generation": self.generation, "release": None, "published_at": time.time()},
                timeout_s=ROLLBACK_DEADLINE_S)
        except EdgeopsError as exc:
            return f"WITHDRAWING ITS DESIRED STATE FAILED: {exc.message} (it reverts when its trial window ends)"
        return "its desired state was withdrawn"

    def concluded(self, planned: PlannedDevice, found: dict[str, Any], outcome: DeviceOutcome) -> DeviceOutcome:
        verdict = Verdict.of(found["verdict"]) if found.get("verdict") else None
        if verdict is not None:
            outcome.measurements, outcome.reason = verdict.measurements, verdict.reason
        self.ctx.reporter.stage(planned.key, "done", str(found.get("result")))
        if found.get("result") == "committed":
            outcome.decision, outcome.committed = (verdict.outcome if verdict else Decision.PASSED), True
            outcome.switched, outcome.switched_from = not found.get("unchanged"), planned.current
            if verdict is None:
                outcome.reason = "the device already ran this release, committed"
            return outcome
        if found.get("result") == "withdrawn":
            outcome.decision = FAILED
            outcome.reason = f"not committed: {found.get('reason')}; the device reverted to its committed release"
            return outcome
        if found.get("result") == "rejected" and verdict is not None:
            outcome.decision = FAILED if verdict.outcome == FAILED else Decision.ROLLED_BACK
            outcome.reason += "; the device reverted to its committed release"
            return outcome
        error = found.get("error") or {}
        outcome.decision = FAILED
        outcome.reason = f"refused on the device ({error.get('kind')}): {error.get('message')}; the device runs " \
                         f"{(found.get('state') or {}).get('current') or 'no release'}"
        return outcome

    def roll_back(self, planned: PlannedDevice, target: TargetDevice, outcome: DeviceOutcome) -> DeviceOutcome:
        """Publish a rollback to the planned release (signed order); the device switches, measures it against the
        SLO and reports."""
        landing = planned.release_id
        back = None if landing == UNINSTALL else landing
        gate = GateSpec.of(self.spec, target.profile.obj.spec.limits.max_memory_mb,
                           pull_settings(target).report_deadline_s, target.profile.obj.spec.device.trial_window_s)
        self.ctx.reporter.stage(planned.key, "rollback", f"{planned.reason} (published; the device measures it)")
        outcome.decision = FAILED
        try:
            order = orders_for(target, self.ctx.signing_key, self.doc.name, self.ctx.allow_rejected)(
                "rollback" if back else "uninstall", back)
            found = roll_back(self.ctx.connections.pull, target, self.doc.name, back, self.generation,
                              self.ctx.actor, gate.as_json(), self.ctx.allow_rejected, order)
        except EdgeopsError as exc:
            outcome.reason = f"{planned.reason}: {exc.message}"
            return outcome
        if found is None:
            outcome.decision = Decision.UNREACHABLE
            outcome.reason = f"{planned.reason}: the device has not confirmed the rollback within its deadline " \
                             "(offline?); the rollback stays published: it lands when the device connects"
            return outcome
        if found.get("result") != "rolled-back":
            error = found.get("error") or {}
            outcome.reason = f"{planned.reason}: refused on the device ({error.get('kind')}): {error.get('message')}"
            return outcome
        outcome.decision = Decision.ROLLED_BACK
        if found.get("verdict") is None:
            outcome.reason = f"{planned.reason}; the device runs no release" if back is None else planned.reason
            return outcome
        verdict = Verdict.of(found["verdict"])
        outcome.measurements = {**verdict.measurements, "verification": verdict.outcome}
        outcome.reason = f"{planned.reason}: on {landing}; verification {verdict.outcome}: {verdict.reason}"
        self.ctx.reporter.stage(planned.key, "done", verdict.outcome)
        return outcome

    def undo(self, key: str, why: str, back: str | None) -> tuple[bool, str]:
        """Publish a rollback to the release the device ran before this rollout, and wait for it to land."""
        target = self.ctx.target(key)
        try:
            order = orders_for(target, self.ctx.signing_key, self.doc.name)("rollback" if back else "uninstall", back)
            found = roll_back(self.ctx.connections.pull, target, self.doc.name, back, self.generation, self.ctx.actor,
                              order=order)
        except EdgeopsError as exc:
            return False, f"ROLLBACK FAILED: {exc.message}"
        if found is None:
            return False, f"rollback to {back or 'no release'} published, not confirmed yet: it lands when the " \
                          f"device reads it ({why})"
        if found.get("result") != "rolled-back":
            return False, f"ROLLBACK FAILED on the device: {(found.get('error') or {}).get('message')}"
        return True, f"rolled back to {back}: {why}" if back else f"first install removed ({why})"

    def begin(self) -> None:
        """Verdicts that came after their rollout ended (a device that caught up once the rollout succeeded):
        accepted into that rollout's history, where the device was still Unreachable or not started."""
        targets = [t for t in self.ctx.members.values() or
                   (self.ctx.desired.targets if self.ctx.desired else []) if is_pull(t)]
        try:
            reports = read_reports(self.ctx.connections.pull, self.doc.name, targets)
        except EdgeopsError:
            return  # the rollout sees the broker's trouble itself
        late = {key: status for key, report in reports.items() if (status := report.status or {}).get("rollout")
                and status.get("action") == "install" and status.get("result") in ("committed", "rejected")}
        if not late:
            return
        rollouts = {r["id"]: r for r in self.ctx.ledger.history(self.doc.name, 50)}
        for key, status in late.items():
            rollout = rollouts.get(status["rollout"])
            events = [e for e in (rollout or {}).get("devices", []) if e["device"] == key]
            if rollout is None or not events or events[-1]["decision"] not in (Decision.UNREACHABLE, Decision.SKIPPED):
                continue
            verdict = Verdict.of(status["verdict"]) if status.get("verdict") else None
            decision = (verdict.outcome if verdict else Decision.PASSED) if status["result"] == "committed" \
                else Decision.ROLLED_BACK
            self.ctx.ledger.device_event(
                rollout["id"], self.doc.name, key, "install", decision, release_id=status.get("release"),
                reason=f"late verdict, accepted: reported {status['result']} after rollout #{rollout['number']} "
                       f"ended ({verdict.reason if verdict else 'no measurement'})",
                bytes_moved=int(status.get("bytes_fetched") or 0), measurements=verdict.measurements if verdict else {})

    def finish(self, result: RolloutResult) -> None:
        """Devices this rollout never heard back from: after a success they may catch up and commit on their own
        (their desired state is sent again with ``on-pass``); otherwise it is withdrawn."""
        for outcome in result.devices:
            if outcome.decision not in (Decision.UNREACHABLE, Decision.SKIPPED) or outcome.key not in self._published:
                continue
            target = self.ctx.target(outcome.key)
            if result.outcome == Outcome.SUCCEEDED:
                try:
                    self.ctx.connections.pull.broker(target).publish(
                        device_topic(target, self.doc.name, "desired"),
                        self.committing(target, self._published[outcome.key]), timeout_s=ROLLBACK_DEADLINE_S)
                    outcome.reason += "; its desired state stays published (commit on pass): it catches up when " \
                                      "it connects"
                except EdgeopsError as exc:
                    outcome.reason += f"; sending it the commit-on-pass failed ({exc.message}): it reverts " \
                                      "when its trial window ends, and the next apply rolls it again"
            else:
                outcome.reason += f"; it never commits this release: {self.withdraw(target, outcome.key)} (the " \
                                  "rollout did not succeed)"


class RoutedWork:
    """Devices of push fleets to the SSH roller (at most ``parallelism`` at once), pull devices to the pull roller."""

    parallelism = 0  # the wave runner may start every device: pull devices only wait

    def __init__(self, ctx: ApplyContext, parallelism: int) -> None:
        self.ctx, self.push = ctx, DeviceRoller(ctx)
        self.pull = PullRoller(ctx, sharing=self.push)  # one generation, one signature per release, per apply
        self._ssh_slots = threading.BoundedSemaphore(max(1, parallelism))

    def _work(self, key: str) -> DeviceWork:
        return self.pull if is_pull(self.ctx.target(key)) else self.push

    def roll(self, planned: PlannedDevice) -> DeviceOutcome:
        if self._work(planned.key) is self.pull:
            return self.pull.roll(planned)
        with self._ssh_slots:
            return self.push.roll(planned)

    def undo(self, key: str, why: str, back: str | None) -> tuple[bool, str]:
        return self._work(key).undo(key, why, back)

    def begin(self) -> None:
        self.pull.begin()

    def finish(self, result: RolloutResult) -> None:
        self.pull.finish(result)


def roll_back(links: PullLinks, target: TargetDevice, deployment: str, release: str | None, generation: int,
              by: str, gate: dict[str, Any] | None = None, allow_rejected: bool = False,
              order: SignedOrder | None = None) -> dict[str, Any] | None:
    """Ask a pull device to go back to ``release`` (None: to no release) and wait for its report.

    With ``gate`` the device measures the release it lands on against the absolute SLOs and records the
    verdict (as ``edgeops rollback`` does over SSH). None when it did not report in time.
    """
    broker = links.broker(target)
    status = device_topic(target, deployment, "status")
    broker.subscribe([status])
    broker.publish(device_topic(target, deployment, "desired"), {
        "schema": DESIRED_SCHEMA, "deployment": deployment, "action": "rollback", "generation": generation,
        "release": release, "by": by, "gate": gate, "allow_rejected": allow_rejected, "published_at": time.time(),
        "trial_window_s": target.profile.obj.spec.device.trial_window_s, "order": order.as_json() if order else None},
        timeout_s=ROLLBACK_DEADLINE_S)  # a broker that is down for a while: published when it is back
    deadline = min(ROLLBACK_DEADLINE_S + (gate or {}).get("verify_timeout_s", 0),
                   pull_settings(target).report_deadline_s)
    return broker.wait_for(status, lambda s: s.get("generation") == generation and s.get("action") == "rollback"
                           and s.get("phase") == "done", time.monotonic() + deadline)
