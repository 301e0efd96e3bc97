"""What the environment configures, read once by the command line and passed down.

Library code never reads ``os.environ``: the CLI builds one ``Settings`` per run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENVIRONMENT = {
    "EDGEOPS_CACHE_DIR": "where built artifacts are cached (default: <repo>/.edgeops/cache)",
    "EDGEOPS_LEDGER": "the SQLite ledger file (default: <repo>/.edgeops/ledger.sqlite)",
    "EDGEOPS_STATE": "where history and locks live, as a URL: sqlite:///abs/path.sqlite or postgresql://user@host:port/db "
                     "(shared by a team and its CI; the password from PGPASSWORD or ~/.pgpass); overrides EDGEOPS_LEDGER",
    "EDGEOPS_ACTOR": "who the ledger and the devices record as acting (default: $USER, else the OS account)",
    "EDGEOPS_ALLOW_CODE": "1: allow manifest fields that run code (a student factory); never set it for a pull "
                          "request's plan",
    "EDGEOPS_SIGNING_KEY": "the private release key that signs releases (overrides the fleets' trust.signing_key)",
    "EDGEOPS_BROKER_PASSWORD": "the controller's MQTT broker password for pull-mode fleets (overrides their "
                               "pull.password_file)",
    "EDGEOPS_SECRETS_DIR": "the controller's secrets directory: fleets name their credential files (ssh.identity_file, "
                           "pull.password_file, trust.signing_key) inside it (default: ~/.config/edgeops/secrets)",
    "EDGEOPS_WEBHOOKS": "space-separated URLs that get every rollout's outcome as JSON (prefix slack+ for Slack's "
                        "payload); failed deliveries go to <repo>/.edgeops/webhooks-dead-letter.jsonl",
}


def _login_name() -> str:
    """The OS account running edgeops (a container's root has no $USER)."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid-{os.getuid()}"


@dataclass(frozen=True)
class Settings:
    root: Path | None = None          # the repository root; found from the manifests when None
    cache_dir: Path | None = None
    ledger_file: Path | None = None
    state_url: str | None = None      # EDGEOPS_STATE: another ledger than the SQLite file (PostgreSQL)
    actor: str = "edgeops"
    allow_code: bool = False          # fields that run code (student.factory) are errors
    signing_key: Path | None = None   # overrides the fleets' trust.signing_key
    webhooks: tuple[str, ...] = ()
    broker_password: str | None = None  # pull fleets' MQTT broker (overrides pull.password_file)
    secrets_dir: Path | None = None     # where fleets' credential files lie (None: ~/.config/edgeops/secrets)
    allow_empty: bool = False           # --allow-empty: selectors and waves that take no device only warn
    warn: Callable[[str], None] = field(default=lambda message: None, compare=False, repr=False)  # the CLI's

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], root: Path | None = None) -> Settings:
        def path(name: str) -> Path | None:
            return Path(environ[name]) if environ.get(name) else None

        return cls(root=root.resolve() if root else None, cache_dir=path("EDGEOPS_CACHE_DIR"),
                   ledger_file=path("EDGEOPS_LEDGER"), state_url=environ.get("EDGEOPS_STATE") or None,
                   actor=environ.get("EDGEOPS_ACTOR") or environ.get("USER") or environ.get("LOGNAME")
                   or _login_name(),
                   allow_code=environ.get("EDGEOPS_ALLOW_CODE", "") in ("1", "true", "yes"),
                   signing_key=path("EDGEOPS_SIGNING_KEY"),
                   webhooks=tuple(environ.get("EDGEOPS_WEBHOOKS", "").split()),
                   broker_password=environ.get("EDGEOPS_BROKER_PASSWORD") or None,
                   secrets_dir=path("EDGEOPS_SECRETS_DIR"))

    def cache_in(self, repo: Path) -> Path:
        return self.cache_dir or repo / ".edgeops" / "cache"

    def ledger_in(self, repo: Path) -> Path:
        return self.ledger_file or repo / ".edgeops" / "ledger.sqlite"
