"""False-rollback and detection rates of the verification gate on noisy lab devices.

    python bench/gate.py [--trials 60]

Two releases of the wearable model are pushed to 4 lab devices (real sshd, the
real agent, all sharing this 2-core host, measured concurrently, so the noise
is real): an A/A release (identical graph and weights, different model bytes)
and a release made 30% slower on this host by a side branch that does not
change the outputs. Each trial switches a device to the candidate and runs the
manifest's verification (400 interleaved A/B runs, retry on Inconclusive up to
2 times with twice the runs) against the baseline release. Failed = rolled back.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
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
    for width in (64, 96, 128, 160, 192, 256, 320, 384):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_repo(Path(tmp) / "repo")
        write_lab_fleet(root, 4, Path(tmp) / "devices")
        manifest = root / "manifests" / "wearable.yaml"
        text = manifest.read_text().replace("    sha256: ", "    # sha256: ")
        text = text.replace("  recipe:\n    - quantize:\n        mode: static\n        per_channel: true\n"
                            "        calibration_method: minmax\n", "  recipe: []\n")
        manifest.write_text(text)
        models = root / "examples" / "models"
        same = onnx.load(str(models / "wearable_cnn.onnx"))
        same.doc_string = "A/A copy: same graph and weights, different bytes"
        onnx.save(same, str(models / "wearable_aa.onnx"))
        width, host_ratio = calibrate(models / "wearable_cnn.onnx", models / "wearable_slow.onnx")
        baseline = releases_for(root, "wearable_cnn.onnx")
        manifest.write_text(text)
        aa = releases_for(root, "wearable_aa.onnx")
        manifest.write_text(text)
        slow = releases_for(root, "wearable_slow.onnx")
        ws = load_workspace(root)
        doc = ws.deployments["wearable-activity"]
        targets = target_devices(ws, doc.name)
        lab_up(ws, ws.fleets["lab"], targets)
        outcomes: dict[str, Counter] = {"A/A (identical model)": Counter(), "30% slower": Counter()}
        ratios: dict[str, list[float]] = {k: [] for k in outcomes}
        try:
            with Connections() as connections:
                def setup(t):  # type: ignore[no-untyped-def]
                    device = device_for(t, connections, doc.name)
                    for desired in (baseline, aa, slow):
                        device.push(desired.releases[t.key])
                    device.activate(baseline.releases[t.key].id, signed=lab_signed(root, baseline.releases[t.key]))
                    return device

                devices = list(ThreadPoolExecutor(4).map(setup, targets))

                def trial(index: int) -> tuple[str, str, float]:
                    device, target = devices[index % 4], targets[index % 4]
                    label, candidate = (("A/A (identical model)", aa) if (index // 4) % 2 == 0
                                        else ("30% slower", slow))
                    release = candidate.releases[target.key].id
                    device.activate(release, signed=lab_signed(root, candidate.releases[target.key]))
                    verdict = measure_release(device, release, baseline.releases[target.key].id,
                                              GateSpec.of(doc.obj.spec), None,
                                              seed=f"{target.key}:{index}")
                    device.activate(baseline.releases[target.key].id,
                                    signed=lab_signed(root, baseline.releases[target.key]))
                    ratio = verdict.measurements["latency"]["p95_ms"] / verdict.measurements["previous_latency"]["p95_ms"]
                    return label, verdict.outcome, ratio

                with ThreadPoolExecutor(4) as pool:
                    for label, outcome, ratio in pool.map(trial, range(args.trials * 2)):
                        outcomes[label][outcome] += 1
                        ratios[label].append(ratio)
        finally:
            lab_down(ws, ws.fleets["lab"])
    rows = []
    for label, counts in outcomes.items():
        total = sum(counts.values())
        rows.append([label, total, counts["Passed"], counts["Inconclusive"], counts["Failed"],
                     f"{counts['Failed'] / total:.1%}", f"{np.median(ratios[label]):.2f}"])
    print(f"Machine: {machine()}; 4 lab devices measured concurrently on this host; slow variant: side branch "
          f"width {width}, {host_ratio:.2f}x the baseline's median latency on the host (1 thread)\n")
    print(markdown_table(["candidate", "trials", "Passed", "Inconclusive (kept)", "Failed (rolled back)",
                          "rollback rate", "median device p95 ratio"], rows))


if __name__ == "__main__":
    main()
