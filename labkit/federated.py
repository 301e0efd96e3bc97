"""A federated scenario on the lab: the wearable CNN with a head trained on two of its four activities (the base
model), and the rest of its labelled training windows spread over the devices non-IID (Dirichlet α), written
where each device's application would append them. Also the central reference: the same head trained, with the
same optimiser, on all the devices' samples pooled (what federated rounds should approach)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgeops.adapt.artifact import Head, features_of, find_head, head_tensors
from edgeops.agent.edgeops_agent import head_accuracy, train_head

REPO = Path(__file__).resolve().parents[1]
WEARABLE = REPO / "examples" / "models" / "wearable_cnn.onnx"
TRAINING = REPO / "examples" / "data" / "wearable_training.npz"
EVALUATION = REPO / "examples" / "data" / "wearable_evaluation.npz"
BASE_CLASSES = (0, 1)  # rest and walk: the base head never saw run or cycle


@dataclass(frozen=True)
class Scenario:
    head: Head
    features: np.ndarray          # of every training window (host), for the central reference
    labels: np.ndarray
    parts: list[np.ndarray]       # per device: indices into the training windows
    base_tensors: dict[str, np.ndarray]


def dirichlet_split(labels: np.ndarray, devices: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Each class's samples spread over the devices in Dirichlet(α) shares (small α: each device sees few
    classes). Every device gets at least one sample."""
    parts: list[list[int]] = [[] for _ in range(devices)]
    for label in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet([alpha] * devices)
        cuts = (np.cumsum(shares)[:-1] * len(index)).astype(int)
        for device, chunk in enumerate(np.split(index, cuts)):
            parts[device].extend(chunk.tolist())
    for device in range(devices):
        if not parts[device]:
            donor = max(range(devices), key=lambda d: len(parts[d]))
            parts[device].append(parts[donor].pop())
    return [np.array(sorted(p)) for p in parts]


def training_windows() -> tuple[np.ndarray, np.ndarray]:
    with np.load(TRAINING) as data:
        return data["signal"].astype(np.float32), data["labels"].astype(np.int64)


def evaluation_windows() -> tuple[np.ndarray, np.ndarray]:
    with np.load(EVALUATION) as data:
        return data["signal"].astype(np.float32), data["labels"].astype(np.int64)


def write_base_model(path: Path, epochs: int = 30, learning_rate: float = 0.05) -> tuple[str, Head]:
    """The wearable CNN whose head was retrained from zero on the base classes only; (sha256, head)."""
    model = onnx.load(str(WEARABLE))
    head = find_head(model, None, None)
    signal, labels = training_windows()
    features = _features(model, head, signal, path.parent)
    seen = np.isin(labels, BASE_CLASSES)
    weight = np.zeros((head.inputs, head.classes), np.float32)
    bias = np.zeros(head.classes, np.float32)
    weight, bias = train_head(features[seen], labels[seen], weight, bias, epochs, learning_rate, 32, 0.0, 0)
    for init in model.graph.initializer:
        if init.name == head.weight:
            init.raw_data = np.ascontiguousarray(weight.T if head.transposed else weight, "<f4").tobytes()
        elif init.name == head.bias:
            init.raw_data = np.ascontiguousarray(bias, "<f4").tobytes()
    data = model.SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), head


def _features(model: onnx.ModelProto, head: Head, signal: np.ndarray, scratch: Path,
              input_name: str = "signal") -> np.ndarray:
    with_features = onnx.ModelProto()
    with_features.CopyFrom(model)
    with_features.graph.output.append(onnx.helper.make_tensor_value_info(head.features, onnx.TensorProto.FLOAT, None))
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / ".features.onnx"
    path.write_bytes(with_features.SerializeToString())
    try:
        return features_of(path, head, {input_name: signal})
    finally:
        path.unlink()


def scenario(base_model: Path, devices: int, alpha: float = 0.5, seed: int = 0) -> Scenario:
    model = onnx.load(str(base_model))
    head = find_head(model, None, None)
    signal, labels = training_windows()
    features = _features(model, head, signal, base_model.parent)
    parts = dirichlet_split(labels, devices, alpha, np.random.default_rng(seed))
    return Scenario(head, features, labels, parts, head_tensors(base_model, head))


def write_device_samples(root: Path, deployment: str, part: np.ndarray, flip_labels: bool = False) -> Path:
    """The device's application's samples: <root>/data/<deployment>/samples-000.npz (``flip_labels``: a
    poisoned device, every label moved to the next class)."""
    signal, labels = training_windows()
    chosen = labels[part]
    if flip_labels:
        chosen = (chosen + 1) % 4
    directory = root / "data" / deployment
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "samples-000.npz"
    np.savez(path, signal=signal[part], labels=chosen)
    return path


