"""A device that is a directory on this machine: for fast unit tests and local development."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from edgeops.errors import CommandTimeout, RemoteCommandFailed, TransportError
from edgeops.transport.base import CommandResult, Progress


class LocalTransport:
    """Runs commands with subprocess (argv, never a shell) and copies files directly."""

    def __init__(self, device: str, command_timeout: float = 300) -> None:
        self.device = device
        self.command_timeout = command_timeout
        self.bytes_sent = 0
        self.notices: list[str] = []

    def run(self, argv: list[str], timeout: float | None = None, check: bool = True) -> CommandResult:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout or self.command_timeout)
        except subprocess.TimeoutExpired:
            raise CommandTimeout(self.device, f"`{argv[0]}` did not finish in {timeout or self.command_timeout:g} s") from None
        except FileNotFoundError:
            raise RemoteCommandFailed(self.device, argv, 127, f"{argv[0]}: command not found") from None
        result = CommandResult(argv, done.returncode, done.stdout, done.stderr)
        if check and done.returncode != 0:
            raise RemoteCommandFailed(self.device, argv, done.returncode, done.stderr)
        return result

    def put(self, local: Path, remote: str, progress: Progress | None = None) -> int:
        try:
            Path(remote).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, remote)
        except OSError as exc:
            raise TransportError(self.device, f"cannot write {remote}: {exc.strerror}") from None
        size = local.stat().st_size
        self.bytes_sent += size
        if progress:
            progress(size, size)
        return size

    def get(self, remote: str, local: Path) -> int:
        shutil.copyfile(remote, local)
        return local.stat().st_size

    def read_bytes(self, remote: str) -> bytes | None:
        try:
            return Path(remote).read_bytes()
        except FileNotFoundError:
            return None

    def close(self) -> None:
        pass
