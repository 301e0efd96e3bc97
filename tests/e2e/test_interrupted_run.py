"""A test run stopped by SIGTERM (a CI timeout, ``kill``) tears its fixtures down: the sshd devices a test
started are stopped, no further test starts, and the run ends interrupted, not passed; in one process and
across xdist workers (tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeops.lab import process_alive

pytestmark = pytest.mark.ssh
REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests" / "probes" / "held_lab.py"


@pytest.mark.parametrize("workers", ["0", "2"], ids=["one-process", "two-workers"])
def test_a_run_stopped_by_sigterm_stops_the_lab_it_started_and_ends_interrupted(tmp_path: Path, workers: str) -> None:
    report = tmp_path / "pids"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not this run's worker
    env["EDGEOPS_PROBE_REPORT"] = str(report)
    # across workers, a teardown longer than xdist gives its workers once told to exit (10 s; then they are killed)
    env["EDGEOPS_PROBE_TEARDOWN_S"] = "0" if workers == "0" else "12"
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", workers,
                            "--dist", "loadfile", "--basetemp", str(tmp_path / "base"), str(PROBE)],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while not report.exists():
            if run.poll() is not None:
                pytest.fail(f"the probe run ended before its lab was up:\n{run.communicate()[0]}")
            assert time.monotonic() < deadline, "the probe's lab was not up within 300 s"
            time.sleep(0.2)
        pids = [int(p) for p in report.read_text().split()]
        assert pids and all(process_alive(p) for p in pids), pids
        run.send_signal(signal.SIGTERM)
        output = run.communicate(timeout=180)[0]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        for pid in pids:  # only if the run failed to: this test must not leave them running either
            if process_alive(pid):
                os.kill(pid, signal.SIGTERM)
    assert run.returncode == pytest.ExitCode.INTERRUPTED, output
    assert not [p for p in pids if process_alive(p)], (pids, output)
    assert not Path(f"{report}.late").exists(), output
