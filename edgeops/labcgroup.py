"""CPU and memory budgets for lab devices, enforced by the kernel's cgroups (v2, or v1's cpu and memory).

A lab device is its sshd and everything it starts (sessions, the agent, the bench child, trial timers):
the sshd is moved into the device's own group, and children inherit it. One group per device under
``edgeops-lab/``; ``lab down`` removes them. Where no cgroup file system is writable, ``lab up`` says so
and the device runs unconstrained (never silently).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PARENT = "edgeops-lab"
PERIOD_US = 100_000


class CgroupsUnavailable(Exception):
    """No cgroup file system this process can write (not root, or a container without them)."""


@dataclass(frozen=True)
class Budget:
    cpu: float | None = None        # cores (0.25: a quarter of one core's time)
    memory_mb: int | None = None

    def __bool__(self) -> bool:
        return self.cpu is not None or self.memory_mb is not None

    def describe(self) -> str:
        parts = ([f"{self.cpu:g} core"] if self.cpu is not None else []) + \
            ([f"{self.memory_mb} MB"] if self.memory_mb is not None else [])
        return ", ".join(parts) or "unconstrained"


def _v2(root: Path) -> bool:
    return (root / "cgroup.controllers").is_file()


def _groups(name: str, root: Path) -> dict[str, Path]:
    """controller -> the device's group directory (v2: one directory for both)."""
    if _v2(root):
        return {"cpu": root / PARENT / name, "memory": root / PARENT / name}
    return {"cpu": root / "cpu" / PARENT / name, "memory": root / "memory" / PARENT / name}


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupsUnavailable(f"cannot write {path}: {exc.strerror}") from None


def constrain(name: str, pid: int, budget: Budget, root: Path = ROOT) -> str:
    """Put process ``pid`` (and so everything it starts) under ``budget``; what was applied, for people."""
    if not budget:
        return "unconstrained"
    groups = _groups(name, root)
    try:
        for directory in set(groups.values()):
            directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CgroupsUnavailable(f"cannot create a cgroup under {root}: {exc.strerror}") from None
    if _v2(root):
        _write(root / PARENT / "cgroup.subtree_control", "+cpu +memory")
        if budget.cpu is not None:
            _write(groups["cpu"] / "cpu.max", f"{int(budget.cpu * PERIOD_US)} {PERIOD_US}")
        if budget.memory_mb is not None:
            _write(groups["memory"] / "memory.max", str(budget.memory_mb * 2**20))
            _write(groups["memory"] / "memory.swap.max", "0")
    else:
        if budget.cpu is not None:
            _write(groups["cpu"] / "cpu.cfs_period_us", str(PERIOD_US))
            _write(groups["cpu"] / "cpu.cfs_quota_us", str(int(budget.cpu * PERIOD_US)))
        if budget.memory_mb is not None:
            _write(groups["memory"] / "memory.limit_in_bytes", str(budget.memory_mb * 2**20))
            swap = groups["memory"] / "memory.memsw.limit_in_bytes"
            if swap.exists():  # no swapping past the limit, where the kernel accounts swap
                _write(swap, str(budget.memory_mb * 2**20))
    for controller, directory in groups.items():
        if (controller == "cpu" and budget.cpu is None) or (controller == "memory" and budget.memory_mb is None):
            continue
        _write(directory / "cgroup.procs", str(pid))
    return f"{budget.describe()} (cgroup {'v2' if _v2(root) else 'v1'} {PARENT}/{name})"


def applied(name: str, root: Path = ROOT) -> Budget:
    """The budget the kernel enforces on the device's group now (read back, not remembered)."""
    groups = _groups(name, root)
    cpu = memory = None
    try:
        if _v2(root):
            quota, period = (groups["cpu"] / "cpu.max").read_text().split()
            cpu = None if quota == "max" else int(quota) / int(period)
            limit = (groups["memory"] / "memory.max").read_text().strip()
            memory = None if limit == "max" else int(limit) // 2**20
        else:
            quota_us = int((groups["cpu"] / "cpu.cfs_quota_us").read_text())
            cpu = None if quota_us < 0 else quota_us / int((groups["cpu"] / "cpu.cfs_period_us").read_text())
            limit_bytes = int((groups["memory"] / "memory.limit_in_bytes").read_text())
            memory = None if limit_bytes >= 2**62 else limit_bytes // 2**20
    except (OSError, ValueError):
        pass
    return Budget(cpu, memory)


def members(name: str, root: Path = ROOT) -> set[int]:
    found: set[int] = set()
    for directory in set(_groups(name, root).values()):
        try:
            found |= {int(line) for line in (directory / "cgroup.procs").read_text().split()}
        except OSError:
            pass
    return found


def release(name: str, root: Path = ROOT) -> None:
    """Remove the device's groups (once its processes are gone; a group still in use stays)."""
    for directory in set(_groups(name, root).values()):
        try:
            os.rmdir(directory)
        except OSError:
            pass
