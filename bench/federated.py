"""Federated adaptation side by side: edgeops' aggregation against Flower's, same head, same split, same local
optimiser; accuracy per round on the repository's evaluation data and bytes per device per round.

    python bench/federated.py [--rounds 10] [--devices 8] [--alpha 0.5] [--no-flower]

The scenario is the one tests/e2e/test_federated_ssh.py runs on real lab devices (labkit/federated.py): the
wearable CNN with a head trained on two of its four activities, its labelled training windows split over the
devices by Dirichlet(α) per class. Here the devices' step runs on the host (the agent's own ``train_head``, on
features computed once), so the figures compare the learning, not the transport: the rounds over SSH, with
their releases and verification, are timed by the e2e test. Rows:

* central: the same head trained on all the devices' training samples pooled (the target);
* edgeops fedavg / trimmed_mean: ``edgeops.adapt.aggregate`` as ``edgeops adapt`` runs it (clip_norm 5,
  outliers excluded), and trimmed_mean with one device's labels flipped;
* Flower FedAvg: flwr 1.42 in simulation mode (Ray), its FedAvg strategy, no clipping (its default), in a venv
  made under .edgeops/bench/flower-venv on first use (``pip install 'flwr[simulation]==1.42.0'``; Flower pins
  another protobuf than onnx's, so it does not share ours).

Bytes per device per round are what crosses the wire for the head alone: the round's starting tensors (.npz)
down, the agent's JSON answer up (edgeops), the tensors both ways (Flower's ndarrays).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeops.adapt.aggregate import Update, aggregate  # noqa: E402
from edgeops.agent.edgeops_agent import _encode, head_accuracy, train_head  # noqa: E402
from labkit.federated import (  # noqa: E402
    _features,
    central_accuracy,
    evaluation_windows,
    scenario,
    write_base_model,
)

EPOCHS, LEARNING_RATE, BATCH, CLIP, EVERY = 5, 0.05, 32, 5.0, 5


def edgeops_rounds(s, eval_features, eval_labels, rounds, method, poisoned=None):  # type: ignore[no-untyped-def]
    weight = (s.base_tensors[s.head.weight].T if s.head.transposed else s.base_tensors[s.head.weight]).copy()
    bias = s.base_tensors[s.head.bias].copy()
    curve, excluded, up = [], set(), 0
    for r in range(1, rounds + 1):
        updates = []
        for index, part in enumerate(s.parts):
            train = part[np.arange(len(part)) % EVERY != EVERY - 1]
            labels = (s.labels[train] + 1) % 4 if index == poisoned else s.labels[train]
            w, b = train_head(s.features[train], labels, weight, bias, EPOCHS, LEARNING_RATE, BATCH, 0.0,
                              1000 * 0 + r)
            vector = np.concatenate([(w - weight).T.reshape(-1), b - bias]).astype(np.float64)
            norm = float(np.linalg.norm(vector))
            vector = vector * (CLIP / norm) if norm > CLIP else vector
            answer = {"update": {s.head.weight: _encode(vector[:weight.size].reshape(weight.T.shape)),
                                 s.head.bias: _encode(vector[weight.size:])}, "samples": len(train),
                      "norm": norm, "clipped": norm > CLIP, "validation": {"samples": 0}}
            up = len(json.dumps(answer))
            updates.append(Update(f"device-{index + 1}", vector, len(train)))
        result = aggregate(updates, method, CLIP, trim_fraction=0.25)
        excluded |= set(result.excluded)
        weight = weight + result.vector[:weight.size].reshape(weight.T.shape).T
        bias = bias + result.vector[weight.size:]
        curve.append(round(float(head_accuracy(eval_features, eval_labels, weight, bias) or 0.0), 2))
    with tempfile.TemporaryDirectory() as tmp:
        down = Path(tmp) / "global.npz"
        np.savez(down, w=weight.T, b=bias)
        down_bytes = down.stat().st_size
    return curve, sorted(excluded), up, down_bytes


def flower(s, eval_features, eval_labels, rounds, devices, scratch: Path) -> dict | None:  # type: ignore[no-untyped-def]
    venv = REPO / ".edgeops" / "bench" / "flower-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        print("making the Flower venv (once): flwr[simulation]==1.42.0", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "flwr[simulation]==1.42.0", "numpy"], check=True)
    path = scratch / "scenario.npz"
    weight = s.base_tensors[s.head.weight]
    np.savez(path, features=s.features, labels=s.labels, eval_features=eval_features, eval_labels=eval_labels,
             weight=weight.T if s.head.transposed else weight, bias=s.base_tensors[s.head.bias],
             settings=json.dumps({"devices": devices, "every": EVERY, "epochs": EPOCHS, "learning_rate": LEARNING_RATE,
                                  "batch_size": BATCH}),
             **{f"part{i}": p for i, p in enumerate(s.parts)})
    out = scratch / "flower.json"
    subprocess.run([str(python), str(REPO / "bench" / "federated_flower.py"), str(path), str(rounds), str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--no-flower", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.onnx"
        write_base_model(base)
        s = scenario(base, args.devices, args.alpha)
        signal, labels = evaluation_windows()
        eval_features = _features(onnx.load(str(base)), s.head, signal, Path(tmp))
        weight = s.base_tensors[s.head.weight]
        start = head_accuracy(eval_features, labels, weight.T if s.head.transposed else weight,
                              s.base_tensors[s.head.bias])
        central = central_accuracy(s, base, EPOCHS, LEARNING_RATE, BATCH)
        rows = {}
        began = time.perf_counter()
        rows["edgeops fedavg"] = edgeops_rounds(s, eval_features, labels, args.rounds, "fedavg")
        rows["edgeops trimmed_mean, device-3 poisoned"] = edgeops_rounds(s, eval_features, labels, args.rounds,
                                                                         "trimmed_mean", poisoned=2)
        rows["edgeops fedavg, device-3 poisoned"] = edgeops_rounds(s, eval_features, labels, args.rounds, "fedavg",
                                                                   poisoned=2)
        edgeops_s = time.perf_counter() - began
        peer = None if args.no_flower else flower(s, eval_features, labels, args.rounds, args.devices, Path(tmp))
    print(f"{args.devices} devices, Dirichlet α={args.alpha}, samples per device "
          f"{[len(p) for p in s.parts]}; base head {start:.2f}%, central {central:.2f}% (target ≥ {central - 1:.2f})")
    print("| aggregation | " + " | ".join(f"r{r}" for r in range(1, args.rounds + 1)) + " | excluded |")
    print("|---|" + "---|" * (args.rounds + 1))
    for name, (curve, excluded, up, down) in rows.items():
        print(f"| {name} | " + " | ".join(f"{a:.1f}" for a in curve) + f" | {', '.join(excluded) or '—'} |")
    if peer:
        print(f"| Flower {peer['flwr']} FedAvg (simulation) | " + " | ".join(f"{a:.1f}" for a in peer["accuracy"])
              + " | — |")
    curve, _, up, down = rows["edgeops fedavg"]
    print(f"bytes per device per round, edgeops: {down} down (.npz) + {up} up (JSON, base64); "
          + (f"Flower: {peer['tensor_bytes']} each way (raw tensors, plus its gRPC framing in deployment)"
             if peer else ""))
    print(f"host wall time: edgeops rounds {edgeops_s:.1f} s for {3 * args.rounds} rounds"
          + (f"; Flower simulation {peer['wall_s']} s for {args.rounds} (Ray start included)" if peer else ""))


if __name__ == "__main__":
    main()
