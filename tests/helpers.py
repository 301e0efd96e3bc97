"""Helpers for tests that need built artifacts, rendered configs and local releases."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from edgeops.agent import AGENT_FILE
from edgeops.build.pipeline import build, default_cache
from edgeops.release import Release, make_release, write_local
from edgeops.render import render_device
from edgeops.spec.workspace import Workspace, load_workspace
from edgeops.targets import target_devices


def agent_module() -> ModuleType:
    """The agent file loaded as a module (it is a script on the device)."""
    if "edgeops_agent_under_test" not in sys.modules:
        spec = importlib.util.spec_from_file_location("edgeops_agent_under_test", AGENT_FILE)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules["edgeops_agent_under_test"] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules["edgeops_agent_under_test"]


def local_release(root: Path, deployment: str, device: str, dest: Path, ws: Workspace | None = None) -> Release:
    ws = ws or load_workspace(root)
    doc = ws.deployments[deployment]
    target = next(t for t in target_devices(ws, deployment) if t.name == device)
    artifact = build(doc, target.accelerator, default_cache(ws)).artifact
    release = make_release(deployment, artifact, render_device(ws, doc, target, artifact.report["artifact"]))
    write_local(release, dest)
    return release
