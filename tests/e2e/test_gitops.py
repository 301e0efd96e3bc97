"""GitOps: which deployments a git change touches, the PR comment, apply on merge, locks and drift."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.connections import Connections
from edgeops.errors import ExitCode
from edgeops.gitdiff import changed_files, touched_deployments
from edgeops.manifest.workspace import load_workspace
from edgeops.rollout import device_for, orders_for
from edgeops.targets import target_devices
from labkit.artifacts import repo_at
from labkit.repo import REPO, copy_repo, write_lab_fleet

GOLDEN = Path(__file__).resolve().parent / "golden" / "plan-wearable.md"
ENV = {"GIT_AUTHOR_NAME": "Ada Tester", "GIT_AUTHOR_EMAIL": "ada@example.org", "GIT_COMMITTER_NAME": "Ada Tester",
       "GIT_COMMITTER_EMAIL": "ada@example.org", "PATH": "/usr/bin:/bin:/usr/local/bin"}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True,
                          env=ENV).stdout.strip()


def commit_all(root: Path, message: str) -> str:
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)
    return git(root, "rev-parse", "HEAD")


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    root = copy_repo(tmp_path / "repo")
    (root / ".gitignore").write_text(".edgeops/\n")
    git(root, "init", "-q", "-b", "main")
    commit_all(root, "initial fleet")
    return root


def touched(root: Path, base: str) -> list[str]:
    return [t.deployment for t in touched_deployments(load_workspace(root), changed_files(root, base, "HEAD"))]


def edit(root: Path, file: str, old: str, new: str) -> None:
    path = root / file
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))


def test_a_recipe_change_in_one_manifest_touches_only_that_deployment(git_repo: Path) -> None:
    base = git(git_repo, "rev-parse", "HEAD")
    edit(git_repo, "manifests/camera.yaml", "- quantize: {mode: auto}", "- quantize: {mode: static}")
    commit_all(git_repo, "camera: static int8")
    assert touched(git_repo, base) == ["meter-digits"]
    result = CliRunner().invoke(main, ["diff", "--base", base, "--head", "HEAD", "--root", str(git_repo), "-o", "json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == [{"deployment": "meter-digits", "manifest": "manifests/camera.yaml",
                                          "reasons": ["manifest changed (manifests/camera.yaml)"]}]


def test_a_profile_change_touches_every_deployment_whose_fleets_use_it(git_repo: Path) -> None:
    base = git(git_repo, "rev-parse", "HEAD")
    edit(git_repo, "device_profiles/x86-gateway.yaml", "intra_op_num_threads: 2", "intra_op_num_threads: 1")
    commit_all(git_repo, "gateways: one thread")
    # meter-cameras has an x86 gateway (cam-depot-01), vehicles too (van-0042); the lab fleet does not
    assert touched(git_repo, base) == ["meter-digits", "mobile-vision", "vehicle-assistant"]


def test_a_model_change_is_followed_through_the_reference(git_repo: Path) -> None:
    base = git(git_repo, "rev-parse", "HEAD")
    model = git_repo / "examples/models/digits_cnn.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    commit_all(git_repo, "retrained digits")
    found = touched_deployments(load_workspace(git_repo), changed_files(git_repo, base, "HEAD"))
    assert [(t.deployment, t.reasons) for t in found] == [
        ("meter-digits", ("model file changed (examples/models/digits_cnn.onnx)",))]


def test_a_shared_template_touches_everything_and_uncommitted_work_counts(git_repo: Path) -> None:
    base = git(git_repo, "rev-parse", "HEAD")
    (git_repo / "templates/_common.j2").write_text((git_repo / "templates/_common.j2").read_text() + "\n")
    found = touched_deployments(load_workspace(git_repo), changed_files(git_repo, base))  # work tree vs base
    assert [t.deployment for t in found] == ["assistant-lm", "meter-digits", "mobile-vision", "vehicle-assistant",
                                            "wearable-activity"]


def test_shallow_checkout_needs_the_base_fetched(git_repo: Path, tmp_path: Path) -> None:
    base = git(git_repo, "rev-parse", "HEAD")
    edit(git_repo, "manifests/assistant.yaml", "max_drop: 0.05", "max_drop: 0.04")
    commit_all(git_repo, "assistant: tighter goal")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--depth=1", f"file://{git_repo}", str(clone)], check=True, env=ENV)
    result = CliRunner().invoke(main, ["diff", "--base", base, "--root", str(clone)])
    assert result.exit_code == 3 and "git fetch --depth=1 origin" in result.stderr
    git(clone, "fetch", "-q", "--depth=1", "origin", base)
    result = CliRunner().invoke(main, ["diff", "--base", base, "--root", str(clone)])
    assert result.exit_code == 0 and result.stdout.startswith("vehicle-assistant")


def test_workflow_file_passes_the_github_workflow_schema() -> None:
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           str(REPO / ".github/workflows/edgeops.yml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------ on the lab fleet


@pytest.fixture(scope="module")
def lab_git(tmp_path_factory: pytest.TempPathFactory, hostile_home: Path):
    from edgeops.lab import lab_down, lab_up

    base = tmp_path_factory.mktemp("gitops")
    root = copy_repo(base / "repo")
    write_lab_fleet(root, 3, base / "devices")
    (root / ".gitignore").write_text(".edgeops/\n")
    git(root, "init", "-q", "-b", "main")
    commit_all(root, "initial fleet")
    ws = load_workspace(root)
    lab_up(ws, ws.fleets["lab"], target_devices(ws, "wearable-activity"), login_home=hostile_home)
    yield root
    lab_down(ws, ws.fleets["lab"])


def normalized(markdown: str) -> str:
    """What must match the golden file across machines: numbers, digests and ids measured here vary."""
    text = re.sub(r"r-[0-9a-f]{16}", "r-<release>", markdown)
    text = re.sub(r"rel-[0-9a-f]{12}", "rel-<release>", text)
    text = re.sub(r"py [\w.]+ · ort [\w.]+ · \w+", "py <version> · ort <version> · <arch>", text)  # device facts
    text = re.sub(r"`[0-9a-f]{12}`", "`<digest>`", text)
    # the build's speed claim: a ratio from a quiet host, or why there is none (a busy one)
    text = re.sub(r"(host p50 [\d.]+ ms \(original [\d.]+ ms\): [\d.]+x \(interleaved A/B[^)]*\)|speed: not measurable "
                  r"on a busy host[^\n]*)", "<speed claim>", text)
    text = re.sub(r"^- :warning: [^\n]*: no speed claim: not measurable on a busy host[^\n]*\n", "", text,
                  flags=re.MULTILINE)  # and the warning that goes with none
    text = re.sub(r"\d+\.\d+", "<n>", text)
    return re.sub(r"\b\d{1,3}(,\d{3})+\b|\b\d{4,}\b", "<bytes>", text)


def test_pr_comment_is_stable_and_matches_the_golden_file(lab_git: Path) -> None:
    base = git(lab_git, "rev-parse", "HEAD")
    edit(lab_git, "manifests/wearable.yaml", "latency_p95_ms: 25", "latency_p95_ms: 20")
    commit_all(lab_git, "wearable: tighter latency SLO")
    args = ["plan", "--changed-since", base, "-o", "markdown", "--root", str(lab_git)]
    first, second = CliRunner().invoke(main, args), CliRunner().invoke(main, args)
    assert first.exit_code == 2, first.output  # changes pending
    assert first.stdout == second.stdout       # byte-identical on the same commit
    if os.environ.get("EDGEOPS_UPDATE_GOLDEN"):
        GOLDEN.write_text(normalized(first.stdout))
    assert normalized(first.stdout) == GOLDEN.read_text(), "if intended: EDGEOPS_UPDATE_GOLDEN=1 pytest tests/test_gitops.py"


def test_apply_changed_since_deploys_exactly_the_touched_deployment(lab_git: Path) -> None:
    base = git(lab_git, "rev-parse", "HEAD")
    edit(lab_git, "manifests/wearable.yaml", "max_failed_devices: 0", "max_failed_devices: 1")
    head = commit_all(lab_git, "wearable: allow one failed device")
    result = CliRunner().invoke(main, ["apply", "--changed-since", base, "-o", "json", "--root", str(lab_git)])
    assert result.exit_code == 0, result.output
    applied = json.loads(result.stdout)
    assert [r["deployment"] for r in applied] == ["wearable-activity"]
    rollout = repo_at(lab_git).ledger.history("wearable-activity", 1)[0]
    assert rollout["git_commit"] == head and rollout["git_author"] == "Ada Tester <ada@example.org>"


def test_a_second_concurrent_apply_is_refused_by_the_lock(lab_git: Path) -> None:
    ledger = repo_at(lab_git).ledger
    with ledger.lock(["lab"], holder="ci-job-41 applying wearable-activity"):
        result = CliRunner().invoke(main, ["apply", "manifests/wearable.yaml", "--root", str(lab_git)])
    assert result.exit_code == ExitCode.LOCKED
    assert "fleet 'lab' is locked by ci-job-41 applying wearable-activity" in result.stderr
    again = CliRunner().invoke(main, ["apply", "manifests/wearable.yaml", "--root", str(lab_git)])
    assert again.exit_code == 0, again.output  # released: the next apply goes through


def test_a_device_changed_by_hand_shows_out_of_sync_and_apply_restores_it(lab_git: Path) -> None:
    assert CliRunner().invoke(main, ["apply", "manifests/wearable.yaml", "--root", str(lab_git)]).exit_code == 0
    ws = load_workspace(lab_git)
    target = target_devices(ws, "wearable-activity")[2]
    with Connections() as connections:
        device_for(target, connections, "wearable-activity").uninstall(  # an operator holding the release key
            by="someone-by-hand", order=orders_for(target, None, "wearable-activity")("uninstall", None))
    drift = CliRunner().invoke(main, ["status", "manifests/wearable.yaml", "--drift-only", "-o", "json",
                                      "--root", str(lab_git)])
    assert drift.exit_code == 1
    rows = json.loads(drift.stdout)[0]["devices"]
    assert [(r["device"], r["sync"]) for r in rows] == [(target.name, "OutOfSync")]
    fixed = CliRunner().invoke(main, ["reconcile", "manifests/wearable.yaml", "--iterations", "1",
                                      "--root", str(lab_git)])
    assert fixed.exit_code == 0, fixed.output
    assert "drift on lab/" in fixed.stderr
    clean = CliRunner().invoke(main, ["status", "manifests/wearable.yaml", "--drift-only", "--root", str(lab_git)])
    assert clean.exit_code == 0
