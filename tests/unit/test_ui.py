"""What people read while a rollout runs: every progress line says when, and how long since the start."""

from __future__ import annotations

import re

import pytest

from edgeops.ui import LiveReporter


def test_progress_lines_off_a_terminal_carry_the_time_and_the_elapsed_seconds(
        capsys: pytest.CaptureFixture[str]) -> None:
    with LiveReporter() as reporter:
        reporter.message("wave 1/2: lab/lab-01")
        reporter.stage("lab/lab-01", "push", "1,024 bytes to move")
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d \+\d+\.\ds wave 1/2: lab/lab-01", lines[0]), lines
    assert re.fullmatch(r"\d\d:\d\d:\d\d \+\d+\.\ds lab/lab-01: push 1,024 bytes to move", lines[1]), lines


def test_status_is_compact_by_default_and_wide_on_request() -> None:
    from rich.console import Console

    from edgeops.operations import StatusRow
    from edgeops.types import Health, Sync
    from edgeops.ui import status_table

    row = StatusRow("lab", "lab-01", "lab-cpu", "r-0123456789abcdef", Sync.SYNCED, Health.HEALTHY, 0.412, 25.0,
                    "1.2 mJ/inf, 1500 mW [hwmon, board]", "2026-11-25T18:00:00Z", "all 4 checks passed " * 8,
                    "py 3.11.2 · ort 1.20 · x86_64", None, 0.398, None)

    def text(wide: bool) -> str:
        console = Console(width=120, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
        console.print(status_table("wearable-activity", [row], wide=wide))
        return console.export_text()

    compact, wide = text(False), text(True)
    assert "lab/lab-01" in compact and "r-0123456789abcdef" in compact and "0.412 (25)" in compact
    assert "POWER" not in compact and len(compact.splitlines()) == 6  # title, 3 header lines, one row, bottom
    assert max(len(line.rstrip()) for line in compact.splitlines()) <= 120
    assert "POWER" in wide and "0.398" in wide and "lab-cpu" in wide


def test_a_long_upload_shows_its_rate_and_what_is_left() -> None:
    from edgeops.ui import transfer_line

    assert transfer_line(0, 20_000_000, 0.2, 0) == "0% of 20,000,000 bytes"  # too early for a rate
    line = transfer_line(12_000_000, 20_000_000, 2.0, 2_000_000)  # resumed at 10 MB, 2 MB sent in 2 s
    assert line == "60% of 20,000,000 bytes, 1.00 MB/s, 8 s left"


def test_a_decoder_is_shown_in_tokens_per_second_and_time_to_first_token() -> None:
    from rich.console import Console

    from edgeops.exporter import openmetrics, registry_of
    from edgeops.operations import StatusRow
    from edgeops.report import _generation
    from edgeops.types import Health, Sync
    from edgeops.ui import status_table

    row = StatusRow("lab", "lab-01", "lab-cpu", "r-0123456789abcdef", Sync.SYNCED, Health.HEALTHY, 0.41, None,
                    "—", None, "", tokens_per_s=2431.6, ttft_ms=3.25)
    console = Console(width=160, record=True)
    console.print(status_table("assistant-lm", [row]))
    assert "2432 tok/s, TTFT 3.2 ms" in console.export_text()
    text = openmetrics(registry_of({"assistant-lm": [row]}, {})).decode()
    assert 'edgeops_device_decode_tokens_per_second{deployment="assistant-lm",device="lab-01",fleet="lab"} 2431.6' \
        in text
    assert "edgeops_device_time_to_first_token_milliseconds" in text
    line = _generation({"generation": {"tokens_per_s": 2431.6, "ttft_ms": 3.25, "prompt_tokens": 64,
                                       "runtime": "onnxruntime-genai 0.18.0"},
                        "previous_generation": {"tokens_per_s": 2500.0, "ttft_ms": 3.1},
                        "golden": {"agreement": 98.6, "perplexity": 1.431}})
    assert "decode 2431.6 tokens/s, time to first token 3.25 ms for a 64-token prompt" in line
    assert "previous release 2500.0 tokens/s" in line and "golden agreement 98.6%" in line
