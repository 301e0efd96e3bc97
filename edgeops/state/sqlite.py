"""The embedded ledger: one SQLite file (WAL), schema-versioned with ``PRAGMA user_version`` and migrated
in place; locks are rows naming the holder's process, taken over when that process is gone."""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgeops.errors import InputError
from edgeops.state.ledger import SCHEMA_VERSION, Lease, Ledger, LedgerError, LockHeld, held_message, now

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment TEXT NOT NULL,
    kind TEXT NOT NULL,               -- apply | rollback | promote | abort
    started_at TEXT NOT NULL,
    finished_at TEXT,
    outcome TEXT,                     -- succeeded | no-op | halted | failed | interrupted | paused
    actor TEXT,
    git_commit TEXT,
    git_author TEXT,
    artifacts TEXT,                   -- JSON {accelerator: sha256}
    summary TEXT                      -- JSON counts and messages
);
CREATE TABLE IF NOT EXISTS device_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
    deployment TEXT NOT NULL,
    device TEXT NOT NULL,             -- fleet/device
    wave INTEGER,
    release_id TEXT,
    from_release TEXT,
    action TEXT NOT NULL,             -- install | update | reverify | rollback | unreachable
    decision TEXT NOT NULL,           -- Passed | Failed | Inconclusive | Unreachable | Skipped | RolledBack
    reason TEXT,
    bytes_moved INTEGER,
    measurements TEXT,                -- JSON: latency (A/B samples), power (with source and boundary), golden
    at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS device_events_by_deployment ON device_events(deployment, device);
CREATE TABLE IF NOT EXISTS fences (fleet TEXT PRIMARY KEY, token INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS locks (
    fleet TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    acquired_at TEXT NOT NULL
);
"""
# version -> what turns the schema before it into that version (run in the transaction that sets the version)
MIGRATIONS = {
    2: """
ALTER TABLE rollouts ADD COLUMN release TEXT;   -- the fleet-wide release an apply rolled out (rel-...)
CREATE TABLE IF NOT EXISTS releases (
    deployment TEXT NOT NULL,
    id TEXT NOT NULL,                 -- rel-...: artifacts + runtime configs without device values
    created_at TEXT NOT NULL,
    artifacts TEXT NOT NULL,          -- JSON {accelerator: sha256}
    configs TEXT NOT NULL,            -- JSON {hardware class: [runtime config, device values as placeholders]}
    PRIMARY KEY (deployment, id)
);
CREATE TABLE IF NOT EXISTS release_members (
    deployment TEXT NOT NULL,
    release TEXT NOT NULL,
    device TEXT NOT NULL,             -- fleet/device
    materialisation TEXT NOT NULL,    -- r-...: the release directory on that device
    PRIMARY KEY (deployment, release, device)
);
CREATE INDEX IF NOT EXISTS release_members_by_device ON release_members(deployment, device, materialisation);
""",
    3: """
CREATE TABLE IF NOT EXISTS fences (fleet TEXT PRIMARY KEY, token INTEGER NOT NULL);  -- a lock's fencing tokens
""",
    4: """
CREATE TABLE IF NOT EXISTS learned (
    digest TEXT PRIMARY KEY,          -- the tensors' digest a federated round records
    data TEXT NOT NULL,               -- base64 of their .npz
    created_at TEXT NOT NULL
);
""",
}


def statements(script: str) -> list[str]:
    lines = [line.split("--")[0] for line in script.splitlines()]
    return [part.strip() for part in "\n".join(lines).split(";") if part.strip()]


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(16) == b"SQLite format 3\x00"


class SqliteLedger(Ledger):
    """The default: a file next to the repository (or EDGEOPS_LEDGER / EDGEOPS_STATE=sqlite:///path)."""

    def __init__(self, path: Path, variable: str = "EDGEOPS_LEDGER") -> None:
        self.path = path
        if path.is_dir() or (path.is_file() and path.stat().st_size and not _is_sqlite(path)):
            raise InputError.at(variable, None, "", f"{path} is {'a directory' if path.is_dir() else 'not an edgeops ledger (SQLite)'}; "
                                "name a new file or an existing ledger")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # one transaction: the schema, its migrations and its version appear together or not at all; the
            # version is read inside it, so two processes opening an old ledger at once migrate it once
            db.execute("BEGIN IMMEDIATE")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                db.execute("ROLLBACK")
                raise LedgerError(f"{self.path} was written by a newer edgeops (schema {version})",
                                  hint="upgrade edgeops")
            if version < SCHEMA_VERSION:
                for statement in statements(SCHEMA) if version == 0 else []:
                    db.execute(statement)
                for step in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                    for statement in statements(MIGRATIONS[step]):
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise LedgerError(f"cannot use the ledger {self.path}: {exc}") from None
        finally:
            db.close()

    @property
    def location(self) -> str:
        return f"sqlite:///{self.path}"

    def _sql(self, text: str) -> str:
        return text

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    @contextmanager
    def lock(self, fleets: list[str], holder: str, wait_s: float = 0) -> Iterator[Lease]:
        me = (holder, os.getpid(), socket.gethostname())
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._take(fleets, me)
                break
            except LockHeld:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        try:
            yield Lease(self.next_tokens(fleets), lambda: self._still_held(fleets, me))
        finally:
            with self._connect() as db:
                for fleet in set(fleets):
                    db.execute("DELETE FROM locks WHERE fleet = ? AND pid = ? AND host = ?", (fleet, me[1], me[2]))

    def _still_held(self, fleets: list[str], me: tuple[str, int, str]) -> str | None:
        with self._connect() as db:
            for fleet in sorted(set(fleets)):
                row = db.execute("SELECT * FROM locks WHERE fleet = ?", (fleet,)).fetchone()
                if row is None or (row["pid"], row["host"]) != (me[1], me[2]):
                    return f"fleet {fleet}'s lock row is gone or another controller's"
        return None

    def _take(self, fleets: list[str], me: tuple[str, int, str]) -> None:
        with self._connect() as db:
            for fleet in sorted(set(fleets)):
                row = db.execute("SELECT * FROM locks WHERE fleet = ?", (fleet,)).fetchone()
                if row is not None and not self._stale(row):
                    raise held_message(fleet, dict(row))
            for fleet in sorted(set(fleets)):
                db.execute("INSERT OR REPLACE INTO locks (fleet, holder, pid, host, acquired_at) VALUES (?, ?, ?, ?, ?)",
                           (fleet, *me, now()))

    @staticmethod
    def _stale(row: Any) -> bool:
        """A lock held by a process on this host that no longer exists."""
        if row["host"] != socket.gethostname():
            return False
        try:
            os.kill(int(row["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
