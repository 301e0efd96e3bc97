"""The ledger: every rollout, device decision and the measurements behind it, the fleet-wide releases, and
the fleet locks, behind one interface whatever engine keeps them (SQLite embedded, PostgreSQL for teams).

It holds names, digests, decisions and numbers only: never keys, hosts' secrets or manifest contents. The
numbers include the heads federated rounds learned (``learned``, by digest): what a fleet runs is then known
to every controller that shares the ledger, not only to the one whose cache made it.
The queries are written once, in the SQL both engines speak (``?`` placeholders, ``ON CONFLICT``,
``RETURNING``); an engine brings its connection, its schema and its locks.
"""

from __future__ import annotations

import base64
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from edgeops.errors import EdgeopsError, ExitCode

SCHEMA_VERSION = 4


class LedgerError(EdgeopsError):
    """The ledger cannot be used."""


class LockHeld(EdgeopsError):
    """Another apply holds the lock on a fleet."""

    exit_code = ExitCode.LOCKED


class LockLost(EdgeopsError):
    """The lock this controller held was lost (its connection dropped, or another controller took it)."""

    exit_code = ExitCode.LOCKED


class Lease:
    """A held lock on some fleets: a fencing token per fleet (grows with every acquisition, so a device can
    refuse a change from a holder older than the last it saw) and ``check``, which raises LockLost the moment
    the lock is gone. The executor checks before every device step."""

    def __init__(self, tokens: dict[str, int], alive: Callable[[], str | None] = lambda: None) -> None:
        self.tokens = tokens
        self._alive = alive
        self.lost: str | None = None

    def token(self, fleet: str) -> int | None:
        return self.tokens.get(fleet)

    def check(self) -> None:
        if self.lost is None:
            self.lost = self._alive()
        if self.lost is not None:
            raise LockLost(f"the lock on fleet(s) {', '.join(sorted(self.tokens))} was lost: {self.lost}; no new "
                           "device step was started after that",
                           hint="another controller may now hold the fleet: read `edgeops status`, then run again")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def held_message(fleet: str, row: dict[str, Any] | None) -> LockHeld:
    who = f"{row['holder']} (pid {row['pid']} on {row['host']}, since {row['acquired_at']})" if row else "another controller"
    return LockHeld(f"fleet '{fleet}' is locked by {who}",
                    hint="wait for it to finish or pass --lock-timeout; a lock whose controller died is taken over")


