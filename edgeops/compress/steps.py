"""The one interface of a recipe step: built from its options, ``run(model, ctx)`` gives the next model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Generic, Protocol, TypeVar

from edgeops.compress.cache import CandidateCache
from edgeops.compress.data import Dataset
from edgeops.compress.evaluate import Evaluator, Measurement
from edgeops.compress.request import BuildRequest


class QuantizeContext(Protocol):
    """What quantizing one candidate needs (a build's ``StepContext``, or a child quantizing ahead)."""

    calibration: Dataset

    @property
    def accelerator(self) -> str: ...

    @property
    def generative(self) -> bool: ...

    def progress(self, message: str) -> None: ...

    def path(self, name: str) -> Path: ...

    @property
    def preprocess_here(self) -> bool:
        """Whether onnxruntime's pre-processing runs in this process (a child quantizing ahead) rather than in a
        process of its own started early."""

    def own_copy(self, path: Path) -> Path:
        """``path``, or a link to it that no other process quantizes from (onnxruntime writes a scratch file
        beside its input)."""


@dataclass
class StepContext:
    """Everything a step may use; steps write only under ``work_dir``."""

    work_dir: Path
    request: BuildRequest
    calibration: Dataset
    evaluator: Evaluator
    teacher: Path                     # the original model, for distillation
    progress: Callable[[str], None] = lambda message: None
    index: int = 0
    before: Measurement | None = None   # the step's input as measured (the original for step 1)
    candidates: CandidateCache | None = None  # auto's quantized candidates across builds

    @property
    def accelerator(self) -> str:
        return self.request.accelerator

    @property
    def generative(self) -> bool:
        return self.request.generative

    @property
    def preprocess_here(self) -> bool:
        return False

    def path(self, name: str) -> Path:
        return self.work_dir / f"{self.index:02d}-{name}.onnx"

    def own_copy(self, path: Path) -> Path:
        return path


@dataclass
class Candidate:
    """One option an ``auto`` step tried, with its measurement or why it could not run."""

    mode: str
    measurement: Measurement | None
    error: str | None = None
    chosen: bool = False
    skipped: str | None = None  # stopped early: why it could not win

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "chosen": self.chosen, "error": self.error, "skipped": self.skipped,
                "measurement": self.measurement.as_dict() if self.measurement else None}


@dataclass
class StepResult:
    path: Path
    notes: list[str] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    measurement: Measurement | None = None    # set when the step already measured its output
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # for the report, `edgeops build` and the plan comment


Options = TypeVar("Options")


class Step(ABC, Generic[Options]):
    """A recipe step (cf. Olive's passes): configured once, run on the previous step's model."""

    kind: ClassVar[str]

    def __init__(self, options: Options) -> None:
        self.options = options

    def start(self, model: Path, ctx: StepContext) -> Callable[[], None]:
        """Begin slow preparation in the background while the original model is evaluated (the first step
        only); returns what waits for it to finish. Default: nothing to start."""
        return lambda: None

    def close(self) -> None:
        """Stop what ``start`` began when the build ends before ``run`` (the original failed to evaluate)."""

    @abstractmethod
    def run(self, model: Path, ctx: StepContext) -> StepResult:
        """Write the transformed model under ``ctx.work_dir`` and say what was done."""
