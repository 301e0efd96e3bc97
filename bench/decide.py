"""Deciding on the device over the lab fleet: what each hardware class measured and chose, and what it cost.

    python bench/decide.py [--finalists 3] [--runs 400] [--repeat 3]

Two lab devices (real sshd on 127.0.0.1, the same host CPU): lab-01 in class lab-x86 (1 intra-op thread,
the lab profile) and lab-02 in lab-x86-2t (2 threads). The digits CNN with ``quantize: {mode: auto,
decide_on: device}``: a cold `edgeops apply` builds, stages the finalists on both, measures them there side
by side, records the decision and rolls out; then `edgeops decide` measures again ``--repeat`` times, to show
how stable the choice is. Prints, per class and run, every finalist's device p50 against the host's, and the
pick.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine, markdown_table  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from edgeops.cli import main as cli_main  # noqa: E402
from edgeops.lab import lab_down, lab_up  # noqa: E402
from edgeops.manifest.workspace import load_workspace  # noqa: E402
from edgeops.targets import target_devices  # noqa: E402
from labkit.decide import DECIDE_DEPLOYMENT, write_two_class_repo  # noqa: E402
from labkit.repo import copy_repo  # noqa: E402


def cli(root: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_main, [*args, "--root", str(root)])
    return result.exit_code, result.stdout


def rows_of(run: str, decided: dict[str, dict]) -> list[list[object]]:  # type: ignore[type-arg]
    rows: list[list[object]] = []
    for hardware_class, d in sorted(decided.items()):
        for c in d["candidates"]:
            rows.append([run, hardware_class, c["label"], f"{c['p50_ms']:.4f}", f"{c['host_p50_ms']:.4f}"
                         if c.get("host_p50_ms") else "—", f"{c['size_bytes'] / 1e6:.2f}",
                         "**chosen**" if c["label"] == d["label"] else ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finalists", type=int, default=3)
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_repo(Path(tmp) / "repo")
        manifest = write_two_class_repo(root, Path(tmp) / "devices", args.finalists, args.runs)
        ws = load_workspace(root)
        lab_up(ws, ws.fleets["lab"], target_devices(ws, DECIDE_DEPLOYMENT))
        try:
            started = time.perf_counter()
            code, out = cli(root, "apply", manifest, "-o", "json")
            apply_s = time.perf_counter() - started
            if code != 0:
                raise SystemExit(f"apply failed ({code}): {out}")
            _, history = cli(root, "history", DECIDE_DEPLOYMENT, "-o", "json")
            first = next(r for r in json.loads(history) if r["kind"] == "decide")
            rows = rows_of("apply", first["summary"]["classes"])
            seconds = []
            for number in range(args.repeat):
                started = time.perf_counter()
                code, out = cli(root, "decide", DECIDE_DEPLOYMENT, "-o", "json")
                seconds.append(time.perf_counter() - started)
                rows += rows_of(f"decide {number + 1}", json.loads(out))
        finally:
            lab_down(ws, ws.fleets["lab"])
    print(machine())
    print(f"cold apply (build, finalists, decide, roll out): {apply_s:.1f} s; edgeops decide: "
          + ", ".join(f"{s:.1f} s" for s in seconds) + "\n")
    print(markdown_table(["run", "class", "finalist", "device p50 ms", "host p50 ms", "MB", ""], rows))


if __name__ == "__main__":
    main()
