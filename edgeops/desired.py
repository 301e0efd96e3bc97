"""What git asks for: per target device, the release (artifact + rendered config) it should run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from edgeops.adapt.artifact import Adaptation, NoHead, adaptable
from edgeops.compress.cache import Artifact, Cache
from edgeops.compress.data import load_dataset
from edgeops.compress.pipeline import build, cached
from edgeops.compress.request import BuildRequest
from edgeops.errors import EdgeopsError
from edgeops.manifest.models import Deployment
from edgeops.manifest.workspace import Document, Workspace
from edgeops.release import Release, fleet_release_id, make_release
from edgeops.render import environment, render_device
from edgeops.selectors import LabelSelector
from edgeops.targets import TargetDevice, target_devices


@dataclass(frozen=True)
class Desired:
    deployment: Document[Deployment]
    targets: tuple[TargetDevice, ...]
    artifacts: dict[str, Artifact]        # by accelerator class
    releases: dict[str, Release]          # by target key
    release_id: str = ""                  # the fleet-wide release (all targets, whatever the selector)

    def configs(self) -> dict[str, list[str]]:
        """Hardware class -> the distinct runtime configs its devices get, device values as placeholders."""
        found: dict[str, set[str]] = {}
        for target in self.targets:
            found.setdefault(target.hardware_class, set()).add(self.releases[target.key].generic_config)
        return {cls: sorted(texts) for cls, texts in sorted(found.items())}

    def target(self, key: str) -> TargetDevice:
        return next(t for t in self.targets if t.key == key)

    def selected(self, selector: LabelSelector | None) -> Desired:
        """Only the target devices whose labels ``selector`` matches (all of them without one)."""
        if selector is None:
            return self
        targets = tuple(t for t in self.targets if selector.matches(t.device.labels))
        return Desired(self.deployment, targets, self.artifacts, {t.key: self.releases[t.key] for t in targets},
                       self.release_id)


class NotBuilt(EdgeopsError):
    """A read-only command found no built artifact for what git asks for (it never builds)."""


def desired_state(ws: Workspace, deployment: Document[Deployment], cache: Cache,
                  progress: Callable[[str], None] = lambda message: None, build_missing: bool = True,
                  adaptation: Adaptation | None = None, decisions: dict[str, dict[str, Any]] | None = None) -> Desired:
    """Build (cache hits are free) and render for every target device.

    ``build_missing=False`` (status, reconcile's check): use the cache only and raise NotBuilt on a miss.
    ``adaptation``: the head a federated deployment's fleet learned (spec.adapt), used while the artifacts it
    was learned on are still what git builds. ``decisions``: per hardware class, the finalist of an auto step
    its devices measured fastest (quantize.decide_on: device), made for the artifacts git builds now.
    """
    targets = tuple(target_devices(ws, deployment.name))
    artifacts: dict[str, Artifact] = {}
    for accelerator in sorted({t.accelerator for t in targets}):
        if not build_missing:
            found = cached(BuildRequest.of(deployment, accelerator), cache)
            if found is None:
                raise NotBuilt(f"the {accelerator} artifact git asks for is not built yet",
                               hint="edgeops plan or edgeops build builds it")
            artifacts[accelerator] = found.artifact
            continue
        progress(f"building {deployment.name} for {accelerator}")
        artifacts[accelerator] = build(BuildRequest.of(deployment, accelerator), cache, progress=progress).artifact
    personal: dict[str, Artifact] = {}  # device name -> its own learned head (adapt.personalize)
    if deployment.obj.spec.adapt is not None:
        fits = adaptation is not None and adaptation.bases == {a: x.key for a, x in artifacts.items()}
        chosen = adaptation if fits else None
        bases = artifacts
        artifacts = {a: _adapted(deployment, cache, a, x, chosen.tensors_sha256 if chosen else None, build_missing)
                     for a, x in bases.items()}
        for target in targets:
            if chosen is not None and target.name in chosen.personal:
                personal[target.name] = _adapted(deployment, cache, target.accelerator, bases[target.accelerator],
                                                 chosen.personal[target.name], build_missing)
    by_class: dict[str, Artifact] = {}
    for hardware_class, decision in sorted((decisions or {}).items()):
        member = next((t for t in targets if t.hardware_class == hardware_class), None)
        if member is None or decision.get("label") is None:
            continue
        request = BuildRequest.of(deployment, member.accelerator).with_step(decision["index"], decision["step"],
                                                                     decision["label"])
        found = build(request, cache, progress=progress) if build_missing else cached(request, cache)
        if found is None:
            raise NotBuilt(f"the {decision['label']} finalist decided for {hardware_class} is not built yet",
                           hint="edgeops plan or edgeops build builds it")
        by_class[hardware_class] = found.artifact
    releases = {}
    templates = environment(ws.templates_dir)
    for target in targets:
        artifact = personal.get(target.name) or by_class.get(target.hardware_class) or artifacts[target.accelerator]
        config = render_device(ws, deployment, target, artifact.report["artifact"], templates)
        releases[target.key] = make_release(deployment.name, artifact, config)
    return Desired(deployment, targets, artifacts, releases,
                   fleet_release_id(deployment.name, list(releases.values())))


def _adapted(deployment: Document[Deployment], cache: Cache, accelerator: str, base: Artifact, learned: str | None,
             build_missing: bool) -> Artifact:
    """``base`` as a federated deployment runs it, with the learned head ``learned`` (None: its own)."""
    adapt = deployment.obj.spec.adapt
    assert adapt is not None
    try:
        adapted = adaptable(base, adapt, cache, learned, build=build_missing,
                            evaluation=lambda: load_dataset(BuildRequest.of(deployment, accelerator), "evaluation"))
    except NoHead as exc:
        raise deployment.error(("spec", "adapt"), str(exc)) from None
    if adapted is None:
        raise NotBuilt(f"the {accelerator} artifact with the fleet's learned head is not built yet",
                       hint="edgeops plan or edgeops build builds it")
    return adapted