def central_accuracy(s: Scenario, base_model: Path, epochs: int, learning_rate: float, batch_size: int = 32,
                     validation_fraction: float = 0.2) -> float:
    """The head trained on all the devices' training samples pooled (their local validation shares held out,
    as on the devices), same optimiser, scored on the evaluation windows."""
    every = max(2, int(round(1.0 / validation_fraction))) if validation_fraction else 0
    train = np.concatenate([p[np.arange(len(p)) % every != every - 1] if every else p for p in s.parts])
    weight = s.base_tensors[s.head.weight]
    weight = weight.T if s.head.transposed else weight
    w, b = train_head(s.features[train], s.labels[train], weight, s.base_tensors[s.head.bias], epochs,
                      learning_rate, batch_size, 0.0, 0)
    signal, labels = evaluation_windows()
    features = _features(onnx.load(str(base_model)), s.head, signal, base_model.parent)
    return float(head_accuracy(features, labels, w, b) or 0.0)


def write_manifest(root: Path, name: str, model: Path, sha256: str, adapt: str, fleet: str = "lab") -> Path:
    """A deployment of ``model`` (uncompressed: the head stays float) to the lab fleet with ``adapt`` (YAML
    lines of the adapt: section, indented by four)."""
    wearable = (root / "manifests" / "wearable.yaml").read_text()
    slo = wearable[wearable.index("  slo:"):wearable.index("  targets:")]
    text = f"""apiVersion: edgeops/v1
kind: Deployment
metadata:
  name: {name}
spec:
  model:
    path: {Path('..') / model.relative_to(root)}
    sha256: {sha256}
    inputs:
      - {{name: signal, shape: [batch, 3, 128], dtype: float32}}
    outputs:
      - {{name: logits, shape: [batch, 4], dtype: float32}}
  data:
    calibration: ../examples/data/wearable_calibration.npz
    evaluation: ../examples/data/wearable_evaluation.npz
  quality:
    metric: accuracy
    max_drop: 1.0
{slo}  targets:
    - fleet: {fleet}
  rollout:
    waves: [100%]
    parallelism: 8
    max_failed_devices: 0
    on_failure: rollback
    verification: {{runs: 100, budget_s: 5}}
    regression: {{latency_p50_pct: 100, latency_p95_pct: 200, energy_pct: 200}}  # the gate is not under test here
  adapt:
{adapt}"""
    path = root / "manifests" / f"{name}.yaml"
    path.write_text(text)
    return path


def write_float_digits(root: Path, name: str, fleet: str) -> Path:
    """A deployment of the digits CNN, uncompressed, to ``fleet``, from a copy of the model under models/ (that
    a test then changes as a commit would)."""
    import shutil

    (root / "models").mkdir(exist_ok=True)
    model = root / "models" / f"{name}.onnx"
    shutil.copyfile(REPO / "examples" / "models" / "digits_cnn.onnx", model)
    camera = (root / "manifests" / "camera.yaml").read_text()
    text = camera[:camera.index("  recipe:")] + camera[camera.index("  quality:"):camera.index("  targets:")]
    text = text.replace("name: meter-digits", f"name: {name}").replace("../examples/models/digits_cnn.onnx",
                                                                         f"../models/{name}.onnx")
    # these deployments test what moves, not speed: the camera's 10 ms p95 is within a stall of a loaded
    # 2-core test host, where a Failed gate would halt the rollout the test goes on from
    text = text.replace("latency_p95_ms: 10", "latency_p95_ms: 500")
    path = root / "manifests" / f"{name}.yaml"
    path.write_text(text + f"  targets:\n    - fleet: {fleet}\n  rollout:\n    waves: [1, 100%]\n")
    return model


def retrain_head(path: Path, epochs: int = 2, learning_rate: float = 0.01) -> None:
    """The digits model file with its head retrained a few epochs on the training data, as a commit would
    change it: same graph and size, new head tensors."""
    model = onnx.load(str(path))
    head = find_head(model, None, None)
    with np.load(REPO / "examples" / "data" / "digits_training.npz") as data:
        images, labels = data["image"].astype(np.float32), data["labels"].astype(np.int64)
    features = _features(model, head, images, path.parent, "image")
    inits = {i.name: i for i in model.graph.initializer}
    weight = onnx.numpy_helper.to_array(inits[head.weight])
    weight = weight.T if head.transposed else weight
    bias = onnx.numpy_helper.to_array(inits[head.bias])
    weight, bias = train_head(features, labels, weight, bias, epochs, learning_rate)
    inits[head.weight].raw_data = np.ascontiguousarray(weight.T if head.transposed else weight, "<f4").tobytes()
    inits[head.bias].raw_data = np.ascontiguousarray(bias, "<f4").tobytes()
    path.write_bytes(model.SerializeToString())
