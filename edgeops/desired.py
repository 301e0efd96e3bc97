"""What git asks for: per target device, the release (artifact + rendered config) it should run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edgeops.compress.cache import Artifact, Cache
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
                  progress: Callable[[str], None] = lambda message: None, build_missing: bool = True) -> Desired:
    """Build (cache hits are free) and render for every target device.

    ``build_missing=False`` (status, reconcile's check): use the cache only and raise NotBuilt on a miss.
    """
    targets = tuple(target_devices(ws, deployment.name))
    artifacts = {}
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
    releases = {}
    templates = environment(ws.templates_dir)
    for target in targets:
        artifact = artifacts[target.accelerator]
        config = render_device(ws, deployment, target, artifact.report["artifact"], templates)
        releases[target.key] = make_release(deployment.name, artifact, config)
    return Desired(deployment, targets, artifacts, releases,
                   fleet_release_id(deployment.name, list(releases.values())))
