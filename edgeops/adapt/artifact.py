"""The model a federated deployment runs: the built artifact with its head's input as an extra output (the
features a device trains on) and, once rounds have been released, the head the fleet learned.

A derived artifact is stored in the cache like any build, under a key made of the base artifact's key, the
head and the digest of the learned tensors; its golden set is recomputed (the head changes what the model
says) and its report carries the accuracy measured here on the repository's evaluation data.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgeops.agent.edgeops_agent import head_accuracy
from edgeops.compress.cache import GOLDEN_FILE, MODEL_FILE, Artifact, Cache, cache_key
from edgeops.compress.data import Dataset
from edgeops.errors import EdgeopsError
from edgeops.manifest.models import AdaptSpec

PASS_THROUGH = {"Softmax", "LogSoftmax", "Identity", "Flatten", "Reshape", "Squeeze"}
LINEAR = {"Gemm", "MatMul"}


class NoHead(EdgeopsError):
    """The model has no head that adaptation can train."""


@dataclass(frozen=True)
class Adaptation:
    """A learned head the fleet accepted: its tensors' digest and the base artifact (by accelerator) it fits;
    ``personal``: device name -> the digest of the head that device keeps (adapt.personalize)."""

    tensors_sha256: str
    bases: dict[str, str]
    personal: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Head:
    """Where the head lives in the model: its two initializers, the tensor feeding it (the features), and
    whether the weight is stored [classes, features] (a Gemm with transB=1)."""

    weight: str
    bias: str
    features: str
    transposed: bool
    inputs: int
    classes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def find_head(model: onnx.ModelProto, output: str | None, tensors: list[str] | None) -> Head:
    """The head named by ``tensors`` ([weight, bias]), or the Gemm / MatMul(+Add) that makes ``output`` (the
    quality output; the first output when None), looking through Softmax, Flatten and the like."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = _producers(graph)
    if tensors:
        node = next((n for n in graph.node if n.op_type in LINEAR and tensors[0] in n.input[1:2]), None)
        if node is None:
            raise NoHead(f"adapt.tensors: {tensors[0]} is not the weight of a Gemm or MatMul in the model")
    else:
        name = output or graph.output[0].name
        node = producers.get(name)
        while node is not None and node.op_type in PASS_THROUGH:
            node = producers.get(node.input[0])
        if node is None or node.op_type not in LINEAR | {"Add"}:
            raise NoHead(f"the model's output {name} is not made by a Gemm or MatMul(+Add) head "
                         f"({node.op_type if node is not None else 'a graph input'}): name its [weight, bias] in "
                         "adapt.tensors")
    bias_name: str | None = None
    if node.op_type == "Add":
        bias_name = next((i for i in node.input if i in inits), None)
        node = next((producers.get(i) for i in node.input if i not in inits), None)
        if node is None or node.op_type != "MatMul":
            raise NoHead("the model's output is an Add that does not follow a MatMul: name the head in adapt.tensors")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm":
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise NoHead(f"the head {node.name or node.output[0]} is a Gemm with transA, alpha or beta: not trained")
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    weight_name = node.input[1]
    if tensors:
        bias_name = tensors[1]
    for name, what in ((weight_name, "weight"), (bias_name, "bias")):
        if name is None:
            raise NoHead(f"the head {node.name or node.output[0]} has no bias to train (a {what} is needed)")
        if name not in inits:
            raise NoHead(f"the head's {what} {name} is not an initializer of the model")
        if inits[name].data_type != onnx.TensorProto.FLOAT:
            raise NoHead(f"the head's {what} {name} is {onnx.TensorProto.DataType.Name(inits[name].data_type)}, "
                         "not float: keep the head out of quantization (quantize.exclude_nodes) to adapt it")
    weight = numpy_helper.to_array(inits[weight_name])
    transposed = node.op_type == "Gemm" and bool(attrs.get("transB", 0))
    inputs, classes = (weight.shape[1], weight.shape[0]) if transposed else (weight.shape[0], weight.shape[1])
    assert bias_name is not None
    return Head(weight_name, bias_name, node.input[0], transposed, int(inputs), int(classes))


def head_tensors(model_path: Path, head: Head) -> dict[str, np.ndarray]:
    inits = {i.name: i for i in onnx.load(str(model_path), load_external_data=False).graph.initializer}
    return {name: numpy_helper.to_array(inits[name]).astype(np.float32) for name in (head.weight, head.bias)}


