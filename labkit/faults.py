"""Faults to inject into real lab devices and real SSH connections."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeops.connections import ssh_connect
from edgeops.errors import HostUnreachable
from edgeops.targets import TargetDevice


class CutConnection:
    """A real SSH transport whose connection drops once, at an agent command that ``when`` picks.

    ``after``: the command runs on the device and only its answer is lost (the hard case: did it
    happen?); otherwise the connection drops before the command starts.
    """

    def __init__(self, when: Callable[[list[str]], bool], after: bool = True) -> None:
        self.when, self.after, self.fired = when, after, False

    def __call__(self, target: TargetDevice) -> Any:
        return _CutTransport(ssh_connect(target), self)


class _CutTransport:
    def __init__(self, inner: Any, plan: CutConnection) -> None:
        self.inner, self.plan, self.device = inner, plan, inner.device

    def run(self, argv: list[str], timeout: float | None = None, check: bool = True) -> Any:
        fire = not self.plan.fired and self.plan.when(argv)
        if fire and not self.plan.after:
            self.plan.fired = True
            self.inner.close()
            raise HostUnreachable(self.device, f"the connection dropped before `{_command(argv)}`")
        result = self.inner.run(argv, timeout=timeout, check=check)
        if fire:
            self.plan.fired = True
            self.inner.close()
            raise HostUnreachable(self.device, f"the connection dropped during `{_command(argv)}`")
        return result

    def open_session(self, argv: list[str]) -> Any:
        return _CutSession(self, self.inner.open_session(argv), argv)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _CutSession:
    """The agent's serve session, cut at the same command a ``run`` would be (the argv it would have run)."""

    def __init__(self, transport: _CutTransport, inner: Any, argv: list[str]) -> None:
        self.transport, self.inner, self.program = transport, inner, argv[:2]

    def call(self, request: str, timeout: float | None = None, what: str = "", payload: Any = None,
             progress: Any = None, payload_offset: int = 0) -> str:
        plan, device = self.transport.plan, self.transport.device
        argv = [*self.program, *json.loads(request)]
        fire = not plan.fired and plan.when(argv)
        if fire and not plan.after:
            plan.fired = True
            self.transport.inner.close()
            raise HostUnreachable(device, f"the connection dropped before `{_command(argv)}`")
        answer = self.inner.call(request, timeout, what, payload, progress, payload_offset)
        if fire:
            plan.fired = True
            self.transport.inner.close()
            raise HostUnreachable(device, f"the connection dropped during `{_command(argv)}`")
        return str(answer)

    def close(self) -> None:
        self.inner.close()


def _command(argv: list[str]) -> str:
    return next((a for a in argv[2:] if not a.startswith("-")), argv[0]) if len(argv) > 2 else argv[0]


def agent_command(name: str, *words: str) -> Callable[[list[str]], bool]:
    """A ``when`` for CutConnection: the agent command ``name`` (with all of ``words`` among its arguments)."""
    return lambda argv: name in argv[1:4] and all(w in argv for w in words)


def deployment_dir(target: TargetDevice, deployment: str) -> Path:
    return Path(target.root) / "deployments" / deployment


def flip_byte(target: TargetDevice, deployment: str, name: str = "model.onnx") -> str:
    """Flip one byte of a file of the running release (the file's time changes)."""
    path = deployment_dir(target, deployment) / "current" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    return f"flipped a byte of {name}"


def delete_file(target: TargetDevice, deployment: str, name: str = "runtime.json") -> str:
    (deployment_dir(target, deployment) / "current" / name).unlink()
    return f"deleted {name}"


def damage_blob(target: TargetDevice, deployment: str) -> str:
    """Overwrite the running release's model blob in the shared store."""
    state = json.loads((deployment_dir(target, deployment) / "state.json").read_text())
    digest = state["releases"][state["current"]]["files"]["model.onnx"]["sha256"]
    (Path(target.root) / "blobs" / "sha256" / digest).write_bytes(b"damaged")
    return "damaged the model blob"


def point_current_elsewhere(target: TargetDevice, deployment: str) -> str:
    """Repoint ``current`` by hand at another release on the device (or remove it)."""
    directory = deployment_dir(target, deployment)
    current = os.readlink(directory / "current")
    others = [p.name for p in (directory / "releases").iterdir() if p.name != Path(current).name]
    (directory / "current").unlink()
    if others:
        (directory / "current").symlink_to(Path("releases") / others[0])
        return f"pointed current at {others[0]} by hand"
    return "removed the current link by hand"
