"""Pull-mode devices as the controller sees them: their topics, the broker and registry they use, what they report.

A fleet with a ``pull:`` section has no inbound connection to its devices. Each device's agent
daemon (``edgeops/agent/edgeops_pulld.py``) publishes, retained, the same state document the
agent prints over SSH; reading the fleet is reading those messages (one subscription for all
devices), so ``status`` costs the same for 4 devices or 1,000.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from edgeops.device import DeviceState
from edgeops.errors import EdgeopsError
from edgeops.manifest.models import PullSettings, plaintext_host
from edgeops.pull.broker import Broker, BrokerError, controller_password
from edgeops.pull.registry import Registry
from edgeops.targets import TargetDevice

DESIRED_SCHEMA = "edgeops.desired/v1"
STATUS_SCHEMA = "edgeops.status/v1"


def is_pull(target: TargetDevice) -> bool:
    return target.fleet.obj.spec.pull is not None


def pull_settings(target: TargetDevice) -> PullSettings:
    settings = target.fleet.obj.spec.pull
    if settings is None:
        raise EdgeopsError(f"{target.key} is not in a pull-mode fleet")
    return settings


def device_topic(target: TargetDevice, deployment: str, kind: str) -> str:
    """``<prefix>/<fleet>/<device>/<deployment>/<kind>`` (kind: desired | status)."""
    return f"{pull_settings(target).topic_prefix}/{target.fleet.name}/{target.name}/{deployment}/{kind}"


def online_topic(target: TargetDevice) -> str:
    return f"{pull_settings(target).topic_prefix}/{target.fleet.name}/{target.name}/online"


def repository(target: TargetDevice) -> str:
    return pull_settings(target).repository or f"edgeops/{target.fleet.name.lower()}"


class PullLinks:
    """The brokers and registries of a run's pull fleets, connected on first use, closed together."""

    def __init__(self, password: str | None = None) -> None:
        self.password = password  # EDGEOPS_BROKER_PASSWORD: overrides the fleets' pull.password_file
        self._brokers: dict[tuple[str, str], Broker] = {}
        self._registries: dict[tuple[str, str], Registry] = {}
        self._guard = threading.Lock()

    def broker(self, target: TargetDevice) -> Broker:
        settings = pull_settings(target)
        key = (settings.broker, settings.username)
        with self._guard:
            if key not in self._brokers:
                fleet = target.fleet
                password = self.password or controller_password(
                    target.secret(settings.password_file) if settings.password_file else None)
                if password and not settings.insecure and (host := plaintext_host(settings.broker)):
                    raise BrokerError(f"{settings.broker}: not sending the controller's broker password to {host} "
                                      "over plain MQTT", hint="use mqtts:// with pull.ca_file, or say pull.insecure: "
                                                              "true in the fleet")
                self._brokers[key] = Broker(settings.broker, settings.username, password,
                                            fleet.resolve(settings.ca_file) if settings.ca_file else None)
            return self._brokers[key]

    def registry(self, target: TargetDevice) -> Registry:
        settings = pull_settings(target)
        key = (settings.registry, repository(target))
        with self._guard:
            if key not in self._registries:
                ca = target.fleet.resolve(settings.ca_file) if settings.ca_file else None
                self._registries[key] = Registry(settings.registry, repository(target), ca)
            return self._registries[key]

    def close(self) -> None:
        with self._guard:
            brokers, self._brokers = list(self._brokers.values()), {}
        for broker in brokers:
            broker.close()


@dataclass(frozen=True)
class Report:
    """What a pull device last said about one deployment (its retained status) and whether it is connected."""

    status: dict[str, Any] | None
    online: bool | None          # None: it never connected
    seen_at: float | None        # when it last published anything

    @property
    def age_s(self) -> float | None:
        return None if self.seen_at is None else max(0.0, time.time() - self.seen_at)


def read_reports(links: PullLinks, deployment: str, targets: list[TargetDevice]) -> dict[str, Report]:
    """Every target's retained status and online flag, from one subscription per broker."""
    by_broker: dict[int, tuple[Broker, list[TargetDevice]]] = {}
    for target in targets:
        broker = links.broker(target)
        by_broker.setdefault(id(broker), (broker, []))[1].append(target)
    reports: dict[str, Report] = {}
    for broker, group in by_broker.values():
        prefixes = {f"{pull_settings(t).topic_prefix}/{t.fleet.name}" for t in group}
        broker.subscribe([f"{p}/+/{deployment}/status" for p in sorted(prefixes)] +
                         [f"{p}/+/online" for p in sorted(prefixes)])
        wanted = {device_topic(t, deployment, "status") for t in group} | {online_topic(t) for t in group}
        broker.settle(wanted)
        for target in group:
            status = broker.messages.get(device_topic(target, deployment, "status"))
            online = broker.messages.get(online_topic(target))
            seen = max((m.get("at") or 0 for m in (status, online) if m), default=0) or None
            reports[target.key] = Report(status if status and status.get("schema") == STATUS_SCHEMA else None,
                                         None if online is None else bool(online.get("online")), seen)
    return reports


def reported_state(target: TargetDevice, report: Report) -> DeviceState:
    """The device state in a pull device's last report; an error when it never reported one."""
    state = (report.status or {}).get("state") or {}
    if "current" not in state:
        raise EdgeopsError(f"{target.key} has not reported this deployment (its agent daemon never connected, or "
                           "it never received a release)")
    return DeviceState.from_agent(state)
