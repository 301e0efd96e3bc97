"""How busy other processes kept this host while edgeops timed something.

A speed ratio measured while another job used the cores is not a property of the model (the same build read
6.59x on a busy host and 1.73x on a quiet one). ``watching()`` samples the host's busy CPU time (/proc/stat)
and this process's own CPU time around a measurement; what is left is foreign load, in cores. A claim taken
under more than ``BUSY_CORES`` of it is not made.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from edgeops.compress.ahead import live_cpu_s

BUSY_CORES = 0.5   # foreign load (cores kept busy by other processes) above which a timing is not claimed
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)   # user, nice, system, irq, softirq, steal (of /proc/stat's "cpu" line)


def _host_busy_s() -> float | None:
    """Seconds of CPU time the whole host has spent busy since boot (all cores), None where unknown."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = handle.readline().split()[1:]
        ticks = sum(int(fields[i]) for i in BUSY_FIELDS if i < len(fields))
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Watch:
    """Foreign load over a measurement: filled in when the ``watching()`` block ends."""

    foreign_cores: float | None = None   # None: the host does not say (no /proc/stat)
    seconds: float = 0.0

    @property
    def busy(self) -> bool:
        return self.foreign_cores is not None and self.foreign_cores > BUSY_CORES

    def describe(self) -> str:
        if self.foreign_cores is None:
            return "foreign load unknown (no /proc/stat)"
        return f"other processes kept {max(self.foreign_cores, 0):.2f} cores busy"


def _own_cpu_s() -> float:
    """CPU time of this process (every thread), of the children it has waited for (quantizers it ran) and of
    those quantizing ahead now."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime + live_cpu_s()


@contextmanager
def watching() -> Iterator[Watch]:
    """Sample foreign load over the block (the host's busy time less this process's and its children's)."""
    watch = Watch()
    host, own, wall = _host_busy_s(), _own_cpu_s(), time.monotonic()
    try:
        yield watch
    finally:
        after = _host_busy_s()
        watch.seconds = time.monotonic() - wall
        if host is not None and after is not None and watch.seconds > 0:
            # clock ticks round to 10 ms: a short block reads a little load that is not there
            watch.foreign_cores = max(0.0, ((after - host) - (_own_cpu_s() - own)) / watch.seconds)
