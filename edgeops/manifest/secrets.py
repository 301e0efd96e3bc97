"""Credential files a fleet names: they live in the controller's secrets directory, never in the repository.

A fleet (possibly from a pull request) names a credential by its name *inside* the secrets directory the
operator configured (``EDGEOPS_SECRETS_DIR``): ``ssh.identity_file: lab/client_ed25519``. The name is
checked as written, before anything is opened: no ``..``, nothing absolute outside that directory, so a
manifest can never make edgeops read, and send, a file the operator did not put there. Inside the
directory the operator is trusted (a symlink there is the operator's choice).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from edgeops.manifest.models import Fleet
from edgeops.manifest.yamlload import Loc

IDENTITY: Loc = ("spec", "ssh", "identity_file")
PASSWORD: Loc = ("spec", "pull", "password_file")
SIGNING_KEY: Loc = ("spec", "trust", "signing_key")
SECRETS_ENV = "EDGEOPS_SECRETS_DIR"


def default_secrets_dir(home: Path) -> Path:
    return home / ".config" / "edgeops" / "secrets"


class SecretNameError(ValueError):
    """A credential name that does not stay inside the secrets directory."""


def secret_path(secrets_dir: Path, name: str) -> Path:
    """Where a credential named in a fleet lies; refused, without touching the file system, unless inside."""
    if not name or "\0" in name or "\n" in name:
        raise SecretNameError("is empty or has a control character")
    expanded = os.path.expanduser(name) if name.startswith("~") else name
    pure = PurePosixPath(expanded)
    if ".." in pure.parts:
        raise SecretNameError(f"{name} has '..'")
    base = PurePosixPath(os.path.abspath(secrets_dir))
    if pure.is_absolute():
        if not pure.is_relative_to(base) or pure == base:
            raise SecretNameError(f"{name} is outside the secrets directory {base}")
        return Path(pure)
    return Path(base / pure)


def credentials(fleet: Fleet) -> list[tuple[Loc, str]]:
    """The credential fields a fleet sets, with what they say."""
    spec = fleet.spec
    named: list[tuple[Loc, str | None]] = [(IDENTITY, spec.ssh.identity_file),
                                           (PASSWORD, spec.pull.password_file if spec.pull else None),
                                           (SIGNING_KEY, spec.trust.signing_key if spec.trust else None)]
    return [(loc, value) for loc, value in named if value is not None]


def _head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(64)


def credential_problems(fleet: Fleet, secrets_dir: Path) -> list[tuple[Loc, str]]:
    """(field, problem) for every credential a fleet names that is not a usable secret of its kind.

    Beyond the name: a password file must be a file and must not be a private key (a key sent as a broker
    password leaves the controller); one secret serves one purpose; a signing key is the private half.
    """
    problems: list[tuple[Loc, str]] = []
    where = f"{SECRETS_ENV}, here {secrets_dir}"
    seen: dict[Path, Loc] = {}
    for loc, name in credentials(fleet):
        try:
            path = secret_path(secrets_dir, name)
        except SecretNameError as exc:
            problems.append((loc, f"{exc}: a credential is named by its place inside the secrets directory "
                                  f"({where}), e.g. 'lab/client_ed25519'; credentials never come from the "
                                  "repository or elsewhere on the controller"))
            continue
        if path in seen:
            problems.append((loc, f"{name} is also {'.'.join(map(str, seen[path]))}: one secret, one purpose"))
            continue
        seen[path] = loc
        if loc == PASSWORD and path.exists():
            if not path.is_file():
                problems.append((loc, f"{name} is not a file"))
            elif b"PRIVATE KEY" in _head(path) or _head(path).startswith(b"-----BEGIN"):
                problems.append((loc, f"{name} holds a private key, not a broker password: refusing to send it"))
        if loc == SIGNING_KEY and path.is_file() and _head(path).startswith((b"ssh-", b"ecdsa-", b"sk-")):
            problems.append((loc, f"{name} is a public key; name the private release key (without .pub)"))
    return problems
