"""Two controllers in two clones, one PostgreSQL ledger, one lab fleet of real sshd devices: one history,
one lock (the second controller is refused, or waits), as two CI runners of one team would be."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.errors import ExitCode
from labkit.postgres import fresh_database
from labkit.repo import running_lab

pytestmark = pytest.mark.ssh
MANIFEST = "manifests/wearable.yaml"


def wait_for_lock(url: str, seconds: float = 90) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with psycopg.connect(url) as db:
            try:
                row = db.execute("SELECT holder FROM locks WHERE fleet = 'lab'").fetchone()
            except psycopg.errors.UndefinedTable:  # the first controller has not opened the ledger yet
                row = None
        if row:
            return str(row[0])
        time.sleep(0.05)
    raise AssertionError("the first controller never took the fleet's lock")


def test_two_controllers_share_one_history_and_one_lock(tmp_path_factory: pytest.TempPathFactory, hostile_home: Path,
                                                        postgres_server: str) -> None:
    url = fresh_database(postgres_server, "two_controllers")
    base = tmp_path_factory.mktemp("shared-state")
    with running_lab(base, 2, hostile_home) as first:
        second = base / "second-clone"  # its own checkout and build cache, the same deploy key and database
        shutil.copytree(first, second, ignore=shutil.ignore_patterns("cache", "ledger.sqlite*"))
        runner_b = {"EDGEOPS_STATE": url, "EDGEOPS_ACTOR": "runner-b"}
        a = subprocess.Popen([sys.executable, "-m", "edgeops", "apply", MANIFEST, "--root", str(first)],
                             env={**os.environ, "EDGEOPS_STATE": url, "EDGEOPS_ACTOR": "runner-a"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert wait_for_lock(url) == "runner-a applying wearable-activity"
            refused = CliRunner().invoke(main, ["apply", MANIFEST, "--root", str(second)], env=runner_b)
            assert refused.exit_code == ExitCode.LOCKED, refused.output
            assert "fleet 'lab' is locked by runner-a applying wearable-activity" in refused.output
            waited = CliRunner().invoke(main, ["apply", MANIFEST, "--lock-timeout", "180s", "--root", str(second)],
                                        env=runner_b)
            output, _ = a.communicate(timeout=180)
        finally:
            a.kill()
        assert a.returncode == 0, output
        assert waited.exit_code == ExitCode.OK, waited.output  # after A: the devices run what B's git asks for
        history = CliRunner().invoke(main, ["history", "wearable-activity", "-o", "json", "--root", str(second)],
                                     env=runner_b)
        rollouts = json.loads(history.stdout)
        assert [(r["number"], r["actor"], r["outcome"]) for r in rollouts] == [(1, "runner-a", "succeeded")]
        assert {e["device"] for e in rollouts[0]["devices"]} == {"lab/lab-01", "lab/lab-02"}
        assert not (second / ".edgeops" / "ledger.sqlite").exists()  # nothing went to a local file instead


def test_a_lost_lock_stops_its_controller_and_one_controller_changes_devices_at_a_time(
        tmp_path_factory: pytest.TempPathFactory, hostile_home: Path, postgres_server: str) -> None:
    """The lock's PostgreSQL session is terminated mid-apply (a server restart, a failover, an idle timeout)
    while a second controller waits: the first notices before its next device step and stops (exit 5, named,
    no traceback), the second takes over, and no device is ever changed by both in overlapping steps (the
    devices' fencing tokens refuse the older holder)."""
    url = fresh_database(postgres_server, "lost_lock")
    base = tmp_path_factory.mktemp("lost-lock")
    with running_lab(base, 4, hostile_home) as root:
        manifest = root / MANIFEST
        manifest.write_text(manifest.read_text().replace("    waves: [1, 50%, 100%]",
                                                         "    waves: [1, 2, 100%]\n    bake_time_s: 4"))
        a = subprocess.Popen([sys.executable, "-m", "edgeops", "apply", MANIFEST, "--root", str(root)],
                             env={**os.environ, "EDGEOPS_STATE": url, "EDGEOPS_ACTOR": "runner-a"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert wait_for_lock(url) == "runner-a applying wearable-activity"
            b = subprocess.Popen([sys.executable, "-m", "edgeops", "apply", MANIFEST, "--lock-timeout", "180s",
                                  "--root", str(root)],
                                 env={**os.environ, "EDGEOPS_STATE": url, "EDGEOPS_ACTOR": "runner-b"},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(2)  # A is inside its rollout (a bake of 4 s between waves), B waits for the lock
            with psycopg.connect(url, autocommit=True) as db:
                killed = db.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                                    "AND granted AND pid <> pg_backend_pid()").fetchall()
            assert killed, "no advisory lock to take away"
            out_a, _ = a.communicate(timeout=300)
            out_b, _ = b.communicate(timeout=300)
        finally:
            a.kill()
            b.kill() if "b" in locals() else None
        assert "Traceback" not in out_a and "Traceback" not in out_b, out_a + out_b
        assert a.returncode == ExitCode.LOCKED and "lock was lost" in out_a, out_a
        assert b.returncode == ExitCode.OK, out_b
        from edgeops.manifest.workspace import load_workspace
        from edgeops.targets import target_devices

        for target in target_devices(load_workspace(root), "wearable-activity"):
            state = json.loads((Path(target.root) / "deployments/wearable-activity/state.json").read_text())
            actors = [e["by"] for e in state["history"] if e.get("by") in ("runner-a", "runner-b")]
            first_b = actors.index("runner-b") if "runner-b" in actors else len(actors)
            assert "runner-a" not in actors[first_b:], (target.name, actors)  # never A after B: no overlap
