"""Run a recipe on a deployment's model, evaluate every stage, gate on quality, cache the result."""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeops import __version__
from edgeops.build.cache import Artifact, Cache, cache_key, explain
from edgeops.build.data import file_sha256
from edgeops.errors import BuildError, InputError
from edgeops.spec.models import Deployment, RecipeStep
from edgeops.spec.workspace import Document, Workspace

REPORT_SCHEMA = "edgeops.build-report/v1"


def default_cache(ws: Workspace) -> Cache:
    import os

    return Cache(Path(os.environ.get("EDGEOPS_CACHE_DIR") or ws.root / ".edgeops" / "cache"))


def build_inputs(doc: Document[Deployment], accelerator: str) -> dict[str, Any]:
    """Everything that determines the artifact; its canonical hash is the cache key."""
    spec = doc.obj.spec
    recipe = spec.recipe_for_accelerator(accelerator)
    extra_files = {}
    for index, step in enumerate(recipe):
        if step.kind == "distill" and step.distill and step.distill.student.onnx:  # type: ignore[union-attr]
            extra_files[f"recipe[{index}].student"] = file_sha256(doc.resolve(step.distill.student.onnx))
    if any(step.kind == "distill" for step in recipe):
        training = spec.data.training or spec.data.calibration
        extra_files["training"] = file_sha256(doc.resolve(training))
    model_path = doc.resolve(spec.model.path)
    _check_onnx_file(doc, model_path)
    versions = {"edgeops": __version__, "onnx": importlib.metadata.version("onnx"),
                "onnxruntime": importlib.metadata.version("onnxruntime"),
                "numpy": importlib.metadata.version("numpy")}
    if "training" in extra_files:
        versions["torch"] = importlib.metadata.version("torch")
    return {
        "model_sha256": file_sha256(model_path),
        "calibration_sha256": file_sha256(doc.resolve(spec.data.calibration)),
        "evaluation_sha256": file_sha256(doc.resolve(spec.data.evaluation)),
        "extra_files": extra_files,
        "model_io": spec.model.model_dump(mode="json", include={"inputs", "outputs"}),
        "recipe": [step.model_dump(mode="json", exclude_none=True) for step in recipe],
        "quality": spec.quality.model_dump(mode="json"),
        "golden_samples": spec.data.golden_samples,
        "accelerator": accelerator,
        "versions": versions,
    }


def _check_onnx_file(doc: Document[Deployment], path: Path) -> None:
    with path.open("rb") as handle:
        head = handle.read(64)
    # an ONNX ModelProto starts with field 1 (ir_version, varint): byte 0x08
    if not head or head[0] != 0x08:
        raise doc.error(("spec", "model", "path"), f"{doc.obj.spec.model.path} is not an ONNX model "
                                                   "(expected a serialized ModelProto)")


@dataclass
class BuildResult:
    artifact: Artifact
    report: dict[str, Any]
    why: list[str] = field(default_factory=list)


def slot(doc: Document[Deployment], accelerator: str) -> str:
    return f"{doc.name}.{accelerator}"


def cached(doc: Document[Deployment], accelerator: str, cache: Cache) -> BuildResult | None:
    """The artifact the current inputs would build, if the cache has it; never builds."""
    hit = cache.get(cache_key(build_inputs(doc, accelerator)))
    return BuildResult(hit, hit.report, ["cache hit"]) if hit else None


def build(doc: Document[Deployment], accelerator: str, cache: Cache, *, force: bool = False,
          progress: Callable[[str], None] = lambda message: None) -> BuildResult:
    """Build (or fetch from the cache) the artifact of ``doc`` for one accelerator class."""
    inputs = build_inputs(doc, accelerator)
    key = cache_key(inputs)
    why = explain(cache.previous_inputs(slot(doc, accelerator)), inputs)
    if not force and (hit := cache.get(key)):
        cache.remember(slot(doc, accelerator), inputs)
        return BuildResult(hit, hit.report, ["cache hit: " + key[:16]])
    with tempfile.TemporaryDirectory(prefix="edgeops-build-") as tmp:
        report, files = _run(doc, accelerator, inputs, key, Path(tmp), progress)
        artifact = cache.put(key, files, report)
    cache.remember(slot(doc, accelerator), inputs)
    return BuildResult(artifact, report, why)


def _load_model_checked(doc: Document[Deployment], path: Path) -> None:
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - onnx raises several unrelated types for corrupt files
        raise doc.error(("spec", "model", "path"), f"{doc.obj.spec.model.path} is not a valid ONNX model "
                                                   f"({str(exc).splitlines()[0][:120]})") from None
    declared = [t.name for t in doc.obj.spec.model.inputs]
    actual = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if declared != actual:
        raise doc.error(("spec", "model", "inputs"), f"model inputs are {actual}, the manifest declares {declared}")


