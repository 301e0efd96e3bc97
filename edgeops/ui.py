"""Human-readable rendering (rich) of reports that the library returns as data."""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeops.facts import runtime_of
from edgeops.types import Action, Decision, Health, Sync

if TYPE_CHECKING:
    from edgeops.plan import Plan
    from edgeops.rollout import RolloutResult
    from edgeops.service import PlanEntry

# off a terminal (CI logs, pipes) rich would wrap at 80 columns: give tables room instead
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)


def _kb(n: int) -> str:
    return f"{n / 1000:.1f} kB"


def _ms(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.3f}"


def build_table(report: dict[str, Any]) -> Table:
    """One row per stage: size, ratios, quality, host latency, what changed."""
    table = Table(title=f"{report['deployment']} for {report['accelerator']} — artifact {report['artifact']['sha256'][:12]}",
                  title_justify="left")
    generative = all(stage.get("generation") for stage in report["stages"])
    speed = ("perplexity", "tok/s", "TTFT ms") if generative else ("p50 ms", "p95 ms")
    for column in ("stage", "size", "zstd", "size ×", "params", "quality", "drop", *speed, "speed ×"):
        table.add_column(column, justify="right" if column != "stage" else "left", no_wrap=column == "stage")
    for stage in report["stages"]:
        q = stage["quality"]
        name = stage["step"] + (f" {stage['options'].get('mode') or stage['options'].get('method') or ''}"
                                if stage["options"] else "")
        if generative:  # a decoder: host decode speed and time to first token, 1 thread
            numbers = [f"{q['perplexity']:.4g}", f"{stage['generation']['tokens_per_s']:.0f}",
                       f"{stage['generation']['ttft_ms']:.2f}"]
        else:
            numbers = [_ms(stage["latency_ms"]["p50"]), _ms(stage["latency_ms"]["p95"])]
        table.add_row(
            f"{stage['index']} {name.strip()}", _kb(stage["size_bytes"]), _kb(stage["zstd_bytes"]),
            f"{stage['size_ratio'] or 1:.2f}", str(stage["parameters"]),
            f"{q['metric']} {q['value']:.4g}" + ("" if q["passed"] else " FAIL"),
            f"{q['drop']:.3g}", *numbers, "—" if stage["speedup"] is None else f"{stage['speedup']:.2f}",
        )
    return table


def build_notes(report: dict[str, Any]) -> list[str]:
    """What each stage did, one line per note (latency is host CPU, 1 thread, batch 1)."""
    notes = [f"  {stage['index']}: {note}" for stage in report["stages"] for note in stage["notes"]]
    speed = report.get("speed")
    if speed and speed["measurable"]:
        notes.append(f"  speed: {speed['speedup']:.2f}x the original ({speed['method']}; "
                     f"{_foreign(speed)}; the table's last speed × is this A/B)")
    return notes + [f"[yellow]warning:[/] {escape(w)}" for w in report.get("warnings", [])]


def _foreign(speed: dict[str, Any]) -> str:
    cores = speed.get("foreign_cores")
    return "foreign load unknown" if cores is None else f"other processes kept {cores:.2f} cores busy"


# ------------------------------------------------------------------ plan, apply, status, history

def transfer_line(done: int, total: int, elapsed_s: float, sent_s: int) -> str:
    """``45% of 20,000,000 bytes, 2.1 MB/s, 5 s left``: the rate from what this upload sent (``sent_s`` bytes in
    ``elapsed_s``), shown once there is a second of it to go by."""
    line = f"{min(done, total) * 100 // total}% of {total:,} bytes"
    if elapsed_s < 1 or sent_s <= 0:
        return line
    rate = sent_s / elapsed_s
    return f"{line}, {rate / 1e6:.2f} MB/s, {max(0, total - done) / rate:.0f} s left"


ACTION_STYLE = {Action.INSTALL: "green", Action.UPDATE: "yellow", Action.REPAIR: "magenta", Action.REVERIFY: "cyan",
                Action.NO_CHANGE: "dim", Action.UNREACHABLE: "red", Action.REFUSED: "red"}
DECISION_STYLE = {Decision.PASSED: "green", Decision.INCONCLUSIVE: "yellow", Decision.FAILED: "red",
                  Decision.ROLLED_BACK: "magenta", Decision.UNREACHABLE: "red", Decision.REFUSED: "red",
                  Decision.PAUSED: "yellow", Decision.SKIPPED: "dim", Decision.UNCHANGED: "dim"}


