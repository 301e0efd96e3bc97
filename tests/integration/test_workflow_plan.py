"""The workflow's plan job runs the base revision's edgeops on the pull request's files, never the PR's code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from labkit.repo import REPO, copy_repo, lab_credentials

SCRIPT = REPO / "scripts" / "plan-pull-request.sh"
PAYLOAD = "import os, pathlib; pathlib.Path(os.environ['EDGEOPS_TEST_MARKER']).write_text('pr code ran')\n"


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), "-c", "user.email=t@example.org", "-c", "user.name=t", *args],
                   check=True, capture_output=True)


def test_the_plan_job_runs_the_base_revisions_code_not_the_pull_requests(tmp_path: Path) -> None:
    root = copy_repo(tmp_path / "repo")
    shutil.copytree(REPO / "edgeops", root / "edgeops", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, root / name)
    (root / ".gitignore").write_text(".edgeops/\n")
    lab_credentials(root, tmp_path / "secrets")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "base")
    init = root / "edgeops" / "__init__.py"
    init.write_text(PAYLOAD + init.read_text())  # the pull request edits edgeops/ ...
    wearable = root / "manifests" / "wearable.yaml"
    wearable.write_text(wearable.read_text().replace("latency_p95_ms: 25", "latency_p95_ms: 20"))  # ... and a manifest
    git(root, "commit", "-qam", "pr")
    marker = tmp_path / "marker"
    env = {**os.environ, "EDGEOPS_TEST_MARKER": str(marker), "EDGEOPS_PLAN_PYTHON": sys.executable,
           "EDGEOPS_CACHE_DIR": str(tmp_path / "cache"), "EDGEOPS_SECRETS_DIR": str(tmp_path / "secrets")}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", str(SCRIPT), "HEAD~1", str(root)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 1 and "the plan checked nothing" in done.stderr, done.stderr  # no lab runs here
    plan = (tmp_path / "plan.md").read_text()
    assert plan.startswith("<!-- edgeops-plan -->") and "wearable-activity" in plan, plan
    assert not marker.exists(), "the pull request's edgeops/ ran"
    # the control: the PR checkout's own package, run the way a naive job would, does run its code
    naive = subprocess.run([sys.executable, "-m", "edgeops", "--version"], cwd=root, env=env, capture_output=True,
                           text=True, timeout=120)
    assert naive.returncode == 0, naive.stderr
    assert marker.read_text() == "pr code ran"


def test_the_plan_job_takes_its_code_from_the_base_and_holds_no_release_key() -> None:
    import yaml

    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "edgeops.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert "pull_request" not in triggers and "pull_request_target" in triggers  # the workflow file is the base's
    steps = workflow["jobs"]["plan"]["steps"]
    checkouts = [s.get("with", {}) for s in steps if str(s.get("uses", "")).startswith("actions/checkout")]
    assert checkouts[0]["ref"] == "${{ github.event.pull_request.base.sha }}"
    assert [c.get("path") for c in checkouts] == [None, "pr"]
    assert all(c.get("persist-credentials") is False for c in checkouts)
    runs = "\n".join(str(s.get("run", "")) for s in steps)
    assert "pip install" not in runs and "bash scripts/plan-pull-request.sh" in runs
    assert "RELEASE_KEY" not in str(steps) and "EDGEOPS_ALLOW_CODE" not in str(steps)
