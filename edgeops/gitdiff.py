"""Which deployments a git change touches, following every reference a deployment makes.

A deployment is touched when its manifest changed, or anything it depends on:
its model, data and student files, the fleets it targets, the device profiles
of those fleets' devices, and the templates those profiles render (shared
templates, named with a leading underscore, touch every deployment).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from edgeops.errors import InputError
from edgeops.gitinfo import git
from edgeops.manifest.models import Deployment
from edgeops.manifest.workspace import Document, Workspace
from edgeops.plan import field_changes
from edgeops.targets import target_devices


@dataclass(frozen=True)
class Touched:
    deployment: str
    manifest: str
    reasons: tuple[str, ...]


def changed_files(root: Path, base: str, head: str | None = None) -> list[str]:
    """Paths (relative to the repository root) that differ between base and head (or the work tree)."""
    top = git(root, "rev-parse", "--show-toplevel")
    if top is None:
        raise InputError.at(str(root), None, "", "not a git repository")
    for rev in (base, head):
        if rev and git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}") is None:
            raise InputError.at(str(root), None, "", f"git revision '{rev}' not found; in a shallow CI checkout "
                                                     f"fetch it first (git fetch --depth=1 origin {rev})")
    args = ["diff", "--name-only", "--no-renames", base] + ([head] if head else [])
    out = git(root, *args)
    if out is None:
        raise InputError.at(str(root), None, "", f"git diff against {base} failed")
    prefix = Path(root).resolve().relative_to(Path(top).resolve())
    files = []
    for line in out.splitlines():
        path = Path(line)
        try:
            files.append(str(path.relative_to(prefix)) if str(prefix) != "." else line)
        except ValueError:
            continue  # outside this edgeops repository
    return sorted(files)


def manifest_changes(ws: Workspace, doc: Document[Deployment], base: str) -> list[str]:
    """Field by field, what changed since ``base`` in the deployment's manifest and its fleets' and profiles' files."""
    top = git(ws.root, "rev-parse", "--show-toplevel")
    if top is None:
        return []
    files = {doc.path} | {ws.fleets[t.fleet].path for t in doc.obj.spec.targets if t.fleet in ws.fleets}
    files |= {t.profile.path for t in target_devices(ws, doc.name)}
    lines = []
    for path in sorted(files):
        shown = path.resolve().relative_to(ws.root)
        old_text = git(ws.root, "show", f"{base}:{path.resolve().relative_to(Path(top).resolve())}")
        old = yaml.safe_load(old_text) if old_text else None  # the base branch's file: already reviewed
        new = yaml.safe_load(path.read_text())
        if old is None:
            lines.append(f"`{shown}`: new file")
            continue
        lines += [f"`{shown}` {change}" for change in field_changes(old, new)]
    return lines


def dependencies(ws: Workspace, doc: Document[Deployment]) -> dict[str, str]:
    """Repository-relative path -> why the deployment depends on it."""
    def rel(path: Path) -> str:
        return str(path.resolve().relative_to(ws.root))

    spec = doc.obj.spec
    deps = {rel(doc.path): "manifest changed",
            rel(doc.resolve(spec.model.path)): "model file changed",
            rel(doc.resolve(spec.data.calibration)): "calibration data changed",
            rel(doc.resolve(spec.data.evaluation)): "evaluation data changed"}
    if spec.data.training:
        deps[rel(doc.resolve(spec.data.training))] = "training data changed"
    for recipe in [spec.recipe, *spec.recipe_for.values()]:
        for step in recipe:
            if step.distill and step.distill.student.onnx:
                deps[rel(doc.resolve(step.distill.student.onnx))] = "student model changed"
    for target in spec.targets:
        fleet = ws.fleets[target.fleet]
        deps[rel(fleet.path)] = f"fleet {fleet.name} changed"
    for device in target_devices(ws, doc.name):
        profile = device.profile
        deps[rel(profile.path)] = f"device profile {profile.name} changed"
        deps[f"templates/{profile.obj.spec.template}"] = f"template {profile.obj.spec.template} changed"
    return deps


def touched_deployments(ws: Workspace, files: list[str]) -> list[Touched]:
    """Deployments touched by ``files``, sorted by name, each with the reasons."""
    changed = set(files)
    shared = sorted(f for f in changed if f.startswith("templates/") and Path(f).name.startswith("_"))
    out = []
    for name in sorted(ws.deployments):
        doc = ws.deployments[name]
        deps = dependencies(ws, doc)
        reasons = [f"{why} ({path})" for path, why in sorted(deps.items()) if path in changed]
        reasons += [f"shared template changed ({path})" for path in shared]
        if reasons:
            out.append(Touched(name, str(doc.path.relative_to(ws.root)), tuple(dict.fromkeys(reasons))))
    return out