def plan_table(plan: Plan) -> Table:
    kind = "" if plan.kind == "apply" else f"{plan.kind} "
    table = Table(title=f"{kind}plan for {plan.deployment}", title_justify="left")
    for column in ("wave", "device", "profile", "runtime", "action", "current", "release", "bytes", "reason"):
        table.add_column(column, justify="right" if column in ("wave", "bytes") else "left")
    for d in sorted(plan.devices, key=lambda d: (d.wave or 999, d.key)):
        style = ACTION_STYLE.get(d.action, "")
        table.add_row(str(d.wave or "—"), d.key, d.profile, escape(runtime_of(d.facts)), f"[{style}]{d.action}[/]",
                      d.current or "—", d.release_id, f"{d.bytes_to_move:,}", escape(d.reason))
    return table


def plan_summary(plan: Plan) -> list[str]:
    counts: dict[str, int] = {}
    for d in plan.devices:
        counts[d.action] = counts.get(d.action, 0) + 1
    lines = [(", ".join(f"{n} {a}" for a, n in sorted(counts.items())) or "no device selected") +
             f"; {plan.waves} wave(s); {sum(d.bytes_to_move for d in plan.devices):,} bytes to move"]
    lines += [f"release: {plan.release} (fleet-wide; the release column is each device's materialisation)"] \
        if plan.release else []
    lines += [f"artifact ({acc}): {sha[:16]}" for acc, sha in plan.artifacts.items()]
    lines += [f"recipe: {line}" for line in plan.recipe_diff]
    lines += [f"note: {n}" for n in plan.notes]
    lines += [f"refused: {d.reason}" for d in plan.refused]
    lines += [f"warning: {w}" for d in plan.devices for w in d.warnings]
    return lines


def _fidelity(quality: dict[str, Any]) -> str:
    """For embeddings, what the mean cosine hides: the worst sample, and whether neighbours stay neighbours."""
    parts = [f"min {quality['cosine_min']:.4g}"] if "cosine_min" in quality else []
    if "neighbour_agreement" in quality:
        parts.append(f"{quality['neighbour_agreement']:.1f}% same nearest neighbour")
    return f" ({', '.join(parts)})" if parts else ""


def plan_comment_artifact_line(accelerator: str, report: dict[str, Any]) -> str:
    """The plan comment's line for one artifact: size, quality, and the build's speed claim (or why none)."""
    first, last = report["stages"][0], report["stages"][-1]
    q = last["quality"]
    speed = report.get("speed")
    if speed and speed["measurable"]:
        timing = (f"host p50 {speed['artifact_p50_ms']:.3f} ms (original {speed['original_p50_ms']:.3f} ms): "
                  f"{speed['speedup']:.2f}x ({speed['method']}; {_foreign(speed)})")
    elif speed:
        timing = f"speed: {speed['why']}"
    else:
        timing = f"host p50 {_p50(last['latency_ms'])} (original {_p50(first['latency_ms'])}, host CPU, 1 thread)"
    return (f"artifact `{report['artifact']['sha256'][:12]}` ({accelerator}): {first['size_bytes'] / 1000:.1f} kB → "
            f"{last['size_bytes'] / 1000:.1f} kB ({_smaller(last['size_ratio'], len(report['stages']))}); {q['metric']} "
            f"{q['value']:.4g} (original {q['baseline']:.4g}){_fidelity(q)}; {timing}")


def _smaller(ratio: float | None, stages: int) -> str:
    return "no compression step" if stages == 1 else f"{ratio or 1:.2f}x smaller"


def _p50(latency: dict[str, Any]) -> str:
    interval = latency.get("p50_ci95")
    return f"{latency['p50']:.3f} ms" + (f" [95% CI {interval[0]:.3f}–{interval[1]:.3f}]" if interval else "")


