"""What git asks for: per target device, the release (artifact + rendered config) it should run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edgeops.build.cache import Artifact
from edgeops.build.pipeline import build, default_cache
from edgeops.release import Release, make_release
from edgeops.render import render_device
from edgeops.spec.models import Deployment
from edgeops.spec.workspace import Document, Workspace
from edgeops.targets import TargetDevice, target_devices


@dataclass(frozen=True)
class Desired:
    deployment: Document[Deployment]
    targets: tuple[TargetDevice, ...]
    artifacts: dict[str, Artifact]        # by accelerator class
    releases: dict[str, Release]          # by target key

    def target(self, key: str) -> TargetDevice:
        return next(t for t in self.targets if t.key == key)


def desired_state(ws: Workspace, deployment: Document[Deployment],
                  progress: Callable[[str], None] = lambda message: None) -> Desired:
    """Build (cache hits are free) and render for every target device."""
    targets = tuple(target_devices(ws, deployment.name))
    cache = default_cache(ws)
    artifacts = {}
    for accelerator in sorted({t.accelerator for t in targets}):
        progress(f"building {deployment.name} for {accelerator}")
        artifacts[accelerator] = build(deployment, accelerator, cache, progress=progress).artifact
    releases = {}
    for target in targets:
        artifact = artifacts[target.accelerator]
        config = render_device(ws, deployment, target, artifact.report["artifact"])
        releases[target.key] = make_release(deployment.name, artifact, config)
    return Desired(deployment, targets, artifacts, releases)
