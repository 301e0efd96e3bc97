"""The distill step: train a smaller student to mimic the teacher, then hand it to the next step.

Teacher outputs come from the teacher ONNX model run by onnxruntime over the
transfer set (``data.training``, else the calibration data). The student
trains with PyTorch (CPU by default, CUDA when present), deterministic for a
seed on the CPU, and is exported to ONNX with the teacher's input and output
names. Imported only when a recipe has a distill step.
"""

from __future__ import annotations

import importlib
import io
import math
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from edgeops.compress.data import load_dataset
from edgeops.compress.evaluate import output_index, run_all, session
from edgeops.compress.onnx_torch import OnnxModule
from edgeops.compress.request import Source
from edgeops.compress.steps import Step, StepContext, StepResult
from edgeops.errors import BuildError
from edgeops.manifest.models import DistillOptions, StudentSpec
from edgeops.metrics import CLASSIFICATION, metric_value
from edgeops.metrics import score as ranked


def student_module(spec: StudentSpec, input_shape: tuple[int, ...], outputs: int, current: Path,
                   source: Source) -> torch.nn.Module:
    """Instantiate the student for the teacher's input shape (without batch) and output size."""
    if spec.previous_step:
        return OnnxModule(onnx.load(str(current)))
    if spec.onnx:
        return OnnxModule(onnx.load(str(source.resolve(spec.onnx))))
    if spec.factory:
        module_name, _, function = spec.factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as exc:
            raise BuildError(f"student factory {spec.factory!r} cannot be imported: {exc}") from None
        student = factory(input_shape, outputs)
        if not isinstance(student, torch.nn.Module):
            raise BuildError(f"student factory {spec.factory!r} returned {type(student).__name__}, not a torch Module")
        return student
    width, depth = spec.width, spec.depth
    layers: list[torch.nn.Module] = []
    if spec.family == "mlp":
        features = int(np.prod(input_shape))
        layers.append(torch.nn.Flatten())
        for _ in range(depth):
            layers += [torch.nn.Linear(features, width), torch.nn.ReLU()]
            features = width
        layers.append(torch.nn.Linear(features, outputs))
    elif spec.family == "cnn1d":
        if len(input_shape) != 2:
            raise BuildError(f"a cnn1d student needs (channels, length) inputs; the teacher takes {list(input_shape)}")
        channels, length = input_shape
        for _ in range(depth):
            layers += [torch.nn.Conv1d(channels, width, 5, padding=2), torch.nn.ReLU()]
            if length >= 4:
                layers.append(torch.nn.MaxPool1d(2))
                length //= 2
            channels = width
        layers += [torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(), torch.nn.Linear(channels, outputs)]
    else:
        if len(input_shape) != 3:
            raise BuildError(f"a cnn2d student needs (channels, height, width) inputs; the teacher takes "
                             f"{list(input_shape)}")
        channels, height, breadth = input_shape
        for _ in range(depth):
            layers += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.ReLU()]
            if min(height, breadth) >= 4:
                layers.append(torch.nn.MaxPool2d(2))
                height, breadth = height // 2, breadth // 2
            channels = width
        layers += [torch.nn.Flatten(), torch.nn.Linear(channels * height * breadth, outputs)]
    return torch.nn.Sequential(*layers)


def _loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, options: DistillOptions,
          classification: bool) -> torch.Tensor:
    if not classification:
        return F.mse_loss(student, teacher)
    t = options.temperature
    soft = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean") * t * t
    if labels is None or options.soft_weight >= 1:
        return soft
    return options.soft_weight * soft + (1 - options.soft_weight) * F.cross_entropy(student, labels)


def _score(student: torch.nn.Module, x: torch.Tensor, teacher: np.ndarray, labels: np.ndarray | None,
           metric: str) -> float:
    with torch.no_grad():
        out = student(x).numpy().reshape(len(x), -1)
    return ranked(metric, metric_value(metric, out, teacher, labels))  # higher is better in this loop


class Distill(Step[DistillOptions]):
    """Train a smaller student on the teacher's outputs (and labels, when given)."""

    kind = "distill"

    def run(self, model: Path, ctx: StepContext) -> StepResult:
        return distill(model, self.options, ctx)