def canonical(head: Head, tensors: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(weight [features, classes], bias) as the agent trains them."""
    weight = tensors[head.weight]
    return (weight.T if head.transposed else weight), tensors[head.bias]


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name], dtype="<f4")
        digest.update(json.dumps([name, list(array.shape)]).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def tensors_file(cache: Cache, digest: str) -> Path:
    """Where the cache keeps the learned tensors of ``digest`` (an .npz)."""
    return cache.root / "adapt" / f"{digest}.npz"


def store_tensors(cache: Cache, tensors: dict[str, np.ndarray]) -> str:
    """Keep learned tensors in the cache under their digest (the rounds record the digest)."""
    digest = tensors_digest(tensors)
    if not tensors_file(cache, digest).is_file():
        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()})  # type: ignore[arg-type]
        _write_tensors_file(cache, digest, buffer.getvalue())
    return digest


def put_tensors_file(cache: Cache, digest: str, data: bytes) -> None:
    """An .npz of learned tensors from elsewhere (the shared ledger) into the cache, if it holds ``digest``."""
    path = _write_tensors_file(cache, digest, data)
    try:
        load_tensors(cache, digest)
    except Exception:  # noqa: BLE001 - numpy raises several unrelated types for a damaged file
        path.unlink(missing_ok=True)
        raise EdgeopsError(f"the learned head {digest[:12]} the ledger holds does not hash to its digest",
                           hint="the shared ledger is damaged: run edgeops adapt again") from None


def _write_tensors_file(cache: Cache, digest: str, data: bytes) -> Path:
    path = tensors_file(cache, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as handle:
        handle.write(data)
    Path(handle.name).replace(path)
    return path


def load_tensors(cache: Cache, digest: str) -> dict[str, np.ndarray]:
    path = tensors_file(cache, digest)
    if not path.is_file():
        raise EdgeopsError(f"the learned head {digest[:12]} the ledger names is in neither this controller's cache "
                           f"({path}) nor the ledger", hint="run edgeops adapt again")
    with np.load(path, allow_pickle=False) as data:
        found = {name: data[name] for name in data.files}
    if tensors_digest(found) != digest:
        raise EdgeopsError(f"{path} does not hash to its name: the cache is damaged", hint="delete it")
    return found


def _with_tensors(model: onnx.ModelProto, tensors: dict[str, np.ndarray]) -> None:
    """Replace initializers in place, keeping their encoding (raw bytes stay the same length and place: a
    release that changes only these is a small patch on the wire)."""
    for init in model.graph.initializer:
        if init.name in tensors:
            array = np.asarray(tensors[init.name], dtype=np.float32)
            if tuple(init.dims) != array.shape:
                raise EdgeopsError(f"learned tensor {init.name} has shape {list(array.shape)}, the model's "
                                   f"{list(init.dims)}")
            if init.HasField("raw_data"):
                init.raw_data = array.astype("<f4").tobytes()
            else:
                del init.float_data[:]
                init.float_data.extend(array.reshape(-1).tolist())


def adaptable(base: Artifact, adapt: AdaptSpec, cache: Cache, tensors_sha256: str | None = None,
              build: bool = True, evaluation: Callable[[], Dataset] | None = None) -> Artifact | None:
    """The artifact a federated deployment runs: ``base`` plus the features output, with the learned head
    ``tensors_sha256`` (None: the base's own head). Cached; a second call is free (the key needs neither the
    model nor the data: the head follows from the base and ``adapt.tensors``); None when not in the cache and
    not ``build``. Its report's quality is the accuracy on ``evaluation()`` (the repository's data)."""
    key = cache_key({"base": base.key, "head": adapt.tensors, "tensors": tensors_sha256})
    found = cache.get(key)
    if found is not None:
        return found
    report = base.report
    model = onnx.load(str(base.model))
    head = find_head(model, report["artifact"].get("quality_output"), adapt.tensors)
    if not build:
        return None
    if head.features not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.helper.make_tensor_value_info(head.features, onnx.TensorProto.FLOAT, None))
    learned = load_tensors(cache, tensors_sha256) if tensors_sha256 else head_tensors(base.model, head)
    _with_tensors(model, learned)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        path.write_bytes(model.SerializeToString())
        golden = Path(tmp) / GOLDEN_FILE
        output = report["artifact"].get("quality_output")
        accuracy = _golden(base.golden, golden, path, output)
        data = path.read_bytes()
        new = json.loads(json.dumps(report))
        new["key"] = key
        new["artifact"].update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
                               golden_sha256=hashlib.sha256(golden.read_bytes()).hexdigest())
        new["adapt"] = {"base_key": base.key, "head": head.as_dict(), "tensors_sha256": tensors_sha256}
        scored = evaluation() if tensors_sha256 and new.get("stages") and evaluation is not None else None
        if scored is not None and scored.labels is not None:
            quality = new["stages"][-1]["quality"]
            value = _accuracy(path, output, scored)
            quality.update(value=value, drop=round(float(quality.get("baseline") or value) - value, 4), passed=True,
                           golden_accuracy=accuracy, adapted=True)
        extra = {name: base.directory / name for name in _extra_files(base)}
        return cache.put(key, {MODEL_FILE: path, GOLDEN_FILE: golden, **extra}, new)


def _extra_files(base: Artifact) -> list[str]:
    return sorted(p.name for p in base.directory.iterdir()
                  if p.is_file() and p.name not in (MODEL_FILE, GOLDEN_FILE, "report.json"))


def _golden(source: Path, target: Path, model: Path, output: str | None) -> float | None:
    """The base's golden inputs with what the new model says (``expected``); its accuracy on their labels."""
    import onnxruntime as ort

    with np.load(source, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feeds = {i.name: arrays[f"in.{i.name}"] for i in session.get_inputs()}
    arrays["expected"] = session.run([output or names[0]], feeds)[0]
    np.savez(target, **arrays)
    if "labels" not in arrays:
        return None
    return float(np.mean(np.argmax(arrays["expected"], axis=-1) == arrays["labels"]) * 100)


def _accuracy(model: Path, output: str | None, data: Dataset) -> float:
    import onnxruntime as ort

    assert data.labels is not None
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = output or session.get_outputs()[0].name
    chunks = [session.run([name], {k: v[i:i + 256] for k, v in data.inputs.items()})[0]
              for i in range(0, data.count, 256)]
    return round(float(np.mean(np.argmax(np.concatenate(chunks), axis=-1) == data.labels) * 100), 4)


def features_of(model: Path, head: Head, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The features the head sees for ``inputs`` (run here, on the host CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    count = len(next(iter(inputs.values())))
    chunks = [session.run([head.features], {k: v[i:i + 256] for k, v in inputs.items()})[0].reshape(-1, head.inputs)
              for i in range(0, count, 256)]
    return np.concatenate(chunks).astype(np.float32)


def accuracy_of(head: Head, tensors: dict[str, np.ndarray], features: np.ndarray, labels: np.ndarray) -> float:
    weight, bias = canonical(head, tensors)
    return float(head_accuracy(features, labels, weight, bias) or 0.0)
