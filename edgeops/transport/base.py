"""The transport interface. Every failure raises a named ``TransportError``; nothing returns False."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class CommandResult:
    argv: list[str]
    exit_status: int
    stdout: str
    stderr: str


@dataclass
class FileView:
    """What a transport's optional ``look`` read of the device's files: None where a path does not exist."""

    files: dict[str, bytes | None] = field(default_factory=dict)
    listings: dict[str, list[str] | None] = field(default_factory=dict)
    stats: dict[str, tuple[int, int] | None] = field(default_factory=dict)   # (size, mtime in whole seconds)
    links: dict[str, str | None] = field(default_factory=dict)
    free_bytes: int | None = None


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


class AgentSession(Protocol):
    """A command kept running on the device and spoken to in lines (a transport's optional ``open_session``)."""

    def call(self, request: str, timeout: float | None = None, what: str = "", payload: Path | None = None,
             progress: Progress | None = None, payload_offset: int = 0) -> str:
        """Send one request line (and ``payload``'s bytes from ``payload_offset`` on after it), return the answer
        line; a broken session raises a TransportError."""

    def close(self) -> None:
        """End the command (idempotent)."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
