"""What a device is dialled and authenticated with, and whether a change (a pull request) moved it.

An untrusted plan (a pull request's) contacts a device only when everything that reaches and
authenticates it is what the base revision, already reviewed and merged, says: host, port, jump host,
SSH user and settings, which credential is used, the broker and registry, and the bytes of the public
trust files (known_hosts, CA, allowed signers) the fleet names. A device the change adds or moves is
shown in the plan and contacted only after merge, so no credential is ever sent where the base does not
already send it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgeops.errors import InputError
from edgeops.gitinfo import git
from edgeops.manifest.models import plaintext_host
from edgeops.manifest.workspace import Workspace, load_workspace
from edgeops.targets import TargetDevice, fleet_targets

CONTACT_AFTER_MERGE = "contacted only after merge"


def endpoint(target: TargetDevice, public_file: Any) -> dict[str, Any]:
    """Everything that decides where the controller connects for a device and with which credential.

    ``public_file(path) -> str`` names a public file's content (its git blob id, or "absent").
    """
    spec = target.fleet.obj.spec
    ssh = spec.ssh.model_dump(mode="json", exclude={"known_hosts"})
    out: dict[str, Any] = {
        "address": [target.device.host, target.device.port],
        "device root": target.root, "device python": target.python,
        "ssh": ssh,
        "known_hosts": public_file(target.fleet.resolve(spec.ssh.known_hosts)) if spec.ssh.known_hosts else None,
    }
    if spec.pull:
        out["pull"] = spec.pull.model_dump(mode="json", exclude={"ca_file"})
        out["pull ca_file"] = public_file(target.fleet.resolve(spec.pull.ca_file)) if spec.pull.ca_file else None
    if spec.trust:
        out["trust"] = {"signing_key": spec.trust.signing_key,
                        "allowed_signers": public_file(target.fleet.resolve(spec.trust.allowed_signers))}
    return out


def _blob(root: Path, rev: str | None, relative: str) -> str | None:
    """The git blob id of a file at a revision (None: not there), or of the working tree's file."""
    if rev is None:
        return git(root, "hash-object", "--", relative) if (root / relative).is_file() else None
    return git(root, "rev-parse", "--verify", "--quiet", f"{rev}:./{relative}")


@dataclass
class BaseRevision:
    """The fleets and profiles of the base revision, loaded from git (never from the work tree)."""

    root: Path
    rev: str
    targets: dict[str, TargetDevice]
    checkout: Path

    def public_file(self, path: Path) -> str:
        try:
            relative = str(path.relative_to(self.checkout))
        except ValueError:
            return f"outside:{path}"
        found = _blob(self.root, self.rev, relative)
        if found is not None:
            return found
        if _blob(self.root, "HEAD", relative) is not None:
            return "absent"  # the change adds it: not what the base trusts
        present = _blob(self.root, None, relative)  # not in git anywhere: the environment's (CI writes it)
        return present or "absent"


def head_public_file(ws: Workspace) -> Any:
    def name(path: Path) -> str:
        try:
            relative = str(path.relative_to(ws.root))
        except ValueError:
            return f"outside:{path}"
        return _blob(ws.root, None, relative) or "absent"
    return name


def load_base(ws: Workspace, rev: str, scratch: Path) -> BaseRevision:
    """Fleets and profiles as the base revision has them, written into ``scratch`` and loaded from there."""
    if git(ws.root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}") is None:
        raise InputError.at(rev, None, "", f"git revision '{rev}' not found: an untrusted plan compares the "
                                          "endpoints with the base revision (in CI: fetch it first)")
    listing = git(ws.root, "ls-tree", "-r", "--name-only", rev, "--", "./manifests", "./device_profiles") or ""
    for relative in listing.splitlines():
        if not relative.endswith((".yaml", ".yml")):
            continue
        text = git(ws.root, "show", f"{rev}:./{relative}") or ""
        try:
            kind = (yaml.safe_load(text) or {}).get("kind")
        except (yaml.YAMLError, AttributeError):
            continue
        if kind in ("Fleet", "DeviceProfile"):
            path = scratch / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    (scratch / "device_profiles").mkdir(exist_ok=True)
    base = load_workspace(scratch, tolerant=True, secrets_dir=ws.secrets_dir)
    targets = {t.key: t for fleet in base.fleets.values() for t in fleet_targets(base, fleet)
               if t.profile.name in base.profiles}
    return BaseRevision(ws.root, rev, targets, scratch.resolve())


@dataclass(frozen=True)
class Withheld:
    """Devices an untrusted plan does not contact, each with why."""

    reasons: dict[str, str]

    def allows(self, target: TargetDevice) -> bool:
        return target.key not in self.reasons


def withhold(ws: Workspace, rev: str, targets: list[TargetDevice]) -> Withheld:
    """Which of ``targets`` an untrusted plan must not contact, compared with the base revision ``rev``."""
    with tempfile.TemporaryDirectory(prefix="edgeops-base-") as scratch:
        base = load_base(ws, rev, Path(scratch))
        head_file = head_public_file(ws)
        reasons: dict[str, str] = {}
        for target in targets:
            before = base.targets.get(target.key)
            if before is None:
                reasons[target.key] = f"new device or fleet: {CONTACT_AFTER_MERGE}"
                continue
            now, then = endpoint(target, head_file), endpoint(before, base.public_file)
            changed = [name for name in sorted(set(now) | set(then)) if now.get(name) != then.get(name)]
            if changed:
                reasons[target.key] = f"changed endpoint ({', '.join(changed)}): {CONTACT_AFTER_MERGE}"
            elif target.fleet.obj.spec.pull and plaintext_host(target.fleet.obj.spec.pull.broker):
                reasons[target.key] = "plain MQTT to another host: an untrusted plan sends no credential in clear"
    return Withheld(reasons)

