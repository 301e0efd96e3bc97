"""Not collected by the suite: tests/e2e/test_interrupted_run.py runs this file in a pytest run of its own and
stops that run with SIGTERM while the first test holds a real sshd device."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from labkit.repo import running_lab


@pytest.fixture
def one_device_lab(tmp_path: Path, hostile_home: Path):  # type: ignore[no-untyped-def]
    with running_lab(tmp_path, 1, hostile_home) as root:
        try:
            yield root
        finally:  # as slow as a big lab's teardown, when the test asks
            time.sleep(float(os.environ.get("EDGEOPS_PROBE_TEARDOWN_S", "0")))


def test_holds_its_lab_until_the_run_is_stopped(one_device_lab: Path) -> None:
    pids = sorted(p.read_text().strip() for p in (one_device_lab / ".edgeops" / "lab").glob("*/*/sshd.pid"))
    report = Path(os.environ["EDGEOPS_PROBE_REPORT"])
    written = report.with_name(report.name + ".tmp")
    written.write_text(" ".join(pids))
    written.replace(report)  # whole or not at all: the test reads it while this one sleeps
    time.sleep(600)


def test_does_not_start_once_the_run_is_stopped() -> None:
    Path(os.environ["EDGEOPS_PROBE_REPORT"] + ".late").write_text("ran")
