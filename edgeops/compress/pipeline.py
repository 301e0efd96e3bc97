"""Run a recipe on a model, evaluate every stage, gate on quality, cache the result."""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgeops import __version__
from edgeops.compress.cache import Artifact, Cache, CandidateCache, cache_key, explain
from edgeops.compress.data import file_sha256
from edgeops.compress.request import BuildRequest
from edgeops.errors import BuildError, InputError
from edgeops.manifest.models import QualityGoal, RecipeStep
from edgeops.metrics import PERCENT_POINTS, golden_size, one_sample_points

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

    from edgeops.compress.evaluate import Measurement, Quality
    from edgeops.compress.steps import Step

# part of the cache key: a report with new fields is a new cache entry (v2: the host p50's 95% interval;
# v3: latency by time budget, zstd level 9, screened candidates; v4: the speed claim, an A/B with foreign load)
REPORT_SCHEMA = "edgeops.compress-report/v4"


def build_inputs(request: BuildRequest) -> dict[str, Any]:
    """Everything that determines the artifact; its canonical hash is the cache key."""
    recipe = request.recipe
    extra_files = {}
    for index, step in enumerate(recipe):
        if step.distill and step.distill.student.onnx:
            extra_files[f"recipe[{index}].student"] = file_sha256(request.source.resolve(step.distill.student.onnx))
    if any(step.kind == "distill" for step in recipe):
        extra_files["training"] = file_sha256(request.data_path("training"))
    if request.generation is not None:
        extra_files["tokenizer"] = file_sha256(request.source.resolve(request.generation.tokenizer))
        extra_files["prompts"] = file_sha256(request.source.resolve(request.generation.prompts))
    model_path = request.model_path
    _check_onnx_file(request, model_path)
    for path in _external_data(request, model_path):
        extra_files[f"external:{path.name}"] = file_sha256(path)
    versions = {"edgeops": __version__, "report": REPORT_SCHEMA, "onnx": importlib.metadata.version("onnx"),
                "onnxruntime": importlib.metadata.version("onnxruntime"),
                "numpy": importlib.metadata.version("numpy")}
    if "training" in extra_files:
        versions["torch"] = importlib.metadata.version("torch")
    return {
        "model_sha256": file_sha256(model_path),
        "calibration_sha256": file_sha256(request.data_path("calibration")),
        "evaluation_sha256": file_sha256(request.data_path("evaluation")),
        "extra_files": extra_files,
        "model_io": request.model.model_dump(mode="json", include={"inputs", "outputs"}),
        "recipe": [step.model_dump(mode="json", exclude_none=True) for step in recipe],
        "quality": request.quality.model_dump(mode="json"),
        "golden_samples": request.data.golden_samples,
        "accelerator": request.accelerator,
        **({"generation": request.generation.model_dump(mode="json")} if request.generation else {}),
        "versions": versions,
    }


def _external_data(request: BuildRequest, path: Path) -> list[Path]:
    """The files beside the model that hold its weights (onnxruntime-genai's builder writes model.onnx.data)."""
    if not _may_have_external_data(path):
        return []  # the usual case, answered without importing onnx (a cache hit stays cheap)
    import onnx

    from edgeops.manifest.checks import external_data_files

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable model is reported by _load_model_checked, located
        return []
    files, problems = external_data_files(model, path)
    missing = [f.name for f in files if not f.is_file()]
    if problems or missing:
        raise request.source.error(("spec", "model", "path"), f"{request.model.path}: " + (
            problems[0] if problems else f"keeps weights in {', '.join(missing)}, which is not beside it"))
    return files


def _may_have_external_data(path: Path) -> bool:
    """False only when the model surely keeps every tensor inside: a tensor kept outside names its file under
    the key "location", so a file without those bytes has none."""
    with path.open("rb") as handle:
        tail = b""
        while chunk := handle.read(1 << 20):
            if b"location" in tail + chunk:
                return True
            tail = chunk[-8:]
    return False


def _check_onnx_file(request: BuildRequest, path: Path) -> None:
    with path.open("rb") as handle:
        head = handle.read(64)
    # an ONNX ModelProto starts with field 1 (ir_version, varint): byte 0x08
    if not head or head[0] != 0x08:
        raise request.source.error(("spec", "model", "path"), f"{request.model.path} is not an ONNX model "
                                                              "(expected a serialized ModelProto)")


