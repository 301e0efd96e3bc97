"""How long ``auto`` takes against one ``olive run``, interleaved and repeated on the generated sentence encoder.

    python examples/make_sentence_encoder.py      # once (about 3 minutes): examples/generated/
    python bench/build_time.py --olive /tmp/olive/bin/olive [--rounds 3] [--baseline ../edgeops-before]

Each round runs, back to back: Olive's per-channel dynamic quantization pass (cold cache), then ``edgeops build``
(the CLI, cold cache) with ``auto`` at each goal of ``bench/build.py``'s encoder rows. A round's ratio is edgeops'
seconds over that round's Olive seconds, so a host that slows down for a while slows both; the table gives each
round and the median ratio per goal. ``--baseline`` adds, in each round, the builds of another checkout of
edgeops (``git worktree add ../edgeops-before <commit>``): a change's effect on build time, measured in the same
rounds since this host's speed moves by tens of percent within an hour. Nothing else should run meanwhile (the
builds time their candidates): each round samples the cores other processes kept busy (/proc/stat, as the
builds' own speed claims do), and a round where they kept more than ``BUSY_CORES`` busy is shown but left out of
the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table  # noqa: E402
from build import ENCODER, RECIPES, edgeops_build, olive_run, scratch_repo  # noqa: E402

from edgeops.compress.hostload import BUSY_CORES, watching  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--olive", required=True, help="an olive executable (Olive 0.13 in its own virtualenv)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another edgeops checkout to time in the same rounds")
    args = parser.parse_args()
    goals = [(label, recipe, None) for label, recipe in RECIPES[ENCODER] if "auto" in label]
    if args.baseline:
        goals += [(f"{label} (baseline)", recipe, args.baseline.resolve()) for label, recipe, _ in goals]
    seconds: dict[str, list[float]] = {label: [] for label in ["olive", *(goal[0] for goal in goals)]}
    with tempfile.TemporaryDirectory() as tmp:
        root = scratch_repo(Path(tmp) / "repo", ENCODER)
        original = root / "examples" / "generated" / "sentence_encoder.onnx"
        written = (root / "manifests" / ENCODER).read_text()
        loads: list[float | None] = []  # cores other processes kept busy, per round
        for round_ in range(args.rounds):
            with watching() as watch:
                seconds["olive"].append(olive_run(args.olive, original, Path(tmp))[0])
                for label, recipe, source in goals:
                    seconds[label].append(edgeops_build(root, written, label.removesuffix(" (baseline)"), recipe,
                                                        source)[0])
            loads.append(watch.foreign_cores)
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in seconds.items())
                  + f"; {watch.describe()}", file=sys.stderr)
    quiet = [i for i, load in enumerate(loads) if load is not None and load <= BUSY_CORES]
    rows = [["Olive 0.13 `olive run`, dynamic int8 per-channel", *(f"{s:.1f}" for s in seconds["olive"]), "1.00x"]]
    for label, _, _ in goals:
        ratios = [s / o for s, o in zip(seconds[label], seconds["olive"])]
        median = f"{statistics.median(ratios[i] for i in quiet):.2f}x" if quiet else "not measurable on a busy host"
        rows.append([f"edgeops build, {label}", *(f"{s:.1f}" for s in seconds[label]),
                     f"{median} (rounds: {', '.join(f'{r:.2f}' for r in ratios)})"])
    rows.append(["cores other processes kept busy", *("?" if load is None else f"{load:.2f}" for load in loads),
                 f"rounds over {BUSY_CORES:g} left out"])
    print(f"Machine: {machine()}\n")
    print(markdown_table(["build (cold)", *(f"round {i + 1} s" for i in range(args.rounds)),
                          "median ratio to Olive (quiet rounds)"], rows))


if __name__ == "__main__":
    main()
