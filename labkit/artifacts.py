"""Built artifacts, rendered configs and local releases, for tests and benchmarks."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType

from edgeops.agent import AGENT_FILE
from edgeops.compress.cache import Cache
from edgeops.compress.pipeline import BuildResult, build
from edgeops.compress.request import BuildRequest
from edgeops.manifest.workspace import Workspace, load_workspace
from edgeops.operations import Repo
from edgeops.release import Release, make_release, write_local
from edgeops.render import render_device
from edgeops.settings import Settings
from edgeops.signing import SignedMetadata, sign_release
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
    artifact = build_for(ws, deployment, target.accelerator).artifact
    release = make_release(deployment, artifact, render_device(ws, doc, target, artifact.report["artifact"]))
    write_local(release, dest)
    return release


def repo_at(root: Path, ws: Workspace | None = None) -> Repo:
    """The repository at ``root`` with its ledger and cache where this environment puts them."""
    return Repo.open(ws or load_workspace(root), Settings.from_environment(os.environ))


def build_for(ws: Workspace, deployment: str, accelerator: str, force: bool = False) -> BuildResult:
    """Build (or fetch from the cache) one deployment's artifact for one accelerator class."""
    return build(BuildRequest.of(ws.deployments[deployment], accelerator),
                 Cache(Settings.from_environment(os.environ).cache_in(ws.root)), force=force)


def lab_signed(root: Path, release: Release, ttl_s: float = 3600) -> SignedMetadata:
    """``release``'s metadata signed with the lab's release key (what apply does for an enrolled fleet)."""
    return sign_release(lab_release_key(), release, time.time_ns() // 1_000_000, ttl_s)


def lab_release_key() -> Path:
    """The lab fleets' release key (trust.signing_key: lab/release_ed25519) in the secrets directory."""
    secrets = Settings.from_environment(os.environ).secrets_dir or Workspace(Path("/")).secrets_dir
    return secrets / "lab" / "release_ed25519"
