"""What this host lets the lab build: the only reasons the lab's tests and benchmarks may skip."""

from __future__ import annotations

import os
import subprocess

from edgeops.labcgroup import ROOT, Budget, CgroupsUnavailable, _groups, constrain, release


def cgroups_writable() -> str | None:
    """None when this host lets us create cgroups, else why not."""
    try:
        constrain("edgeops-probe", os.getpid(), Budget(cpu=64))
    except CgroupsUnavailable as exc:
        return str(exc)
    finally:
        for directory in set(_groups("edgeops-probe", ROOT).values()):  # move back out before removing
            parent = directory.parent.parent
            if (parent / "cgroup.procs").exists():
                try:
                    (parent / "cgroup.procs").write_text(str(os.getpid()))
                except OSError:
                    pass
        release("edgeops-probe")
    return None


def namespaces_usable() -> str | None:
    """None when this host lets the lab create network namespaces with shaped veth pairs, else why not."""
    probe = "edgeops-probe"
    steps = [["ip", "netns", "add", probe], ["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "p1"],
             ["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "1mbit",
              "burst", "16k", "latency", "100ms"]]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                return f"`{' '.join(step)}`: {done.stderr.strip()}"
    except FileNotFoundError as exc:
        return str(exc)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None