def plan_comment(entries: list[PlanEntry]) -> str:
    """One pull-request comment for several deployments: stable order, no timestamps."""
    out = ["<!-- edgeops-plan -->", "## edgeops plan", ""]
    if not entries:
        out.append("No deployment is touched by this change.")
    for entry in sorted(entries, key=lambda e: e.plan.deployment):
        plan, reports, warnings, compared = entry.plan, entry.reports, entry.warnings, entry.compared
        changes = plan.changes
        out += [f"### `{plan.deployment}`: {len(changes)} device(s) to change, {plan.waves} wave(s)", ""]
        out += [f"- release `{plan.release}` (fleet-wide; the table lists each device's materialisation)"] \
            if plan.release else []
        out += [f"- {plan_comment_artifact_line(acc, reports[acc])}" for acc in sorted(reports)]
        out += [f"- {line}" for line in compared]
        out += [f"- changed: {line}" for line in entry.changes]
        out += [f"- recipe: {line}" for line in plan.recipe_diff] or ["- recipe: unchanged since the last rollout"]
        out += [f"- :warning: {w}" for w in warnings + [w for d in plan.devices for w in d.warnings]]
        out += [f"- note: {n}" for n in plan.notes]
        out += [f"- :no_entry: refused: {d.reason}" for d in plan.refused]
        fleets: dict[str, list[Any]] = {}
        for d in plan.devices:
            fleets.setdefault(d.fleet, []).append(d)
        for fleet in sorted(fleets):
            devices = fleets[fleet]
            moving = [d for d in devices if d.action != Action.NO_CHANGE]
            out += ["", f"**fleet `{fleet}`**: {len(moving)} of {len(devices)} device(s) change, "
                        f"{sum(d.bytes_to_move for d in devices):,} bytes to move", "",
                    "| wave | device | profile | runtime | action | current | release | bytes to move |",
                    "|---|---|---|---|---|---|---|---|"]
            for d in sorted(devices, key=lambda d: (d.wave or 999, d.key)):
                out.append(f"| {d.wave or '—'} | `{d.device}` | {d.profile} | {runtime_of(d.facts)} | **{d.action}** | "
                           f"{d.current or '—'} | {d.release_id} | {d.bytes_to_move:,} |")
            unreachable = [d for d in sorted(devices, key=lambda d: d.key) if d.action == Action.UNREACHABLE]
            out += [""] * bool(unreachable) + [f"- `{d.key}` not read: {d.reason}" for d in unreachable]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def result_table(result: RolloutResult) -> Table:
    table = Table(title=f"{result.deployment}: {result.outcome} — {result.message}", title_justify="left")
    for column in ("wave", "device", "decision", "release", "bytes moved", "p95 ms | tok/s", "reason"):
        table.add_column(column, justify="right" if column in ("wave", "bytes moved", "p95 ms | tok/s") else "left")
    for d in result.devices:
        latency = (d.measurements or {}).get("latency") or {}
        generation = (d.measurements or {}).get("generation") or {}
        style = DECISION_STYLE.get(d.decision, "")
        speed = f"{latency['p95_ms']:.3f}" if latency.get("p95_ms") else "—"
        if generation.get("tokens_per_s"):
            speed = f"{generation['tokens_per_s']:.0f} tok/s, TTFT {generation['ttft_ms']:.1f} ms"
        table.add_row(str(d.wave or "—"), d.key, f"[{style}]{d.decision}[/]", d.release_id or "—",
                      f"{d.bytes_moved:,}", speed, escape(d.reason))
    return table


STATUS_COLORS = {Sync.SYNCED: "green", Sync.OUT_OF_SYNC: "yellow", Sync.UNKNOWN: "red", Health.HEALTHY: "green",
                 Health.DEGRADED: "yellow", Health.DAMAGED: "red", Health.ROLLED_BACK: "magenta",
                 Health.UNREACHABLE: "red", Health.MISSING: "yellow", Health.INTERRUPTED: "yellow"}


def status_table(deployment: str, rows: list[Any], wide: bool = False) -> Table:
    """One row per device; compact by default (fits a terminal), every column with ``wide``."""
    table = Table(title=f"status of {deployment}", title_justify="left")
    speed = "TOK/S, TTFT" if rows and all(getattr(r, "tokens_per_s", None) for r in rows) else None
    columns = ("FLEET", "DEVICE", "PROFILE", "RUNTIME", "RELEASE", "SYNC", "HEALTH", speed or "P50 / P95 ms (SLO)",
               "POWER", "LAST DEPLOY", "MESSAGE") if wide else \
        ("DEVICE", "RELEASE", "SYNC", "HEALTH", speed or "P95 (SLO)", "MESSAGE")
    for column in columns:
        if wide:
            table.add_column(column, overflow="fold")
        else:  # every column but the message keeps its width; the message gets what is left, cut short
            table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=36 if column == "MESSAGE" else None,
                             min_width=None if column == "MESSAGE" else len(column))
    for r in rows:
        p95 = "—" if r.p95_ms is None else f"{r.p95_ms:.3f}"
        slo = "" if r.slo_p95_ms is None else f" ({r.slo_p95_ms:g})"
        if getattr(r, "tokens_per_s", None):  # a decoder: its speed in its own units
            p95, slo = f"{r.tokens_per_s:.0f} tok/s", f", TTFT {r.ttft_ms:.1f} ms"
        sync, health = f"[{STATUS_COLORS[r.sync]}]{r.sync}[/]", f"[{STATUS_COLORS[r.health]}]{r.health}[/]"
        if wide:
            p50 = "—" if r.p50_ms is None else f"{r.p50_ms:.3f}"
            release = f"{r.fleet_release} ({r.release})" if r.fleet_release else r.release or "—"
            table.add_row(r.fleet, r.device, r.profile, escape(r.runtime or "—"), release, sync, health,
                          p95 + slo if getattr(r, "tokens_per_s", None) else f"{p50} / {p95}{slo}", escape(r.power),
                          r.last_deploy or "—", escape(r.message))
        else:
            message = r.message if len(r.message) <= 36 else r.message[:35] + "…"
            table.add_row(f"{r.fleet}/{r.device}", r.fleet_release or r.release or "—", sync, health, p95 + slo,
                          escape(message))
    return table


