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
