"""The build's speed claim on a quiet and on a busy host.

    python bench/busy_host.py            # prints a markdown table (docs/benchmarks.md)

Builds the digits CNN (manifests/camera.yaml) with static int8, per channel, with 0, 1 and 2 processes spinning
beside the build, and prints the claim (an interleaved A/B of the original and the artifact, with the foreign
load sampled from /proc/stat), the foreign load, and the ratio of the stage table's separate timings.
"""

from __future__ import annotations

import multiprocessing
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine, markdown_table  # noqa: E402

from edgeops.manifest.workspace import load_workspace  # noqa: E402
from labkit.artifacts import build_for  # noqa: E402
from labkit.repo import copy_repo  # noqa: E402


def _spin() -> None:
    while True:
        pass


def build_beside(hogs: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_repo(Path(tmp) / "repo")
        manifest = root / "manifests" / "camera.yaml"
        manifest.write_text(manifest.read_text().replace("- quantize: {mode: auto}",
                                                         "- quantize: {mode: static, per_channel: true}"))
        spinning = [multiprocessing.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(hogs)]
        for process in spinning:
            process.start()
        try:
            report = build_for(load_workspace(root), "meter-digits", "cpu", force=True).report
        finally:
            for process in spinning:
                process.terminate()
                process.join(10)
    speed, stages = report["speed"], report["stages"]
    claim = f"{speed['speedup']:.2f}x" if speed["measurable"] else f"not measurable ({speed['attempts']} tries)"
    separate = stages[0]["latency_ms"]["p50"] / stages[1]["latency_ms"]["p50"]
    return [str(hogs), claim, f"{speed['foreign_cores']:.2f}", f"{separate:.2f}x"]


def main() -> None:
    print(f"Machine: {machine()}\n")
    rows = [build_beside(hogs) for hogs in (0, 0, 1, 2, 0)]
    print(markdown_table(["spinning processes", "speed claim", "foreign cores", "stage-table p50 ratio"], rows))


if __name__ == "__main__":
    main()
