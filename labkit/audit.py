"""What this process opened and where it connected, from Python's audit hooks (``sys.addaudithook``).

One hook per process (hooks cannot be removed), switched on and off around the code under test: the
boundary fuzzer asserts no file outside the allowed roots is read and no endpoint outside the base
revision is dialled; the e2e suite asserts nothing is dialled outside this machine.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from edgeops.lablink import is_lab_address


@dataclass
class Seen:
    opened: list[str] = field(default_factory=list)
    connected: list[Any] = field(default_factory=list)
    left: list[Any] = field(default_factory=list)  # judged off this machine when tried (a lab link may go later)


class OffMachine(OSError):
    """Raised inside the audited code: a connection (or a name lookup) that would leave this machine."""


class _Auditor:
    def __init__(self) -> None:
        self.seen: Seen | None = None
        self.block = False
        self.lock = threading.Lock()
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        seen = self.seen
        if seen is None:
            return
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            seen.opened.append(path if os.path.isabs(path) else os.path.join(os.getcwd(), path))
        elif event == "socket.connect" and len(args) > 1:
            seen.connected.append(args[1])
            if off_machine(args[1]):
                seen.left.append(args[1])
            if self.block and off_machine(args[1]):
                raise OffMachine(f"blocked by the test: a connection to {args[1]!r} would leave this machine")
        elif event == "socket.getaddrinfo" and args and self.block:
            if off_machine((args[0], args[1])):
                seen.connected.append((args[0], args[1], "lookup"))
                seen.left.append((args[0], args[1], "lookup"))
                raise OffMachine(f"blocked by the test: looking up {args[0]!r} would leave this machine")


_AUDITOR: _Auditor | None = None


@contextmanager
def watching(block_off_machine: bool = False) -> Iterator[Seen]:
    """Record the block's opens and connects (one watcher at a time per process); ``block_off_machine`` also
    refuses, by raising in the hook, every connection or name lookup that would leave this machine."""
    global _AUDITOR
    if _AUDITOR is None:
        _AUDITOR = _Auditor()
    seen = Seen()
    with _AUDITOR.lock:
        _AUDITOR.seen, _AUDITOR.block = seen, block_off_machine
        try:
            yield seen
        finally:
            _AUDITOR.seen, _AUDITOR.block = None, False


def off_machine(address: Any) -> bool:
    """An (host, port, ...) address that is not this machine (unix sockets and loopback are fine)."""
    if not isinstance(address, tuple) or not address or address[0] is None:
        return False
    host = os.fsdecode(address[0]) if isinstance(address[0], bytes) else str(address[0])
    host = host.strip("[]")
    if host == "localhost" or is_lab_address(host):  # a lab device's own link: a namespace on this machine
        return False
    try:
        return not ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return True  # a name: it would be resolved and dialled elsewhere


def outside(paths: list[str], allowed: list[str]) -> list[str]:
    """The opened paths (symlinks resolved) under none of the allowed roots; a root ending in "-" is a name
    prefix (``/tmp/edgeops-`` allows every scratch directory edgeops makes)."""
    roots = [a if a.endswith("-") else os.path.realpath(a).rstrip("/") + "/" for a in allowed]
    found = []
    for path in dict.fromkeys(paths):
        real = os.path.realpath(path)
        if not any((real + "/").startswith(r) if not r.endswith("-") else real.startswith(r) for r in roots):
            found.append(real)
    return found
