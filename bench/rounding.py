"""GPTQ rounding against onnxruntime's round-to-nearest, on weight-only int4 decoders, built by edgeops' pipeline.

    python bench/rounding.py [--model-dir examples/generated/tiny_lm]

The committed small tiny LM (examples/models/tiny_lm, or the full-size one that examples/make_tiny_lm.py
writes) built with ``quantize: {mode: weight_only, bits: 4, block_size: B}`` for B in 32 and 128, each with
``rounding: nearest`` and ``rounding: gptq``, in a scratch copy of the repository with its own build cache.
Every figure is edgeops' own evaluator's, as the build report gives it: greedy-token agreement with the fp32
model (teacher-forced, the golden prompts), perplexity on the held-out text and its increase, size, and the
build's wall time (the quality goal is lifted so that every configuration is measured). Host CPU only. The
encoder's rows (int8 and int4) are in bench/int8_tools.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import REPO, machine  # noqa: E402

RECIPE = "    - quantize: {mode: auto}\n"
GOAL = "max_drop: 5 "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "examples" / "models" / "tiny_lm")
    args = parser.parse_args()
    from edgeops.manifest.workspace import load_workspace
    from labkit.artifacts import build_for

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        for part in ("manifests", "device_profiles", "templates"):
            shutil.copytree(REPO / part, root / part)
        shutil.copytree(REPO / "examples", root / "examples", ignore=shutil.ignore_patterns("generated", "tiny_lm"))
        shutil.copytree(args.model_dir.resolve(), root / "examples" / "models" / "tiny_lm")
        os.environ["EDGEOPS_CACHE_DIR"] = str(Path(tmp) / "cache")
        manifest = root / "manifests" / "assistant-lm.yaml"
        original = manifest.read_text()
        assert RECIPE in original and GOAL in original, "manifests/assistant-lm.yaml changed: update bench/rounding.py"
        original = original.replace(GOAL, "max_drop: 100 ")  # measure every configuration: no quality gate
        print(machine())
        print(f"model: {args.model_dir}\n")
        print("| int4 weights | rounding | agreement % | perplexity | increase % | size MB | build s |")
        print("|---|---|---|---|---|---|---|")
        for block in (32, 128):
            for rounding in ("nearest", "gptq"):
                step = f"    - quantize: {{mode: weight_only, bits: 4, block_size: {block}, rounding: {rounding}}}\n"
                manifest.write_text(original.replace(RECIPE, step))
                started = time.monotonic()
                report = build_for(load_workspace(root), "assistant-lm", "cpu").report
                took = time.monotonic() - started
                first, final = report["stages"][0], report["stages"][-1]
                quality, base = final["quality"], first["quality"]
                print(f"| block {block} | {rounding} | {quality['agreement']:.2f} | {quality['perplexity']:.3f} | "
                      f"{100 * (quality['perplexity'] / base['perplexity'] - 1):.2f} | "
                      f"{final['size_bytes'] / 1e6:.2f} | {took:.1f} |")


if __name__ == "__main__":
    main()