def _run(doc: Document[Deployment], accelerator: str, inputs: dict[str, Any], key: str, work: Path,
         progress: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Path]]:
    import numpy as np

    from edgeops.build.data import load_dataset
    from edgeops.build.evaluate import Evaluator, output_index, run_all, session
    from edgeops.build.steps import StepContext

    spec = doc.obj.spec
    source = work / "00-original.onnx"
    shutil.copyfile(doc.resolve(spec.model.path), source)
    _load_model_checked(doc, source)
    calibration = load_dataset(doc, "calibration")
    evaluation = load_dataset(doc, "evaluation")
    evaluator = Evaluator(spec.quality, evaluation)
    progress("evaluating the original model")
    evaluator.reference_from(source)
    original = evaluator.measure(source)
    evaluator.baseline = original.quality.value
    stages: list[dict[str, Any]] = [_stage(0, "original", {}, original, original, [])]
    current = source
    recipe = spec.recipe_for_accelerator(accelerator)
    for index, step in enumerate(recipe, start=1):
        ctx = StepContext(work, accelerator, calibration, evaluator, source, progress, index)
        progress(f"step {index}/{len(recipe)}: {step.kind}")
        result = _run_step(step, current, ctx, doc, accelerator, index)
        measurement = result.measurement or evaluator.measure(result.path, result.notes)
        stage = _stage(index, step.kind, step.options.model_dump(mode="json", exclude_none=True),
                       measurement, original, result.notes)
        stage["candidates"] = [c.as_dict() for c in result.candidates]
        stage.update(result.extra)
        stages.append(stage)
        recovery_follows = any(later.kind == "distill" for later in recipe[index:])
        if not measurement.quality.passed and recovery_follows:
            stage["notes"].append("below the quality goal; a later distill step recovers accuracy, so the gate "
                                  "applies after it")
        elif not measurement.quality.passed:
            base = ("spec", "recipe_for", accelerator) if accelerator in spec.recipe_for else ("spec", "recipe")
            where = f"{doc.display}:{doc.lines.get(base + (index - 1,), '?')}"
            raise BuildError(_gate_message(where, index, step, measurement.quality, spec.quality),
                             hint="no artifact was written; loosen spec.quality or make the step gentler")
        current = result.path
    progress("writing the golden set")
    golden = work / "golden.npz"
    sample = evaluation.take(spec.data.golden_samples)
    sess = session(current, threads=0)
    expected = run_all(sess, sample)[output_index(sess, spec.quality)]
    arrays = {f"in.{k}": v for k, v in sample.inputs.items()}
    arrays.update(reference=evaluator.reference[:sample.count], expected=expected)
    if sample.labels is not None:
        arrays["labels"] = sample.labels
    np.savez(golden, **arrays)
    model_bytes = current.read_bytes()
    report = {
        "schema": REPORT_SCHEMA,
        "deployment": doc.name,
        "accelerator": accelerator,
        "key": key,
        "inputs": inputs,
        "artifact": {"sha256": hashlib.sha256(model_bytes).hexdigest(), "size_bytes": len(model_bytes),
                     "golden_sha256": file_sha256(golden), "quality_output": _output_name(sess, spec.quality)},
        "stages": stages,
        "passed": True,
    }
    return report, {"model.onnx": current, "golden.npz": golden}


def _output_name(sess: Any, goal: Any) -> str:
    from edgeops.build.evaluate import output_index

    return str(sess.get_outputs()[output_index(sess, goal)].name)


def _run_step(step: RecipeStep, current: Path, ctx: Any, doc: Document[Deployment], accelerator: str,
              index: int) -> Any:
    from edgeops.build.prune import prune
    from edgeops.build.quantize import quantize

    if step.kind == "quantize":
        return quantize(current, step.quantize, ctx)  # type: ignore[arg-type]
    if step.kind == "prune":
        return prune(current, step.prune, ctx)  # type: ignore[arg-type]
    try:
        from edgeops.build.distill import distill
    except ImportError as exc:
        raise InputError([doc.problem(("spec", "recipe", index - 1, "distill"),
                                      f"distillation needs PyTorch ({exc}); run: pip install 'edgeops[distill]'")]) from None
    return distill(current, step.distill, ctx, doc)  # type: ignore[arg-type]


def _stage(index: int, kind: str, options: dict[str, Any], m: Any, original: Any, notes: list[str]) -> dict[str, Any]:
    def ratio(a: float, b: float) -> float | None:
        return None if not b or math.isnan(a) or math.isnan(b) else round(a / b, 3)

    return {
        "index": index, "step": kind, "options": options, "notes": notes,
        "size_bytes": m.size_bytes, "zstd_bytes": m.zstd_bytes, "parameters": m.parameters, "ops": m.ops,
        "quality": {"metric": m.quality.metric, "value": m.quality.value, "baseline": m.quality.baseline,
                    "drop": m.quality.drop, "passed": m.quality.passed},
        "latency_ms": {"p50": m.latency_p50_ms, "p95": m.latency_p95_ms, "where": "host CPU, 1 thread, batch 1"},
        "size_ratio": ratio(original.size_bytes, m.size_bytes),
        "zstd_ratio": ratio(original.zstd_bytes, m.zstd_bytes),
        "speedup": ratio(original.latency_p50_ms, m.latency_p50_ms),
    }


def _gate_message(where: str, index: int, step: RecipeStep, q: Any, goal: Any) -> str:
    mode = getattr(step.options, "mode", None) or getattr(step.options, "method", None) or "student"
    allowed = goal.max_drop
    if q.metric == "max_abs_error":
        detail = f"max abs error {q.value:.4g} > {allowed:g} allowed"
    else:
        unit = " points" if q.metric in ("accuracy", "top1_agreement") else ""
        unit = "%" if goal.drop == "relative" else unit
        detail = f"{q.metric} {q.value:.4g} vs {q.baseline:.4g} for the original (drop {q.drop:.3g}{unit} > {allowed:g} allowed)"
    return f"{where}: recipe step {index} ({step.kind} {mode}) breaks the quality goal: {detail}"
