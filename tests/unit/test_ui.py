"""What people read while a rollout runs: every progress line says when, and how long since the start."""

from __future__ import annotations

import re

import pytest

from edgeops.ui import LiveReporter


def test_progress_lines_off_a_terminal_carry_the_time_and_the_elapsed_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    with LiveReporter() as reporter:
        reporter.message("wave 1/2: lab/lab-01")
        reporter.stage("lab/lab-01", "push", "1,024 bytes to move")
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d \+\d+\.\ds wave 1/2: lab/lab-01", lines[0]), lines
    assert re.fullmatch(r"\d\d:\d\d:\d\d \+\d+\.\ds lab/lab-01: push 1,024 bytes to move", lines[1]), lines
