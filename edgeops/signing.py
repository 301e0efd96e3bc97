"""Signed releases: release metadata signed with an OpenSSH key (``ssh-keygen -Y sign``), as git signs commits.

Devices enrolled with an allowed-signers file verify the signature before a new release runs (the
agent's ``switch``); see docs/security.md for what this protects against.
"""

from __future__ import annotations

import base64
import json
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeops.errors import EdgeopsError
from edgeops.release import Release

RELEASE_NAMESPACE = "edgeops-release"
TRUST_NAMESPACE = "edgeops-trust"
SIGNER_IDENTITY = "release@edgeops"  # the principal every allowed-signers line of edgeops names


class SigningError(EdgeopsError):
    """The release (or trust-root) signature could not be made."""


@dataclass(frozen=True)
class FileDigest:
    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class SignedMetadata:
    """What a device checks before it runs a new release: the metadata bytes and their armored signature."""

    data: bytes
    signature: str

    def as_args(self) -> list[str]:
        return ["--metadata", base64.b64encode(self.data).decode(),
                "--signature", base64.b64encode(self.signature.encode()).decode()]


def release_metadata(deployment: str, release: str, files: list[FileDigest], config_digest: str, generation: int,
                     ttl_s: float, now: float | None = None) -> bytes:
    """Canonical JSON of what is signed. ``generation`` only grows for a deployment; devices refuse lower."""
    now = time.time() if now is None else now
    document = {
        "deployment": deployment, "release": release, "generation": generation, "config_digest": config_digest,
        "files": {f.name: {"sha256": f.sha256, "size": f.size} for f in files},
        "created": now, "created_at": _iso(now), "expires": now + ttl_s, "expires_at": _iso(now + ttl_s),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def sign_release(key: Path, release: Release, generation: int, ttl_s: float) -> SignedMetadata:
    """``release``'s metadata (its files as they will be on the device), signed with ``key``."""
    files = [FileDigest(f.name, f.sha256, f.size) for f in release.files]
    data = release_metadata(release.deployment, release.id, files, release.config_digest, generation, ttl_s)
    return SignedMetadata(data, sign(key, RELEASE_NAMESPACE, data))


ORDER_KIND = "edgeops.order/v1"


@dataclass(frozen=True)
class SignedOrder:
    """The controller's order for one change of what a device runs, signed by the release key: enrolled
    devices take a rollback or an uninstall (and, in pull mode, any desired state) only with one, newer than
    the last they took."""

    data: bytes
    signature: str

    def as_args(self) -> list[str]:
        return ["--order", base64.b64encode(self.data).decode(),
                "--order-signature", base64.b64encode(self.signature.encode()).decode()]

    def as_json(self) -> dict[str, str]:
        return {"order": base64.b64encode(self.data).decode(),
                "signature": base64.b64encode(self.signature.encode()).decode()}


def sign_order(key: Path, deployment: str, device: str, action: str, release: str | None,
               allow_rejected: bool = False, bindings: dict[str, Any] | None = None) -> SignedOrder:
    """An order for ``device`` (fleet/device) to ``action`` ``release`` (None: no release), numbered by the
    clock in nanoseconds so a device refuses it a second time and refuses any older one. ``bindings``: more
    fields the device checks against what it is asked to do (a training order: the tensors, the spec, the
    deadline)."""
    document = {"kind": ORDER_KIND, "deployment": deployment, "device": device, "action": action,
                "release": release, "allow_rejected": allow_rejected, "sequence": time.time_ns(),
                "issued_at": _iso(time.time()), **(bindings or {})}
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return SignedOrder(data, sign(key, RELEASE_NAMESPACE, data))


def training_bindings(tensors: bytes, spec: dict[str, Any], deadline: float) -> dict[str, Any]:
    """What a training order binds: the digests of the round's tensors and spec (the agent's own
    ``training_digests``, which the device checks) and the wall-clock deadline after which it refuses the order."""
    from edgeops.agent.edgeops_agent import training_digests

    return {**training_digests(tensors, spec), "deadline": deadline}


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def sign(key: Path, namespace: str, data: bytes) -> str:
    """The armored SSH signature of ``data`` by the private key ``key`` (or its ``.pub`` in ssh-agent)."""
    if not key.is_file():
        raise SigningError(f"release signing key {key} does not exist",
                           hint="point trust.signing_key (or EDGEOPS_SIGNING_KEY) at it; `edgeops lab up` makes "
                                "the lab's")
    with tempfile.TemporaryDirectory(prefix="edgeops-sign-") as tmp:
        message = Path(tmp) / "message"
        message.write_bytes(data)
        try:
            done = subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", namespace, str(message)],
                                  capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise SigningError("ssh-keygen is not installed on this machine",
                               hint="install openssh-client (scripts/install.sh does)") from None
        if done.returncode != 0:
            raise SigningError(f"ssh-keygen could not sign with {key}: "
                               f"{(done.stderr.strip().splitlines() or ['no reason given'])[-1]}")
        return (Path(tmp) / "message.sig").read_text()


def allowed_signers_line(public_key: str, namespaces: tuple[str, ...] = (RELEASE_NAMESPACE, TRUST_NAMESPACE)) -> str:
    """One allowed-signers line for an OpenSSH public key (``ssh-ed25519 AAAA... comment``)."""
    key_type, blob = public_key.split()[:2]
    return f'{SIGNER_IDENTITY} namespaces="{",".join(namespaces)}" {key_type} {blob}\n'


def generate_key(private: Path, comment: str) -> None:
    """A new ed25519 key pair (no passphrase: for the lab and for tests)."""
    private.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(private)],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
