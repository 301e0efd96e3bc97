"""What every recipe step gets and gives back."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from edgeops.build.data import Dataset
from edgeops.build.evaluate import Evaluator, Measurement


@dataclass
class StepContext:
    """Everything a step may use; steps write only under ``work_dir``."""

    work_dir: Path
    accelerator: str
    calibration: Dataset
    evaluator: Evaluator
    teacher: Path                     # the original model, for distillation
    progress: Callable[[str], None] = lambda message: None
    index: int = 0

    def path(self, name: str) -> Path:
        return self.work_dir / f"{self.index:02d}-{name}.onnx"


@dataclass
class Candidate:
    """One option an ``auto`` step tried, with its measurement or why it could not run."""

    mode: str
    measurement: Measurement | None
    error: str | None = None
    chosen: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "chosen": self.chosen, "error": self.error,
                "measurement": self.measurement.as_dict() if self.measurement else None}


@dataclass
class StepResult:
    path: Path
    notes: list[str] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    measurement: Measurement | None = None    # set when the step already measured its output
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """onnxruntime's tools drop temporary files in the current directory: keep them in ours."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)
