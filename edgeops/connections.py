"""Connections to target devices: opened lazily, reused within a run, used from a bounded worker pool."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from edgeops.errors import EdgeopsError
from edgeops.pull.fleet import PullLinks
from edgeops.targets import TargetDevice
from edgeops.transport.base import Transport
from edgeops.transport.ssh import SSHTransport, target_for

T = TypeVar("T")
DEFAULT_PARALLELISM = 4  # bench/push.py: a 2-core host stops gaining past about 4 parallel SFTP transfers


def ssh_connect(target: TargetDevice) -> Transport:
    fleet = target.fleet
    if target.device.host is None:
        raise EdgeopsError(f"{target.key} pulls its releases: nothing connects to it over SSH")
    ssh = fleet.obj.spec.ssh
    identity = str(target.secret(ssh.identity_file)) if ssh.identity_file else None
    return SSHTransport(target_for(target.name, target.device.host, target.device.port, ssh, fleet.path.parent,
                                   identity))


class Connections:
    """One transport per device, shared by every stage of a run; close() releases them all."""

    def __init__(self, connect: Callable[[TargetDevice], Transport] = ssh_connect,
                 parallelism: int = DEFAULT_PARALLELISM, notify: Callable[[str], None] = lambda notice: None,
                 broker_password: str | None = None) -> None:
        """``notify`` hears what connecting did that the user must know (a host key trusted on first use);
        ``broker_password`` overrides pull fleets' ``pull.password_file``."""
        self.connect, self.parallelism, self.notify = connect, max(1, parallelism), notify
        self._open: dict[str, Transport] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.pull = PullLinks(broker_password)  # brokers and registries of pull-mode fleets, connected on first use

    def get(self, target: TargetDevice) -> Transport:
        with self._guard:
            lock = self._locks.setdefault(target.key, threading.Lock())
        with lock:
            if target.key not in self._open:
                transport = self.connect(target)
                for notice in getattr(transport, "notices", ()):
                    self.notify(f"{target.key}: {notice}")
                self._open[target.key] = transport
            return self._open[target.key]

    def drop(self, target: TargetDevice) -> None:
        """Forget a broken connection so the next use reconnects."""
        with self._guard:
            transport = self._open.pop(target.key, None)
        if transport is not None:
            transport.close()

    def map(self, work: Callable[[TargetDevice], T], targets: list[TargetDevice]) -> dict[str, T | EdgeopsError]:
        """Run ``work`` per device in parallel; an EdgeopsError becomes that device's result."""
        def guarded(target: TargetDevice) -> T | EdgeopsError:
            try:
                return work(target)
            except EdgeopsError as exc:
                return exc

        if not targets:
            return {}
        with ThreadPoolExecutor(max_workers=min(self.parallelism, len(targets))) as pool:
            results = list(pool.map(guarded, targets))
        return {t.key: r for t, r in zip(targets, results)}

    def close(self) -> None:
        with self._guard:
            transports, self._open = list(self._open.values()), {}
        for transport in transports:
            transport.close()
        self.pull.close()

    def __enter__(self) -> "Connections":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