def broken_lines(name: str, lines: list[str]) -> str:
    """A deployment (or file) status cannot show, and why."""
    return "\n".join([f"[red]{escape(name)}: cannot show its devices[/]",
                      *(f"  error: {escape(line)}" for line in lines)])


def status_summary(rows: list[Any]) -> str:
    def count(attr: str, value: str) -> int:
        return sum(1 for r in rows if getattr(r, attr) == value)

    return (f"{len(rows)} device(s): {count('sync', 'Synced')} Synced, {count('sync', 'OutOfSync')} OutOfSync, "
            f"{count('sync', 'Unknown')} Unknown; {count('health', 'Healthy')} Healthy, "
            f"{count('health', 'Degraded')} Degraded, {count('health', 'Damaged')} Damaged, "
            f"{count('health', 'RolledBack')} RolledBack, "
            f"{count('health', 'Unreachable')} Unreachable, {count('health', 'Missing')} Missing")


def _commit(rollout: dict[str, Any]) -> str:
    sha, author = (rollout.get("git_commit") or "")[:10], rollout.get("git_author")
    return f"{sha} by {author}" if sha and author else sha


def adapt_line(summary: dict[str, Any]) -> str:
    """One federated round in a line: who trained on how much, the accuracy it reached, what was left out."""
    parts = []
    if summary.get("used") is not None:
        parts.append(f"{len(summary['used'])}/{len(summary.get('asked') or [])} device(s), "
                     f"{summary.get('samples', 0)} samples")
    if summary.get("accuracy_after") is not None:
        parts.append(f"accuracy {summary['accuracy_start']:.2f} -> {summary['accuracy_after']:.2f} "
                     f"(released {summary['accuracy_released']:.2f})")
    if summary.get("epsilon") is not None:
        parts.append(f"ε={summary['epsilon']:.3g} at δ={summary['delta']:g}")
    parts += [f"{device} excluded: {why}" for device, why in sorted((summary.get("excluded") or {}).items())]
    parts += [f"{device} dropped: {why}" for device, why in sorted((summary.get("dropped") or {}).items())]
    if summary.get("reason"):
        parts.append(str(summary["reason"]))
    return "; ".join(parts)


def adapt_table(results: list[Any]) -> Table:
    table = Table(title="federated rounds", title_justify="left")
    for column in ("round", "outcome", "devices", "samples", "accuracy", "released", "ε", "notes"):
        table.add_column(column)
    for r in results:
        s = r.summary
        after = f"{s['accuracy_start']:.2f} -> {s['accuracy_after']:.2f}" if s.get("accuracy_after") is not None else ""
        notes = [f"{d} excluded: {w}" for d, w in sorted((s.get("excluded") or {}).items())]
        notes += [f"{d} dropped: {w}" for d, w in sorted((s.get("dropped") or {}).items())]
        table.add_row(str(r.number), r.outcome, f"{len(s.get('used') or [])}/{len(s.get('asked') or [])}",
                      str(s.get("samples", "")), after, s.get("release") or "",
                      f"{s['epsilon']:.3g}" if s.get("epsilon") is not None else "—",
                      escape("; ".join(notes + ([s["reason"]] if s.get("reason") else []))))
    return table


def history_table(deployment: str, rollouts: list[dict[str, Any]]) -> Table:
    table = Table(title=f"history of {deployment}", title_justify="left")
    for column in ("#", "when", "kind", "outcome", "who", "commit", "release / artifact", "device", "decision",
                   "device release", "p95 ms", "reason"):
        table.add_column(column)
    for r in rollouts:
        artifacts = "\n".join([*([r["release"]] if r.get("release") else []),
                               *(f"{a}:{s[:10]}" for a, s in r["artifacts"].items())])
        who = r.get("actor") or ""  # who ran the command (CI's actor, else the user), not the commit's author
        first = True
        for e in r["devices"] or [{}]:
            latency = (e.get("measurements") or {}).get("latency") or {}
            table.add_row(str(r.get("number", r["id"])) if first else "", r["started_at"] if first else "",
                          r["kind"] if first else "",
                          (r["outcome"] or "unfinished: the controller stopped") if first else "", who if first else "",
                          _commit(r) if first else "", artifacts if first else "",
                          e.get("device", ""), e.get("decision", ""), e.get("release_id") or "",
                          f"{latency['p95_ms']:.3f}" if latency.get("p95_ms") else "",
                          escape(e.get("reason") or (adapt_line(r.get("summary") or {}) if r["kind"] == "adapt" else "")))
            first = False
    return table