def distill(current: Path, options: DistillOptions, ctx: StepContext) -> StepResult:
    request = ctx.request
    goal = request.quality
    teacher_session = session(ctx.teacher, threads=0)
    if len(teacher_session.get_inputs()) != 1:
        raise BuildError("distillation supports models with one input")
    tensor = request.model.inputs[0]
    if tensor.dtype not in ("float32", "float16"):
        raise BuildError(f"distillation needs a float input; '{tensor.name}' is {tensor.dtype}")
    index = output_index(teacher_session, goal)
    output_name = teacher_session.get_outputs()[index].name
    if len(teacher_session.get_outputs()) != 1:
        raise BuildError("distillation supports models with one output (the student replaces the whole model)")
    transfer = load_dataset(request, "training")
    evaluation = ctx.evaluator.data
    ctx.progress("distill: running the teacher over the transfer set")
    teacher_train = run_all(teacher_session, transfer)[index].astype(np.float32)
    teacher_eval = ctx.evaluator.reference.astype(np.float32)
    input_shape = tuple(transfer.inputs[tensor.name].shape[1:])
    outputs = int(np.prod(teacher_train.shape[1:]))

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same seed gives the same student on any CPU
    torch.manual_seed(options.seed)
    try:
        student = student_module(options.student, input_shape, outputs, current, request.source)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        student.to(device)
        x = torch.from_numpy(transfer.inputs[tensor.name].astype(np.float32))
        t = torch.from_numpy(teacher_train)
        y = torch.from_numpy(transfer.labels) if transfer.labels is not None and options.soft_weight < 1 else None
        x_eval = torch.from_numpy(evaluation.inputs[tensor.name].astype(np.float32))
        classification = goal.metric in CLASSIFICATION
        optimizer = torch.optim.Adam(student.parameters(), lr=options.learning_rate)
        generator = torch.Generator().manual_seed(options.seed)
        best_score, best_state, best_epoch, stale = -math.inf, None, 0, 0
        started = time.perf_counter()
        history = []
        epoch = 0
        for epoch in range(1, options.epochs + 1):
            student.train()
            order = torch.randperm(len(x), generator=generator)
            total = 0.0
            for start in range(0, len(x), options.batch_size):
                batch = order[start:start + options.batch_size]
                optimizer.zero_grad()
                out = student(x[batch].to(device)).reshape(len(batch), -1)
                loss = _loss(out, t[batch].reshape(len(batch), -1).to(device),
                             y[batch].to(device) if y is not None else None, options, classification)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                total += loss.item() * len(batch)
            student.eval()
            score = _score(student.cpu(), x_eval, teacher_eval, evaluation.labels, goal.metric)
            student.to(device)
            history.append({"epoch": epoch, "loss": total / len(x), "eval": score})
            ctx.progress(f"distill epoch {epoch}/{options.epochs}: loss {total / len(x):.4f}, "
                         f"{goal.metric} {abs(score):.4g}")
            if score > best_score:
                best_score, best_epoch, stale = score, epoch, 0
                best_state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
            else:
                stale += 1
            if options.early_stopping_patience and stale >= options.early_stopping_patience:
                break
            if options.time_budget_s and time.perf_counter() - started > options.time_budget_s:
                break
        seconds = time.perf_counter() - started
        student.cpu()
        if best_state is not None:
            student.load_state_dict(best_state)
        student.eval()
        dst = ctx.path("distill")
        _export(student, x[:1], tensor.name, output_name, dst)
    finally:
        torch.set_num_threads(previous_threads)
    params = sum(p.numel() for p in student.parameters())
    kind = "fine-tuned the previous step's model" if options.student.previous_step else (
        f"{options.student.family or 'user'} student (width {options.student.width}, depth {options.student.depth})"
        if options.student.family else "user-supplied student")
    labels_used = "soft targets + hard labels" if y is not None else "soft targets only (no labels)"
    notes = [f"distillation: {kind}, {params} parameters, {labels_used}, T={options.temperature:g}; "
             f"best epoch {best_epoch} of {epoch} in {seconds:.1f} s on {device}"]
    return StepResult(dst, notes, extra={"distill": {"student_parameters": params, "epochs_run": epoch,
                                                      "best_epoch": best_epoch, "training_seconds": seconds,
                                                      "device": device, "history": history}})


def _export(student: torch.nn.Module, example: torch.Tensor, input_name: str, output_name: str, dst: Path) -> None:
    buffer = io.BytesIO()
    # a file-like target is documented (torchscript exporter); the stub only names paths
    torch.onnx.export(student, (example,), buffer, input_names=[input_name],  # type: ignore[arg-type]
                      output_names=[output_name],
                      dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, opset_version=17,
                      dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    model.producer_name, model.producer_version = "edgeops-distill", ""
    onnx.save(model, str(dst))