@dataclass
class BuildResult:
    artifact: Artifact
    report: dict[str, Any]
    why: list[str] = field(default_factory=list)


def cached(request: BuildRequest, cache: Cache) -> BuildResult | None:
    """The artifact the current inputs would build, if the cache has it; never builds."""
    hit = cache.get(cache_key(build_inputs(request)))
    return BuildResult(hit, hit.report, ["cache hit"]) if hit else None


def build(request: BuildRequest, cache: Cache, *, force: bool = False,
          progress: Callable[[str], None] = lambda message: None) -> BuildResult:
    """Build (or fetch from the cache) the artifact ``request`` describes."""
    inputs = build_inputs(request)
    key = cache_key(inputs)
    why = explain(cache.previous_inputs(request.slot), inputs)
    if not force and (hit := cache.get(key)):
        cache.remember(request.slot, inputs)
        return BuildResult(hit, hit.report, ["cache hit: " + key[:16]])
    with tempfile.TemporaryDirectory(prefix="edgeops-build-") as tmp:
        report, files = _run(request, inputs, key, Path(tmp), progress, CandidateCache(cache.root / "candidates"))
        artifact = cache.put(key, files, report)
    cache.remember(request.slot, inputs)
    return BuildResult(artifact, report, why)


def _runs_in_onnxruntime(path: Path) -> None:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _load_model_checked(request: BuildRequest, path: Path) -> None:
    import onnx

    try:
        model = onnx.load(str(path))
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            if "No Op registered" not in str(exc):
                raise
            _runs_in_onnxruntime(path)  # onnxruntime's own fused ops (onnxruntime-genai's builder writes them)
    except Exception as exc:  # noqa: BLE001 - onnx raises several unrelated types for corrupt files
        raise request.source.error(("spec", "model", "path"), f"{request.model.path} is not a valid ONNX model "
                                                              f"({str(exc).splitlines()[0][:120]})") from None
    if request.generative:
        return  # a decoder's inputs are its layout, checked when it is first run
    declared = [t.name for t in request.model.inputs]
    actual = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if declared != actual:
        raise request.source.error(("spec", "model", "inputs"),
                                   f"model inputs are {actual}, the manifest declares {declared}")