class LiveReporter:
    """Per-device stages as they happen: a live table on a terminal, one line per event otherwise."""

    def __init__(self) -> None:
        from rich.live import Live

        self.rows: dict[str, list[str]] = {}
        self.since: dict[str, float] = {}   # when each device entered its current stage
        self.transfers: dict[tuple[str, int], tuple[float, int]] = {}  # (device, size) -> (start, bytes then)
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.live = Live(self._table(), console=err_console, refresh_per_second=8, transient=False) \
            if err_console.is_terminal else None

    def _table(self) -> Table:
        table = Table(show_header=True)
        for column in ("device", "stage", "for", "detail"):
            table.add_column(column)
        now = time.monotonic()
        for key, (stage, detail) in self.rows.items():
            table.add_row(key, stage, f"{now - self.since.get(key, now):.0f}s", detail)
        return table

    def _stamp(self) -> str:
        return f"{time.strftime('%H:%M:%S')} +{time.monotonic() - self.started:.1f}s"

    def __enter__(self) -> "LiveReporter":
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.live.__exit__(None, None, None)

    def stage(self, key: str, stage: str, detail: str = "") -> None:
        with self.lock:
            if (self.rows.get(key) or [""])[0] != stage:
                self.since[key] = time.monotonic()
            self.rows[key] = [stage, escape(detail)]
            if self.live:
                self.live.update(self._table())
            else:
                err_console.print(escape(f"{self._stamp()} {key}: {stage} {detail}".rstrip()), soft_wrap=True)

    def transfer(self, key: str, done: int, total: int) -> None:
        if not self.live or not total:
            return
        with self.lock:
            first = self.transfers.setdefault((key, total), (time.monotonic(), done))  # a resumed upload starts late
            self.rows[key] = ["push", transfer_line(done, total, time.monotonic() - first[0], done - first[1])]
            self.live.update(self._table())

    def message(self, text: str) -> None:
        err_console.print(escape(f"{self._stamp()} {text}"), soft_wrap=True)


def decide_table(decided: dict[str, Any]) -> Table:
    """Per hardware class: where the finalists were measured, their figures there and on the host, the pick."""
    table = Table(title="decided on the device", show_lines=False)
    for column in ("class", "device", "finalist", "device p50 ms", "host p50 ms", "size", "chosen"):
        table.add_column(column)
    for hardware_class, d in sorted(decided.items()):
        rows = d.get("candidates") or []
        if not rows:
            table.add_row(escape(hardware_class), "—", "—", "", "", "", escape(d.get("why") or ""))
            continue
        for row in rows:
            mine = row["label"] == d["label"]
            table.add_row(escape(hardware_class), escape(d.get("device") or ""), escape(row["label"]),
                          f"{row['p50_ms']:.3f}", f"{row['host_p50_ms']:.3f}" if row.get("host_p50_ms") else "—",
                          f"{row['size_bytes'] / 1e6:.2f} MB", escape(d["why"]) if mine else "")
    return table


def finalist_lines(found: dict[str, Any] | None) -> list[str]:
    """`edgeops build` for quantize.decide_on: device: the finalists and what each hardware class decided."""
    if not found:
        return []
    from edgeops.decide import figures

    lines = ["decide_on: device: finalists " + ", ".join(
        f"{f['label']} ({f['size_bytes'] / 1e6:.2f} MB, host p50 "
        + (f"{f['host_p50_ms']:.3f} ms)" if f.get("host_p50_ms") else "—)") for f in found["finalists"])]
    lines += [f"  left out: {escape(why)}" for why in found["left_out"]]
    for hardware_class, d in sorted(found["decisions"].items()):
        lines.append(f"  {escape(hardware_class)}: {escape(d['label'])}, decided on {escape(d['device'])}: "
                     f"{escape(d['why'])} [{figures(d)}]")
    if not found["decisions"]:
        lines.append("  no decision on a device yet: apply measures the finalists on one device of each hardware "
                     "class first (or run edgeops decide)")
    return lines