class Ledger(ABC):
    """What every operation records and reads; ``lock`` keeps two controllers off one fleet."""

    @abstractmethod
    def _connect(self) -> AbstractContextManager[Any]:
        """One transaction: yields a connection whose ``execute(sql, params)`` returns rows as mappings."""

    @abstractmethod
    def _sql(self, text: str) -> str:
        """The engine's spelling of a query written with ``?`` placeholders."""

    @abstractmethod
    def lock(self, fleets: list[str], holder: str, wait_s: float = 0) -> AbstractContextManager[Lease]:
        """Hold the lock on every fleet (apply and rollback), waiting up to ``wait_s``; else raise LockHeld."""

    def next_tokens(self, fleets: list[str]) -> dict[str, int]:
        """One more fencing token per fleet (taken with the lock: a later holder always has a larger one)."""
        tokens = {}
        with self._connect() as db:
            for fleet in sorted(set(fleets)):
                row = db.execute(self._sql("INSERT INTO fences (fleet, token) VALUES (?, 1) ON CONFLICT (fleet) DO "
                                           "UPDATE SET token = fences.token + 1 RETURNING token"), (fleet,)).fetchone()
                tokens[fleet] = int(row["token"])
        return tokens

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the ledger lives, for people (never with a password)."""

    def _rows(self, db: Any, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in db.execute(self._sql(sql), params).fetchall()]

    # ---------------------------------------------------------------- rollouts

    def start_rollout(self, deployment: str, kind: str, actor: str, git: dict[str, str | None],
                      artifacts: dict[str, str], release: str | None = None) -> int:
        with self._connect() as db:
            row = self._rows(db, "INSERT INTO rollouts (deployment, kind, started_at, actor, git_commit, git_author, "
                                 "artifacts, release) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                             (deployment, kind, now(), actor, git.get("commit"), git.get("author"),
                              json.dumps(artifacts), release))
            return int(row[0]["id"])

    def finish_rollout(self, rollout_id: int, outcome: str, summary: dict[str, Any]) -> None:
        with self._connect() as db:
            db.execute(self._sql("UPDATE rollouts SET finished_at = ?, outcome = ?, summary = ? WHERE id = ?"),
                       (now(), outcome, json.dumps(summary, sort_keys=True), rollout_id))

    def device_event(self, rollout_id: int, deployment: str, device: str, action: str, decision: str, *,
                     wave: int | None = None, release_id: str | None = None, from_release: str | None = None,
                     reason: str = "", bytes_moved: int = 0, measurements: dict[str, Any] | None = None) -> None:
        with self._connect() as db:
            db.execute(self._sql(
                "INSERT INTO device_events (rollout_id, deployment, device, wave, release_id, from_release, action, "
                "decision, reason, bytes_moved, measurements, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                (rollout_id, deployment, device, wave, release_id, from_release, str(action), str(decision), reason,
                 bytes_moved, json.dumps(measurements or {}, sort_keys=True), now()))

    def history(self, deployment: str, limit: int = 20, number: int | None = None) -> list[dict[str, Any]]:
        """Newest rollouts first, each with its device events and its ``number`` within the deployment
        (``number``: only that one)."""
        numbered = ("SELECT *, (SELECT COUNT(*) FROM rollouts AS earlier WHERE earlier.deployment = "
                    "rollouts.deployment AND earlier.id <= rollouts.id) AS number FROM rollouts WHERE deployment = ?")
        with self._connect() as db:
            if number is None:
                rollouts = self._rows(db, f"{numbered} ORDER BY id DESC LIMIT ?", (deployment, limit))
            else:
                rollouts = self._rows(db, f"SELECT * FROM ({numbered}) AS numbered WHERE number = ?",
                                      (deployment, number))
            for rollout in rollouts:
                rollout["number"] = int(rollout["number"])
                rollout["artifacts"] = json.loads(rollout["artifacts"] or "{}")
                rollout["summary"] = json.loads(rollout["summary"] or "{}")
                rollout["devices"] = [
                    {**e, "measurements": json.loads(e["measurements"] or "{}")}
                    for e in self._rows(db, "SELECT * FROM device_events WHERE rollout_id = ? ORDER BY id",
                                        (rollout["id"],))]
        return rollouts

    def number_of(self, deployment: str, rollout_id: int) -> int:
        """A rollout's number within its deployment: the one number `history`, `report` and webhooks show."""
        with self._connect() as db:
            rows = self._rows(db, "SELECT COUNT(*) AS n FROM rollouts WHERE deployment = ? AND id <= ?",
                              (deployment, rollout_id))
        return int(rows[0]["n"])

    def last_successful_summary(self, deployment: str) -> dict[str, Any] | None:
        """The summary of the deployment's last apply that succeeded (rollbacks, promotes and aborts carry no
        recipe: the plan compares the recipe with the last one that was rolled out)."""
        with self._connect() as db:
            rows = self._rows(db, "SELECT summary FROM rollouts WHERE deployment = ? AND outcome = 'succeeded' "
                                  "AND kind IN ('apply', 'resume') ORDER BY id DESC LIMIT 1", (deployment,))
        return None if not rows else dict(json.loads(rows[0]["summary"] or "{}"))

    def summaries(self, deployment: str, kind: str) -> list[dict[str, Any]]:
        """Every finished record of ``kind`` for the deployment, oldest first: id, outcome, summary."""
        with self._connect() as db:
            rows = self._rows(db, "SELECT id, outcome, started_at, finished_at, summary FROM rollouts WHERE "
                                  "deployment = ? AND kind = ? AND outcome IS NOT NULL ORDER BY id",
                              (deployment, kind))
        return [{**r, "summary": json.loads(r["summary"] or "{}")} for r in rows]

    # ---------------------------------------------------------------- fleet-wide releases

    def record_release(self, deployment: str, release: str, artifacts: dict[str, str], configs: dict[str, list[str]],
                       members: dict[str, str]) -> None:
        """A fleet-wide release and each device's materialisation of it (merged with what was recorded before)."""
        with self._connect() as db:
            found = self._rows(db, "SELECT configs FROM releases WHERE deployment = ? AND id = ?", (deployment, release))
            merged = {**json.loads(found[0]["configs"]), **configs} if found else configs
            db.execute(self._sql(
                "INSERT INTO releases (deployment, id, created_at, artifacts, configs) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (deployment, id) DO UPDATE SET configs = excluded.configs"),
                (deployment, release, now(), json.dumps(artifacts, sort_keys=True), json.dumps(merged, sort_keys=True)))
            for device, materialisation in sorted(members.items()):
                db.execute(self._sql(
                    "INSERT INTO release_members (deployment, release, device, materialisation) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (deployment, release, device) DO UPDATE SET materialisation = excluded.materialisation"),
                    (deployment, release, device, materialisation))

    def release(self, deployment: str, name: str) -> dict[str, Any] | None:
        """A fleet-wide release by its id or an unambiguous prefix of it: artifacts, configs, members."""
        with self._connect() as db:
            rows = [r for r in self._rows(db, "SELECT * FROM releases WHERE deployment = ? ORDER BY created_at, id",
                                          (deployment,)) if r["id"].startswith(name)]
            if len(rows) > 1:
                raise LedgerError(f"'{name}' names {len(rows)} releases of {deployment} "
                                  f"({', '.join(r['id'] for r in rows[:5])})", hint="give more of the id")
            if not rows:
                return None
            found = rows[0]
            found["artifacts"], found["configs"] = json.loads(found["artifacts"]), json.loads(found["configs"])
            found["members"] = {r["device"]: r["materialisation"] for r in self._rows(
                db, "SELECT device, materialisation FROM release_members WHERE deployment = ? AND release = ?",
                (deployment, found["id"]))}
        return found

    def release_names(self, deployment: str) -> dict[tuple[str, str], str]:
        """(device, materialisation) -> the newest fleet-wide release it belongs to."""
        with self._connect() as db:
            rows = self._rows(
                db, "SELECT m.device, m.materialisation, m.release FROM release_members AS m JOIN releases AS r ON "
                    "r.deployment = m.deployment AND r.id = m.release WHERE m.deployment = ? ORDER BY r.created_at",
                (deployment,))
        return {(r["device"], r["materialisation"]): r["release"] for r in rows}

    # ---------------------------------------------------------------- learned tensors

    def keep_learned(self, digest: str, data: bytes) -> None:
        """The file of tensors a federated round learned (an .npz), under the digest the rounds record."""
        with self._connect() as db:
            db.execute(self._sql("INSERT INTO learned (digest, data, created_at) VALUES (?, ?, ?) "
                                 "ON CONFLICT (digest) DO NOTHING"), (digest, base64.b64encode(data).decode(), now()))

    def learned(self, digest: str) -> bytes | None:
        with self._connect() as db:
            rows = self._rows(db, "SELECT data FROM learned WHERE digest = ?", (digest,))
        return base64.b64decode(rows[0]["data"]) if rows else None

    # ---------------------------------------------------------------- copying

    TABLES = ("rollouts", "device_events", "releases", "release_members", "learned")

    def export_rows(self) -> dict[str, list[dict[str, Any]]]:
        """Every row of every history table (not the locks), for ``edgeops state migrate``."""
        with self._connect() as db:
            return {table: self._rows(db, f"SELECT * FROM {table} ORDER BY 1") for table in self.TABLES}

    def is_empty(self) -> bool:
        with self._connect() as db:
            return not self._rows(db, "SELECT id FROM rollouts LIMIT 1")

    def import_rows(self, rows: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
        """Append another ledger's rows in one transaction (rollout ids renumbered, events follow them)."""
        counts = {table: 0 for table in self.TABLES}
        with self._connect() as db:
            ids: dict[int, int] = {}
            for rollout in rows.get("rollouts", []):
                values = {k: v for k, v in rollout.items() if k != "id"}
                new = self._rows(db, f"INSERT INTO rollouts ({', '.join(values)}) VALUES "
                                     f"({', '.join('?' * len(values))}) RETURNING id", tuple(values.values()))
                ids[int(rollout["id"])] = int(new[0]["id"])
                counts["rollouts"] += 1
            for event in rows.get("device_events", []):
                values = {k: v for k, v in event.items() if k != "id"}
                values["rollout_id"] = ids[int(event["rollout_id"])]
                db.execute(self._sql(f"INSERT INTO device_events ({', '.join(values)}) VALUES "
                                     f"({', '.join('?' * len(values))})"), tuple(values.values()))
                counts["device_events"] += 1
            for table, keys in (("releases", "deployment, id"), ("release_members", "deployment, release, device"),
                                ("learned", "digest")):
                for row in rows.get(table, []):
                    db.execute(self._sql(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))}) "
                                         f"ON CONFLICT ({keys}) DO NOTHING"), tuple(row.values()))
                    counts[table] += 1
        return counts
