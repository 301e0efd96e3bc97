"""The transport interface. Every failure raises a named ``TransportError``; nothing returns False."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class CommandResult:
    argv: list[str]
    exit_status: int
    stdout: str
    stderr: str


class Transport(Protocol):
    """What edgeops needs from a connection to one device."""

    device: str
    notices: list[str]   # what the user must hear about connecting (a host key trusted on first use)

    def run(self, argv: list[str], timeout: float | None = None, check: bool = True) -> CommandResult:
        """Run ``argv`` on the device (each argument quoted); raise RemoteCommandFailed on non-zero if check."""

    def put(self, local: Path, remote: str, progress: Progress | None = None) -> int:
        """Copy a local file to ``remote``; return the bytes sent."""

    def get(self, remote: str, local: Path) -> int:
        """Copy a remote file to ``local``; return the bytes received."""

    def read_bytes(self, remote: str) -> bytes | None:
        """A small remote file's content, or None when it does not exist."""

    def close(self) -> None:
        """Release the connection (idempotent)."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
