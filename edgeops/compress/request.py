"""What the compressor needs to build one artifact, and nothing more.

The compressor never sees the manifest: it gets the model and data paths, the
recipe for one accelerator class, the quality goal, and a ``Source`` that turns
a field of the manifest into a located error (``file:line: field: ...``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgeops.errors import InputError, Problem
from edgeops.manifest.models import DataSpec, GenerationSpec, ModelSource, QualityGoal, RecipeStep
from edgeops.manifest.yamlload import Loc

if TYPE_CHECKING:
    from edgeops.manifest.models import Deployment
    from edgeops.manifest.workspace import Document


class Source(Protocol):
    """Where the request's fields were written; a ``Document`` is one."""

    @property
    def display(self) -> str: ...
    def problem(self, loc: Loc, message: str) -> Problem: ...
    def where(self, loc: Loc) -> str: ...
    def error(self, loc: Loc, message: str) -> InputError: ...
    def resolve(self, relative: str) -> Path: ...


DATA_FIELDS = ("calibration", "training", "evaluation")


@dataclass(frozen=True)
class BuildRequest:
    """One deployment's model and recipe for one accelerator class."""

    name: str                  # the deployment, for the report and the cache slot
    accelerator: str
    model: ModelSource
    data: DataSpec
    recipe: tuple[RecipeStep, ...]
    quality: QualityGoal
    source: Source
    recipe_loc: Loc            # where ``recipe`` is written, for located errors
    generation: GenerationSpec | None = None   # text-generation: how the decoder is measured
    variant: str = ""          # a finalist of an auto step (decide_on: device), built by itself

    @classmethod
    def of(cls, doc: Document[Deployment], accelerator: str) -> BuildRequest:
        spec = doc.obj.spec
        recipe_loc: Loc = ("spec", "recipe_for", accelerator) if accelerator in spec.recipe_for else ("spec", "recipe")
        return cls(doc.name, accelerator, spec.model, spec.data, tuple(spec.recipe_for_accelerator(accelerator)),
                   spec.quality, doc, recipe_loc, spec.generation)

    @property
    def generative(self) -> bool:
        return self.model.task == "text-generation"

    @property
    def slot(self) -> str:
        return f"{self.name}.{self.accelerator}" + (f".{self.variant}" if self.variant else "")

    def with_step(self, index: int, step: dict[str, Any] | None, label: str) -> BuildRequest:
        """This request with recipe step ``index`` (1-based) replaced by the quantize options ``step``, or left
        out (None): one finalist of an auto step, built and cached by itself."""
        recipe = list(self.recipe)
        if step is None:
            del recipe[index - 1]
        else:
            recipe[index - 1] = RecipeStep.model_validate({"quantize": step})
        return replace(self, recipe=tuple(recipe), variant=label.replace(" ", "-"))

    @property
    def model_path(self) -> Path:
        return self.source.resolve(self.model.path)

    def data_path(self, which: str) -> Path:
        """``calibration``, ``evaluation`` or ``training`` (which defaults to the calibration data)."""
        return self.source.resolve(self.data_file(which))

    def data_file(self, which: str) -> str:
        assert which in DATA_FIELDS, which
        return getattr(self.data, which) or self.data.calibration

    def data_loc(self, which: str) -> Loc:
        return ("spec", "data", which if getattr(self.data, which) else "calibration")

    def step_loc(self, index: int, *more: str | int) -> Loc:
        """Where recipe step ``index`` (0-based) or one of its fields is written."""
        return (*self.recipe_loc, index, *more)
