"""Helpers shared by the bench scripts: markdown tables, machine facts (scratch repos and lab fleets: labkit)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def speed_cells(original: Path, model: Path, inputs: dict, decimals: int = 2) -> tuple[str, str]:  # type: ignore[type-arg]
    """(host p50 cell, speed cell) of an interleaved A/B of ``original`` and ``model``, one thread, batch 1; the
    speed is not claimed when other processes kept more than ``BUSY_CORES`` busy while it ran (/proc/stat)."""
    from edgeops.compress.evaluate import interleaved_p50
    from edgeops.compress.hostload import watching

    with watching() as watch:
        base_ms, final_ms = interleaved_p50(original, model, inputs)
    timed = f"{base_ms:.{decimals}f} → {final_ms:.{decimals}f}"
    return (timed + " (busy host)", f"not claimed: {watch.describe()}") if watch.busy else \
        (timed, f"{base_ms / final_ms:.2f}x")
