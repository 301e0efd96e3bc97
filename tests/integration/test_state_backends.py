"""The ledger behind one interface, on both engines: SQLite (embedded) and a real PostgreSQL cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.errors import ExitCode
from edgeops.state import Ledger, LockHeld, open_ledger
from labkit.repo import copy_repo


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'ledger.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))


def record(ledger: Ledger, deployment: str, kind: str = "apply", outcome: str = "succeeded") -> int:
    rollout = ledger.start_rollout(deployment, kind, "ci", {"commit": "abc", "author": "Ada"}, {"cpu": "f00d"},
                                   "rel-0123456789ab" if kind == "apply" else None)
    ledger.device_event(rollout, deployment, "lab/lab-01", "install", "Passed", wave=1, release_id="r-1",
                        measurements={"latency": {"p95_ms": 1.5}, "samples_ms": {"new": [1.0, 1.1]}})
    ledger.finish_rollout(rollout, outcome, {"message": "ok", "recipe": {"cpu": []}})
    return rollout


def test_both_engines_keep_the_same_history_numbers_and_releases(url: str, tmp_path: Path) -> None:
    ledger = open_ledger(url, tmp_path / "unused.sqlite")
    record(ledger, "a")
    record(ledger, "b")
    record(ledger, "a", kind="rollback")
    newest = ledger.history("a")
    assert [(r["number"], r["kind"], r["release"]) for r in newest] == [(2, "rollback", None),
                                                                       (1, "apply", "rel-0123456789ab")]
    assert newest[1]["devices"][0]["measurements"]["samples_ms"]["new"] == [1.0, 1.1]
    assert ledger.history("a", number=1)[0]["kind"] == "apply" and ledger.history("a", number=3) == []
    assert ledger.last_successful_summary("a") == {"message": "ok", "recipe": {"cpu": []}}
    ledger.record_release("a", "rel-0123456789ab", {"cpu": "f00d"}, {"x86": ["{}"]}, {"lab/lab-01": "r-1"})
    ledger.record_release("a", "rel-0123456789ab", {"cpu": "f00d"}, {"arm": ["{}"]}, {"lab/lab-02": "r-2"})
    found = ledger.release("a", "rel-0123")
    assert found is not None and found["members"] == {"lab/lab-01": "r-1", "lab/lab-02": "r-2"}
    assert ledger.release_names("a") == {("lab/lab-01", "r-1"): "rel-0123456789ab",
                                         ("lab/lab-02", "r-2"): "rel-0123456789ab"}


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from edgeops.state import open_ledger
    with open_ledger(sys.argv[1], Path(sys.argv[2])).lock(["lab"], holder="the other controller"):
        print("held", flush=True)
        time.sleep(120)
""")


