"""The README's first quick-start command, as written, from a clean clone, with hostile device logins.

It installs its own .venv in the clone, provisions the lab device runtime, starts the lab fleet of
manifests/fleets/lab.yaml (ports 22201-22204, or free ones when those are taken), applies manifests/wearable.yaml and shows status.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from labkit.repo import REPO

pytestmark = [pytest.mark.ssh, pytest.mark.slow]


@pytest.mark.timeout(1200)
def test_demo_from_a_clean_clone_rolls_out_and_reports_healthy(tmp_path: Path, hostile_home: Path) -> None:
    # ports in use (a lab of this checkout is up): the demo's lab moves to free ones by itself (test_two_clones)
    for index in range(1, 5):  # the demo's devices start empty, as on a fresh machine
        shutil.rmtree(f"/var/tmp/edgeops-lab/lab-{index:02d}", ignore_errors=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env["EDGEOPS_LAB_LOGIN_HOME"] = str(hostile_home)
    edgeops = clone / ".venv" / "bin" / "edgeops"
    after: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        done = subprocess.run(["bash", "scripts/demo.sh"], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=1100, check=False)
        if done.returncode == 0:  # then the README's "after the demo, try" commands, as written
            for name, args in (("apply", ["apply", "manifests/wearable.yaml"]),
                               ("plan", ["plan", "manifests/wearable.yaml", "-o", "markdown"]),
                               ("history", ["history", "wearable-activity"]),
                               ("rollback", ["rollback", "wearable-activity"])):
                after[name] = subprocess.run([str(edgeops), *args], cwd=clone, env=env, capture_output=True,
                                             text=True, timeout=300, check=False)
    finally:
        if edgeops.exists():
            subprocess.run([str(edgeops), "lab", "down"], cwd=clone, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert after["apply"].returncode == 0 and "no changes" in after["apply"].stdout, after["apply"].stdout
    assert after["plan"].returncode == 0, after["plan"].stdout
    assert after["history"].returncode == 0 and "succeeded" in after["history"].stdout
    # a first install has nothing earlier to go back to: rollback says so and changes nothing
    assert after["rollback"].returncode == 0, after["rollback"].stdout + after["rollback"].stderr
    assert "no-op" in after["rollback"].stdout and "no earlier committed release" in after["rollback"].stdout
    assert "succeeded: " in output, output[-4000:]
    assert "4 device(s): 4 Synced, 0 OutOfSync, 0 Unknown; 4 Healthy" in output, output[-4000:]
    assert "Traceback" not in output
    assert "is ignored: it is neither a file nor a directory" not in output  # pip's noise goes to the log
    assert (clone / ".edgeops" / "install.log").stat().st_size > 0
