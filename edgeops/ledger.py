"""The ledger: an SQLite file of every rollout, device decision and the measurements behind it.

Written in transactions, schema-versioned (``PRAGMA user_version``). It holds
names, digests, decisions and numbers only: never keys, hosts' secrets or
manifest contents.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from edgeops.errors import EdgeopsError, ExitCode

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment TEXT NOT NULL,
    kind TEXT NOT NULL,               -- apply | rollback
    started_at TEXT NOT NULL,
    finished_at TEXT,
    outcome TEXT,                     -- succeeded | no-op | halted | failed | interrupted
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
    measurements TEXT,                -- JSON: latency, power (with source and boundary), golden
    at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS device_events_by_deployment ON device_events(deployment, device);
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
}


def _statements(script: str) -> list[str]:
    lines = [line.split("--")[0] for line in script.splitlines()]
    return [part.strip() for part in "\n".join(lines).split(";") if part.strip()]


class LedgerError(EdgeopsError):
    """The ledger file cannot be used."""


class LockHeld(EdgeopsError):
    """Another apply holds the lock on a fleet."""

    exit_code = ExitCode.LOCKED


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Ledger:
    path: Path

    def __post_init__(self) -> None:
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
                for statement in _statements(SCHEMA) if version == 0 else []:
                    db.execute(statement)
                for step in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                    for statement in _statements(MIGRATIONS[step]):
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise LedgerError(f"cannot use the ledger {self.path}: {exc}") from None
        finally:
            db.close()

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

    # ---------------------------------------------------------------- rollouts

    def start_rollout(self, deployment: str, kind: str, actor: str, git: dict[str, str | None],
                      artifacts: dict[str, str], release: str | None = None) -> int:
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO rollouts (deployment, kind, started_at, actor, git_commit, git_author, artifacts, release) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (deployment, kind, now(), actor, git.get("commit"), git.get("author"), json.dumps(artifacts), release))
            return int(cursor.lastrowid)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- fleet-wide releases

    def record_release(self, deployment: str, release: str, artifacts: dict[str, str], configs: dict[str, list[str]],
                       members: dict[str, str]) -> None:
        """A fleet-wide release and each device's materialisation of it (merged with what was recorded before)."""
        with self._connect() as db:
            row = db.execute("SELECT configs FROM releases WHERE deployment = ? AND id = ?", (deployment, release)).fetchone()
            merged = {**json.loads(row["configs"]), **configs} if row else configs
            db.execute("INSERT OR REPLACE INTO releases (deployment, id, created_at, artifacts, configs) VALUES "
                       "(?, ?, COALESCE((SELECT created_at FROM releases WHERE deployment = ? AND id = ?), ?), ?, ?)",
                       (deployment, release, deployment, release, now(), json.dumps(artifacts, sort_keys=True),
                        json.dumps(merged, sort_keys=True)))
            db.executemany("INSERT OR REPLACE INTO release_members (deployment, release, device, materialisation) "
                           "VALUES (?, ?, ?, ?)", [(deployment, release, d, m) for d, m in sorted(members.items())])

    def release(self, deployment: str, name: str) -> dict[str, Any] | None:
        """A fleet-wide release by its id or an unambiguous prefix of it: artifacts, configs, members."""
        with self._connect() as db:
            rows = [dict(r) for r in db.execute("SELECT * FROM releases WHERE deployment = ? ORDER BY created_at, rowid",
                                                (deployment,)) if r["id"].startswith(name)]
            if len(rows) > 1:
                raise LedgerError(f"'{name}' names {len(rows)} releases of {deployment} "
                                  f"({', '.join(r['id'] for r in rows[:5])})", hint="give more of the id")
            if not rows:
                return None
            found = rows[0]
            found["artifacts"], found["configs"] = json.loads(found["artifacts"]), json.loads(found["configs"])
            found["members"] = {r["device"]: r["materialisation"] for r in db.execute(
                "SELECT device, materialisation FROM release_members WHERE deployment = ? AND release = ?",
                (deployment, found["id"]))}
        return found

    def release_names(self, deployment: str) -> dict[tuple[str, str], str]:
        """(device, materialisation) -> the newest fleet-wide release it belongs to."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT m.device, m.materialisation, m.release FROM release_members AS m JOIN releases AS r ON "
                "r.deployment = m.deployment AND r.id = m.release WHERE m.deployment = ? "
                "ORDER BY r.created_at, r.rowid", (deployment,)).fetchall()
        return {(r["device"], r["materialisation"]): r["release"] for r in rows}

    def finish_rollout(self, rollout_id: int, outcome: str, summary: dict[str, Any]) -> None:
        with self._connect() as db:
            db.execute("UPDATE rollouts SET finished_at = ?, outcome = ?, summary = ? WHERE id = ?",
                       (now(), outcome, json.dumps(summary, sort_keys=True), rollout_id))

    def device_event(self, rollout_id: int, deployment: str, device: str, action: str, decision: str, *,
                     wave: int | None = None, release_id: str | None = None, from_release: str | None = None,
                     reason: str = "", bytes_moved: int = 0, measurements: dict[str, Any] | None = None) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO device_events (rollout_id, deployment, device, wave, release_id, from_release, action, "
                "decision, reason, bytes_moved, measurements, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rollout_id, deployment, device, wave, release_id, from_release, action, decision, reason,
                 bytes_moved, json.dumps(measurements or {}, sort_keys=True), now()))

    def history(self, deployment: str, limit: int = 20, number: int | None = None) -> list[dict[str, Any]]:
        """Newest rollouts first, each with its device events and its ``number`` within the deployment
        (``number``: only that one)."""
        with self._connect() as db:
            rollouts = [dict(r) for r in db.execute(
                "SELECT * FROM (SELECT *, (SELECT COUNT(*) FROM rollouts AS earlier WHERE earlier.deployment = "
                "rollouts.deployment AND earlier.id <= rollouts.id) AS number FROM rollouts WHERE deployment = ?) "
                "WHERE ? IS NULL OR number = ? ORDER BY id DESC LIMIT ?", (deployment, number, number, limit))]
            for rollout in rollouts:
                rollout["artifacts"] = json.loads(rollout["artifacts"] or "{}")
                rollout["summary"] = json.loads(rollout["summary"] or "{}")
                rollout["devices"] = [
                    {**dict(e), "measurements": json.loads(e["measurements"] or "{}")}
                    for e in db.execute("SELECT * FROM device_events WHERE rollout_id = ? ORDER BY id", (rollout["id"],))]
        return rollouts

    def last_successful_summary(self, deployment: str) -> dict[str, Any] | None:
        """The summary of the deployment's last apply that succeeded (rollbacks, promotes and aborts carry no
        recipe: the plan compares the recipe with the last one that was rolled out)."""
        with self._connect() as db:
            row = db.execute("SELECT summary FROM rollouts WHERE deployment = ? AND outcome = 'succeeded' "
                             "AND kind = 'apply' ORDER BY id DESC LIMIT 1", (deployment,)).fetchone()
        return None if row is None else json.loads(row["summary"] or "{}")

    # ---------------------------------------------------------------- locks

    @contextmanager
    def lock(self, fleets: list[str], holder: str, wait_s: float = 0) -> Iterator[None]:
        """Hold the lock on every fleet (apply and rollback), waiting up to ``wait_s``; else raise LockHeld."""
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
            yield
        finally:
            with self._connect() as db:
                for fleet in set(fleets):
                    db.execute("DELETE FROM locks WHERE fleet = ? AND pid = ? AND host = ?", (fleet, me[1], me[2]))

    def _take(self, fleets: list[str], me: tuple[str, int, str]) -> None:
        with self._connect() as db:
            for fleet in sorted(set(fleets)):
                row = db.execute("SELECT * FROM locks WHERE fleet = ?", (fleet,)).fetchone()
                if row is not None and not self._stale(row):
                    raise LockHeld(f"fleet '{fleet}' is locked by {row['holder']} (pid {row['pid']} on "
                                   f"{row['host']}, since {row['acquired_at']})",
                                   hint="wait for it to finish or pass --lock-timeout; a lock whose process died "
                                        "is taken over")
            for fleet in sorted(set(fleets)):
                db.execute("INSERT OR REPLACE INTO locks (fleet, holder, pid, host, acquired_at) VALUES (?, ?, ?, ?, ?)",
                           (fleet, *me, now()))

    @staticmethod
    def _stale(row: sqlite3.Row) -> bool:
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