def test_a_fleet_lock_refuses_a_second_controller_and_is_freed_when_its_holder_dies(url: str, tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url, str(tmp_path / "unused.sqlite")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        ledger = open_ledger(url, tmp_path / "unused.sqlite")
        with pytest.raises(LockHeld, match="locked by the other controller") as refused:
            with ledger.lock(["lab", "other"], holder="me"):
                pass
        assert refused.value.exit_code == ExitCode.LOCKED
        with ledger.lock(["other"], holder="me"):  # another fleet is free
            pass
    finally:
        holder.kill()  # SIGKILL: no clean-up runs; the engine must notice on its own
        holder.wait()
    with ledger.lock(["lab"], holder="me", wait_s=10):
        pass


def test_state_migrate_copies_a_sqlite_history_into_postgresql_once(postgres_url: str, tmp_path: Path) -> None:
    repo = copy_repo(tmp_path / "repo")
    sqlite = open_ledger(None, repo / ".edgeops" / "ledger.sqlite")
    record(sqlite, "wearable-activity")
    record(sqlite, "wearable-activity", kind="rollback")
    sqlite.record_release("wearable-activity", "rel-0123456789ab", {"cpu": "f00d"}, {"x86": ["{}"]},
                          {"lab/lab-01": "r-1"})
    secret = postgres_url.replace("edgeops@", "edgeops:hunter2@")  # trust auth ignores it; it must never show
    runner = CliRunner()
    result = runner.invoke(main, ["state", "migrate", "--to", secret, "--root", str(repo)])
    assert result.exit_code == 0, result.output
    assert "copied 2 rollout(s), 2 device decision(s) and 1 release(s)" in result.output
    assert "hunter2" not in result.output
    env = {"EDGEOPS_STATE": secret}
    shown = runner.invoke(main, ["state", "show", "--root", str(repo)], env=env)
    assert shown.output.strip() == postgres_url.replace("edgeops@", "edgeops:***@")
    history = runner.invoke(main, ["history", "wearable-activity", "-o", "json", "--root", str(repo)], env=env)
    copied = json.loads(history.stdout)
    assert [(r["number"], r["kind"], r["actor"]) for r in copied] == [(2, "rollback", "ci"), (1, "apply", "ci")]
    assert open_ledger(postgres_url, tmp_path / "x").release("wearable-activity", "rel-0") is not None
    again = runner.invoke(main, ["state", "migrate", "--to", postgres_url, "--root", str(repo)])
    assert again.exit_code == ExitCode.FAILED and "already holds rollouts: nothing was copied" in again.output
    assert len(open_ledger(postgres_url, tmp_path / "x").history("wearable-activity")) == 2


def test_an_unknown_or_unreachable_state_backend_is_a_clear_error(tmp_path: Path) -> None:
    repo = copy_repo(tmp_path / "repo")
    runner = CliRunner()
    unknown = runner.invoke(main, ["history", "wearable-activity", "--root", str(repo)],
                            env={"EDGEOPS_STATE": "mysql://x@localhost/db"})
    assert unknown.exit_code == ExitCode.INVALID and "EDGEOPS_STATE: mysql://...: not a state backend edgeops knows" \
        in unknown.output  # the environment is input: exit 3, naming the variable
    closed = runner.invoke(main, ["history", "wearable-activity", "--root", str(repo)],
                           env={"EDGEOPS_STATE": "postgresql://edgeops:pw@127.0.0.1:9/db"})
    assert closed.exit_code == ExitCode.FAILED and "cannot reach the ledger at postgresql://edgeops:***@" in closed.output
    assert "Traceback" not in closed.output and "pw@" not in closed.output


def test_a_head_one_controller_learned_reaches_another_through_the_shared_ledger(url: str, tmp_path: Path) -> None:
    """Two controllers, one ledger, caches of their own: the second plans what the first's federated rounds
    released (the learned tensors travel with the ledger, checked against their digest)."""
    import numpy as np

    from edgeops.adapt.artifact import load_tensors, tensors_file
    from edgeops.compress.cache import Cache
    from edgeops.errors import EdgeopsError
    from edgeops.manifest.models import AdaptSpec
    from edgeops.manifest.workspace import load_workspace
    from edgeops.operations import Repo, current_adaptation, keep_learned

    ws = load_workspace(copy_repo(tmp_path / "repo"))
    plain = ws.deployments["wearable-activity"]  # with a federated section: what current_adaptation reads
    doc = replace(plain, obj=plain.obj.model_copy(update={"spec": plain.obj.spec.model_copy(
        update={"adapt": AdaptSpec()})}))
    ledger = open_ledger(url, tmp_path / "unused.sqlite")
    first, second = (Repo(ws, ledger, Cache(tmp_path / name), "ci") for name in ("first", "second"))
    head = {"head.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "head.bias": np.ones(4, np.float32)}
    own = {"head.weight": np.zeros((3, 4), np.float32), "head.bias": np.ones(4, np.float32)}
    digest, personal = keep_learned(first, head), keep_learned(first, own)
    rollout = ledger.start_rollout(doc.name, "adapt", "ci", {"commit": "abc", "author": "Ada"}, {"cpu": "f00d"})
    ledger.finish_rollout(rollout, "released", {"tensors_sha256": digest, "bases": {"cpu": "f00d"},
                                                "personal": {"lab/lab-02": personal}})
    assert not tensors_file(second.cache, digest).exists()
    found = current_adaptation(second, doc)
    assert found is not None and found.tensors_sha256 == digest
    for name, tensors in ((digest, head), (personal, own)):
        got = load_tensors(second.cache, name)
        assert all(np.array_equal(got[k], v) for k, v in tensors.items())
    # a damaged copy in the ledger is refused, and nothing of it is left in the cache
    third = Repo(ws, ledger, Cache(tmp_path / "third"), "ci")
    ledger.keep_learned("0" * 64, tensors_file(first.cache, digest).read_bytes())  # bytes under another digest
    rollout = ledger.start_rollout(doc.name, "adapt", "ci", {"commit": "abc", "author": "Ada"}, {"cpu": "f00d"})
    ledger.finish_rollout(rollout, "released", {"tensors_sha256": "0" * 64, "bases": {"cpu": "f00d"}})
    with pytest.raises(EdgeopsError, match="does not hash to its digest"):
        current_adaptation(third, doc)
    assert not tensors_file(third.cache, "0" * 64).exists()