def _run(request: BuildRequest, inputs: dict[str, Any], key: str, work: Path, progress: Callable[[str], None],
         candidates: CandidateCache | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    import numpy as np

    from edgeops.compress.data import load_dataset
    from edgeops.compress.evaluate import Evaluator, output_index, run_all, session
    from edgeops.compress.steps import StepContext

    goal = request.quality
    source = work / "00-original.onnx"
    if any(name.startswith("external:") for name in inputs["extra_files"]):  # one file from here on: inlined
        import onnx

        onnx.save(onnx.load(str(request.model_path)), str(source))
    else:
        shutil.copyfile(request.model_path, source)
    _load_model_checked(request, source)
    if request.generative:
        from edgeops.generative.evaluate import GenerativeEvaluator, prefill_windows
        from edgeops.generative.text import load_corpus

        assert request.generation is not None
        corpus = load_corpus(request)
        head_dim = request.generation.head_dim
        calibration = prefill_windows(corpus.calibration, source, head_dim=head_dim)
        evaluator: Any = GenerativeEvaluator(goal, corpus, request.generation,
                                             prefill_windows(corpus.texts, source, head_dim=head_dim))
    else:
        calibration = load_dataset(request, "calibration")
        evaluation = load_dataset(request, "evaluation")
        evaluator = Evaluator(goal, evaluation)
    recipe = request.recipe
    steps = [step_for(request, index) for index in range(len(recipe))]
    first = StepContext(work, request, calibration, evaluator, source, progress, 1, candidates=candidates)
    settle = steps[0].start(source, first) if steps else (lambda: None)
    progress("evaluating the original model")
    try:
        original = evaluator.reference_from(source, settle)
    except BaseException:
        if steps:
            steps[0].close()
        raise
    finally:
        settle()  # no child process outlives a failed evaluation
    evaluator.baseline = original.quality.value
    stages: list[dict[str, Any]] = [_stage(0, "original", {}, original, original, [])]
    current, before = source, original
    warnings: list[str] = []
    for index, step in enumerate(recipe, start=1):
        ctx = StepContext(work, request, calibration, evaluator, source, progress, index, before, candidates)
        progress(f"step {index}/{len(recipe)}: {step.kind}")
        result = steps[index - 1].run(current, ctx)
        measurement = result.measurement or evaluator.measure(result.path, result.notes)
        stage = _stage(index, step.kind, step.options.model_dump(mode="json", exclude_none=True),
                       measurement, original, result.notes)
        stage["candidates"] = [c.as_dict() for c in result.candidates]
        stage.update(result.extra)
        warnings += [f"step {index} ({step.kind}): {w}" for w in result.warnings]
        stages.append(stage)
        recovery_follows = any(later.kind == "distill" for later in recipe[index:])
        if not measurement.quality.passed and recovery_follows:
            stage["notes"].append("below the quality goal; a later distill step recovers accuracy, so the gate "
                                  "applies after it")
        elif not measurement.quality.passed and goal.enforce:
            where = request.source.where(request.step_loc(index - 1))
            raise BuildError(_gate_message(where, index, step, measurement.quality, goal),
                             hint="no artifact was written; loosen spec.quality or make the step gentler")
        elif not measurement.quality.passed:
            where = request.source.where(request.step_loc(index - 1))
            warnings.append(_gate_message(where, index, step, measurement.quality, goal,
                                          "misses the quality goal (not enforced: spec.quality.enforce is false)"))
        current, before = result.path, measurement
    speed: dict[str, Any] | None = None
    if request.accelerator != "gpu" and not request.generative and current != source:
        progress("timing the original and the result side by side")
        speed = evaluator.speed_claim(source, current)
        stages[-1]["speedup"] = speed["speedup"]   # the table's last ratio is the claim, or none
        if not speed["measurable"]:
            warnings.append(f"no speed claim: {speed['why']}")
        elif speed["speedup"] < 1 / 1.02:
            warnings.append(f"the result is slower than the original on the host: p50 {speed['artifact_p50_ms']:.3f} "
                            f"ms vs {speed['original_p50_ms']:.3f} ms ({speed['method']}; devices measure for "
                            "themselves)")
    progress("writing the golden set")
    golden = work / "golden.npz"
    files = {"model.onnx": current, "golden.npz": golden}
    extra_artifact: dict[str, Any] = {}
    if request.generative:
        from edgeops.generative.evaluate import layout

        assert request.generation is not None
        arrays = evaluator.golden_arrays(current)
        tokens = int((arrays["reference"] >= 0).sum())
        golden_report = {"samples": len(arrays["prompts"]), "tokens": tokens, "texts": len(arrays["texts"]),
                         "one_sample_points": round(100 / tokens, 4) if tokens else 0.0,
                         "chosen": "every golden prompt of spec.generation.prompts, every evaluation text"}
        quality_output = "logits"
        tokenizer = request.source.resolve(request.generation.tokenizer)
        files["tokenizer.json"] = tokenizer
        t = evaluator.corpus.tokenizer
        extra_artifact["generation"] = {**layout(current, request.generation.head_dim), "bos": t.bos, "eos": t.eos, "pad": t.pad,
                                        "tokenizer_sha256": file_sha256(tokenizer)}
    else:
        count = request.data.golden_samples or golden_size(goal.metric, goal.max_drop, goal.drop == "relative",
                                                           original.quality.value, evaluation.count)
        sample = evaluation.take(count)
        sess = session(current, threads=0)
        last = evaluator.last_outputs
        expected = last[1][:sample.count] if last is not None and last[0] == current \
            else run_all(sess, sample)[output_index(sess, goal)]  # the result's outputs, from its evaluation
        arrays = {f"in.{k}": v for k, v in sample.inputs.items()}
        arrays.update(reference=evaluator.reference[:sample.count], expected=expected)
        if sample.labels is not None:
            arrays["labels"] = sample.labels
        golden_report = {"samples": sample.count, "one_sample_points": one_sample_points(goal.metric, sample.count),
                         "chosen": "spec.data.golden_samples" if request.data.golden_samples else
                         "sized from quality.max_drop: one differing sample is at most half of it"}
        quality_output = _output_name(sess, goal)
    np.savez(golden, **arrays)
    model_bytes = current.read_bytes()
    report = {
        "schema": REPORT_SCHEMA,
        "deployment": request.name,
        "accelerator": request.accelerator,
        "key": key,
        "inputs": inputs,
        "artifact": {"sha256": hashlib.sha256(model_bytes).hexdigest(), "size_bytes": len(model_bytes),
                     "golden_sha256": file_sha256(golden), "quality_output": quality_output, **extra_artifact},
        "stages": stages,
        **({"speed": speed} if speed else {}),
        "golden": golden_report,
        "warnings": warnings,
        "passed": True,
    }
    return report, files


def _output_name(sess: InferenceSession, goal: QualityGoal) -> str:
    from edgeops.compress.evaluate import output_index

    return str(sess.get_outputs()[output_index(sess, goal)].name)


# recipe step kind -> the module and class that run it (imported only when a recipe uses it)
STEPS = {"quantize": ("edgeops.compress.quantize", "Quantize"), "prune": ("edgeops.compress.prune", "Prune"),
         "cluster": ("edgeops.compress.cluster", "Cluster"), "distill": ("edgeops.compress.distill", "Distill")}


def step_for(request: BuildRequest, index: int) -> Step[Any]:
    """Recipe step ``index`` (0-based) as a configured ``Step``; distillation needs PyTorch."""
    import importlib

    step = request.recipe[index]
    module, name = STEPS[step.kind]
    try:
        runner: type[Step[Any]] = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise InputError([request.source.problem(request.step_loc(index, step.kind),
                                                 f"{step.kind} needs PyTorch ({exc}); "
                                                 "run: pip install 'edgeops[distill]'")]) from None
    return runner(step.options)


def _stage(index: int, kind: str, options: dict[str, Any], m: Measurement, original: Measurement,
           notes: list[str]) -> dict[str, Any]:
    def ratio(a: float, b: float) -> float | None:
        return None if not b or math.isnan(a) or math.isnan(b) else round(a / b, 3)

    return {
        "index": index, "step": kind, "options": options, "notes": notes,
        "size_bytes": m.size_bytes, "zstd_bytes": m.zstd_bytes, "parameters": m.parameters, "ops": m.ops,
        "quality": {"metric": m.quality.metric, "value": m.quality.value, "baseline": m.quality.baseline,
                    "drop": m.quality.drop, "passed": m.quality.passed, **m.quality.extra},
        "latency_ms": {"p50": m.latency_p50_ms, "p95": m.latency_p95_ms, "where": "host CPU, 1 thread, batch 1",
                       **({} if math.isnan(m.latency_p50_ci_ms[0]) else {"p50_ci95": list(m.latency_p50_ci_ms)})},
        "size_ratio": ratio(original.size_bytes, m.size_bytes),
        "zstd_ratio": ratio(original.zstd_bytes, m.zstd_bytes),
        "speedup": ratio(original.latency_p50_ms, m.latency_p50_ms),
        **({"generation": m.generation} if m.generation else {}),
    }


def _gate_message(where: str, index: int, step: RecipeStep, q: Quality, goal: QualityGoal,
                  verdict: str = "breaks the quality goal") -> str:
    mode = getattr(step.options, "mode", None) or getattr(step.options, "method", None) or "student"
    allowed = goal.max_drop
    if q.metric == "max_abs_error":
        detail = f"max abs error {q.value:.4g} > {allowed:g} allowed"
    elif q.drop <= allowed + 1e-9 and "perplexity_increase_pct" in q.extra:
        detail = (f"perplexity {q.extra['perplexity']:.4g} is {q.extra['perplexity_increase_pct']:.3g}% above the "
                  "original's (more than spec.generation.max_perplexity_increase_pct)")
    else:
        unit = " points" if q.metric in PERCENT_POINTS else ""
        unit = "%" if goal.drop == "relative" else unit
        detail = f"{q.metric} {q.value:.4g} vs {q.baseline:.4g} for the original (drop {q.drop:.3g}{unit} > {allowed:g} allowed)"
    return f"{where}: recipe step {index} ({step.kind} {mode}) {verdict}: {detail}"
