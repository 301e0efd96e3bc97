"""Exceptions users see. Only the CLI turns them into output and exit codes.

Every error carries what went wrong and, where it helps, where (file:line) and
what to do next. ``InputError`` and its subclasses mean "your input is wrong,
nothing was changed" (exit code 3); the others are runtime failures (exit 1).
The one table of exit codes is ``ExitCode`` (docs/exit-codes.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    """What every edgeops command's exit status means; one meaning per number across commands."""

    OK = 0            # done: nothing to change, rollout succeeded, fleet healthy, input valid
    FAILED = 1        # a rollout halted or failed, a device or build failed, status unhealthy or drifted
    CHANGES = 2       # plan only: the plan has changes to apply (and nothing else went wrong)
    INVALID = 3       # bad input (files or command line): reported file:line, nothing was touched
    REFUSED = 4       # preflight: a target device cannot run the release; nothing was pushed to it
    LOCKED = 5        # another apply or rollback holds the fleet's lock; try again later
    INTERRUPTED = 130  # Ctrl-C: devices in flight finished their step, nothing new started


class EdgeopsError(Exception):
    """Base class for every error edgeops raises on purpose."""

    exit_code: int = ExitCode.FAILED

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def lines(self) -> list[str]:
        """The message as the one or more lines the CLI prints."""
        return [self.message + (f" ({self.hint})" if self.hint else "")]


@dataclass(frozen=True)
class Problem:
    """One located problem in an input file."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {"file": self.file, "line": self.line, "field": self.field, "message": self.message}


class InputError(EdgeopsError):
    """Bad input (manifest, profile, template, data): nothing was touched. Exit code 3."""

    exit_code = ExitCode.INVALID

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line or 0, p.field))
        super().__init__("; ".join(str(p) for p in self.problems))

    @classmethod
    def at(cls, file: str, line: int | None, field: str, message: str) -> "InputError":
        return cls([Problem(file, line, field, message)])

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]


class BuildError(EdgeopsError):
    """A build ran but its result is not acceptable (quality gate, tool failure)."""


class RenderError(InputError):
    """A template could not render a valid runtime config."""


class TransportError(EdgeopsError):
    """Base class for failures talking to a device."""

    def __init__(self, device: str, message: str, hint: str | None = None) -> None:
        self.device = device
        super().__init__(f"{device}: {message}", hint)


class HostUnreachable(TransportError):
    """The device did not accept a TCP connection (refused, no route, DNS)."""


class ConnectTimeout(TransportError):
    """Connecting or waiting for the device took longer than its timeout."""


class CommandTimeout(TransportError):
    """A remote command did not finish in time."""


class ReadOnlyFiles(TransportError):
    """The device lets this key read its files but not write them (a restricted deploy key)."""


class AuthRefused(TransportError):
    """The device refused every key we offered."""


class IdentityFileMissing(TransportError):
    """The fleet names a private key file that is not there (nothing was sent to the device)."""


class HostKeyUnknown(TransportError):
    """The device's host key is not in known_hosts and trust-on-first-use is off."""


class HostKeyChanged(TransportError):
    """The device's host key differs from the one recorded in known_hosts."""


class RemoteCommandFailed(TransportError):
    """A command ran on the device and exited non-zero."""

    def __init__(self, device: str, argv: list[str], exit_status: int, stderr: str) -> None:
        self.argv = argv
        self.exit_status = exit_status
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else "no stderr"
        super().__init__(device, f"`{argv[0]}` exited {exit_status}: {tail}")


class DeviceError(EdgeopsError):
    """The device is reachable but cannot take the release (disk full, checksum mismatch)."""
