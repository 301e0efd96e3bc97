"""False-rollback, Inconclusive and detection rates of the verification gate on a constrained lab device.

    python bench/gate.py [--trials 100] [--modes fixed,adaptive] [--slower 1.15] [--tolerance 7.5]

One lab device (real sshd, the real agent) pinned to its own CPU with a 256 MB memory limit (cgroups),
while the controller keeps to the other CPU: a device of its own, as in the field, where the host has the
CPUs for it. Two candidates against the baseline release of the wearable model: A/A (identical graph and
weights, different model bytes) and a release made ``--slower`` times slower on this host by a side branch
that does not change the outputs. The regression tolerance sits half way (``--tolerance``, default 7.5%): A/A
should pass, the slower one fail. Each trial switches the device to the candidate and runs the gate as apply
does (a Failed confirmed, an Inconclusive measured again):

* fixed: the earlier plan, 400 interleaved A/B runs, twice the runs per look again, up to 2 more looks;
* adaptive: 100 runs first, then as many as the interval says would decide it, within a 20 s budget.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine, markdown_table  # noqa: E402

from edgeops.connections import Connections  # noqa: E402
from edgeops.desired import desired_state  # noqa: E402
from edgeops.lab import lab_down, lab_up  # noqa: E402
from edgeops.manifest.workspace import load_workspace  # noqa: E402
from edgeops.rollout import device_for, measure_release  # noqa: E402
from edgeops.targets import target_devices  # noqa: E402
from edgeops.verify import GateSpec  # noqa: E402
from labkit.artifacts import lab_signed, repo_at  # noqa: E402
from labkit.repo import copy_repo, write_lab_fleet  # noqa: E402
from labkit.slow_model import make_slower  # noqa: E402


def host_ms(path: Path, runs: int = 3000) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"signal": np.random.default_rng(0).random((1, 3, 128), dtype=np.float32)}
    for _ in range(200):
        session.run(None, feed)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        samples.append(time.perf_counter() - started)
    return float(np.median(samples) * 1000)


def calibrate(base: Path, out: Path, goal: float = 1.30) -> tuple[int, float]:
    reference = host_ms(base)
    best = (0, 0.0)
    for width in (16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384):
        ratio = host_ms(make_slower(base, out, width)) / reference
        if best[0] == 0 or abs(ratio - goal) < abs(best[1] - goal):
            best = (width, ratio)
    make_slower(base, out, best[0])
    return best


def releases_for(root: Path, model: str):  # type: ignore[no-untyped-def]
    manifest = root / "manifests" / "wearable.yaml"
    text = manifest.read_text()
    text = text.replace("path: ../examples/models/wearable_cnn.onnx", f"path: ../examples/models/{model}")
    manifest.write_text(text)
    ws = load_workspace(root)
    return desired_state(ws, ws.deployments["wearable-activity"], repo_at(root, ws).cache)


MODES = {"fixed": {"runs": 400, "retries": 2, "budget_s": None},
         "adaptive": {"runs": 100, "retries": 5, "budget_s": 20.0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--modes", default="fixed,adaptive")
    parser.add_argument("--slower", type=float, default=1.15)
    parser.add_argument("--tolerance", type=float, default=7.5)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    device_cpu = cpus[-1]
    if len(cpus) > 1:
        os.sched_setaffinity(0, set(cpus[:-1]))  # the controller keeps off the device's CPU
    slower_label = f"{(args.slower - 1) * 100:.0f}% slower"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_repo(Path(tmp) / "repo")
        fleet = write_lab_fleet(root, 1, Path(tmp) / "devices")
        fleet.write_text(fleet.read_text().replace(
            "  devices:\n", f"  lab: {{cpus: \"{device_cpu}\", memory_mb: 256}}\n  devices:\n"))
        manifest = root / "manifests" / "wearable.yaml"
        text = manifest.read_text().replace("    sha256: ", "    # sha256: ")
        text = text.replace("  recipe:\n    - quantize:\n        mode: static\n        per_channel: true\n"
                            "        calibration_method: minmax\n", "  recipe: []\n")
        text = text.replace("      latency_p95_pct: 15\n", f"      latency_p95_pct: {args.tolerance:g}\n"
                                                            f"      latency_p50_pct: {args.tolerance:g}\n")
        manifest.write_text(text)
        models = root / "examples" / "models"
        same = onnx.load(str(models / "wearable_cnn.onnx"))
        same.doc_string = "A/A copy: same graph and weights, different bytes"
        onnx.save(same, str(models / "wearable_aa.onnx"))
        width, host_ratio = calibrate(models / "wearable_cnn.onnx", models / "wearable_slow.onnx", args.slower)
        baseline = releases_for(root, "wearable_cnn.onnx")
        manifest.write_text(text)
        aa = releases_for(root, "wearable_aa.onnx")
        manifest.write_text(text)
        slow = releases_for(root, "wearable_slow.onnx")
        ws = load_workspace(root)
        doc = ws.deployments["wearable-activity"]
        [target] = target_devices(ws, doc.name)
        [device_up] = lab_up(ws, ws.fleets["lab"], [target])
        try:
            with Connections() as connections:
                device = device_for(target, connections, doc.name)
                for desired in (baseline, aa, slow):
                    device.push(desired.releases[target.key])
                device.activate(baseline.releases[target.key].id,
                                signed=lab_signed(root, baseline.releases[target.key]))
                for mode in args.modes.split(","):
                    spec = GateSpec.of(doc.obj.spec)
                    spec = replace(spec, verification=spec.verification.model_copy(update=MODES[mode]))
                    for label, candidate in (("A/A (identical model)", aa), (slower_label, slow)):
                        counts: Counter = Counter()
                        ratios, seconds, runs = [], [], []
                        for index in range(args.trials):
                            release = candidate.releases[target.key]
                            device.activate(release.id, signed=lab_signed(root, release))
                            started = time.monotonic()
                            verdict = measure_release(device, release.id, baseline.releases[target.key].id, spec,
                                                      None, seed=f"{mode}:{label}:{index}")
                            seconds.append(time.monotonic() - started)
                            device.activate(baseline.releases[target.key].id,
                                            signed=lab_signed(root, baseline.releases[target.key]))
                            counts[verdict.outcome.value] += 1
                            measured = verdict.measurements
                            ratios.append(measured["latency"]["p95_ms"] / measured["previous_latency"]["p95_ms"])
                            runs.append(sum(look["runs"] for look in measured.get("looks", [])))
                        total = sum(counts.values())
                        rows.append([mode, label, total, counts["Passed"], counts["Inconclusive"], counts["Failed"],
                                     f"{counts['Inconclusive'] / total:.0%}", f"{counts['Failed'] / total:.0%}",
                                     f"{np.median(ratios):.3f}", f"{np.median(runs):.0f}",
                                     f"{np.median(seconds):.1f} / {max(seconds):.1f}"])
                        print(" | ".join(str(v) for v in rows[-1]), file=sys.stderr, flush=True)
        finally:
            lab_down(ws, ws.fleets["lab"], wipe=True)
    print(f"Machine: {machine()}; one lab device pinned to CPU {device_cpu} with 256 MB (cgroups: "
          f"{device_up.budget or 'none'}), the controller on the other CPU(s); tolerance {args.tolerance:g}% on "
          f"p50 and p95; slow variant: side branch width {width}, {host_ratio:.2f}x the baseline's median latency on "
          f"the host (1 thread)\n")
    print(markdown_table(["plan", "candidate", "trials", "Passed", "Inconclusive", "Failed (rolled back)",
                          "Inconclusive rate", "rollback rate", "median device p95 ratio", "median runs per side",
                          "median / max s per verification"], rows))


if __name__ == "__main__":
    main()
