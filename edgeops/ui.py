"""Human-readable rendering (rich) of reports that the library returns as data."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def _kb(n: int) -> str:
    return f"{n / 1000:.1f} kB"


def _ms(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.3f}"


def build_table(report: dict[str, Any]) -> Table:
    """One row per stage: size, ratios, quality, host latency, what changed."""
    table = Table(title=f"{report['deployment']} for {report['accelerator']} — artifact {report['artifact']['sha256'][:12]}",
                  title_justify="left")
    for column in ("stage", "size", "zstd", "size ×", "params", "quality", "drop", "p50 ms", "p95 ms", "speed ×"):
        table.add_column(column, justify="right" if column != "stage" else "left", no_wrap=column == "stage")
    for stage in report["stages"]:
        q = stage["quality"]
        name = stage["step"] + (f" {stage['options'].get('mode') or stage['options'].get('method') or ''}"
                                if stage["options"] else "")
        table.add_row(
            f"{stage['index']} {name.strip()}", _kb(stage["size_bytes"]), _kb(stage["zstd_bytes"]),
            f"{stage['size_ratio'] or 1:.2f}", str(stage["parameters"]),
            f"{q['metric']} {q['value']:.4g}" + ("" if q["passed"] else " FAIL"),
            f"{q['drop']:.3g}", _ms(stage["latency_ms"]["p50"]), _ms(stage["latency_ms"]["p95"]),
            "—" if stage["speedup"] is None else f"{stage['speedup']:.2f}",
        )
    return table


def build_notes(report: dict[str, Any]) -> list[str]:
    """What each stage did, one line per note (latency is host CPU, 1 thread, batch 1)."""
    return [f"  {stage['index']}: {note}" for stage in report["stages"] for note in stage["notes"]]
