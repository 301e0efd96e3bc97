"""The fleet page of `edgeops serve`: deployments, their fleets and devices, and each rollout's report.

Server-rendered HTML from one snapshot (what `status` read from the devices, and the ledger's rollouts):
the same numbers as `status` and `/metrics`, each said where it was measured. Every name, label and message
is escaped (they come from manifests and devices); nothing is loaded from elsewhere; the page refreshes
itself. Routing is a pure function of the path and the snapshot: the server only writes what it returns.
"""

from __future__ import annotations

import html
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from edgeops.exporter import StatusRow, unix_time
from edgeops.report import CHECK, STYLE

PAGE_STYLE = STYLE + """
body { max-width: 1500px; }
nav { margin-bottom: 1em; } nav a { margin-right: 1em; }
.Healthy, .Synced, .succeeded { color: #1a7f37; }
.Degraded, .OutOfSync, .paused, .RolledBack, .Interrupted { color: #9a6700; }
.Damaged, .Missing, .halted, .failed, .over { color: #cf222e; font-weight: 600; }
.summary td { min-width: 4em; }
"""


@dataclass(frozen=True)
class Snapshot:
    """One reading of the fleets: status rows and problems by deployment, the newest rollouts from the ledger."""

    taken_at: float
    rows: Mapping[str, Sequence[StatusRow]]
    broken: Mapping[str, Sequence[str]] = field(default_factory=dict)
    rollouts: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)  # newest first
    refresh_s: float = 60


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes


ReportPage = Callable[[str, int], str]   # (deployment, rollout number) -> the report's HTML; KeyError: none


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _link(*parts: str | int) -> str:
    return "/" + "/".join(urllib.parse.quote(str(p), safe="") for p in parts)


def _when(iso: str | None, now: float) -> str:
    if not iso:
        return "—"
    moment = unix_time(iso)
    if moment is None:
        return iso
    age = now - moment
    ago = f"{age / 86400:.1f} d" if age >= 86400 else f"{age / 3600:.1f} h" if age >= 3600 else \
        f"{max(age, 0) / 60:.0f} min"
    return f"{datetime.fromtimestamp(moment, timezone.utc).strftime('%Y-%m-%d %H:%M')} UTC ({ago} ago)"


def _page(title: str, body: list[str], snapshot: Snapshot) -> bytes:
    taken = datetime.fromtimestamp(snapshot.taken_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    refresh = max(30, int(snapshot.refresh_s))  # at most twice a minute: a wall screen, not a poll loop
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"refresh\" content=\"{refresh}\"><title>{_e(title)}</title>"
            f"<style>{PAGE_STYLE}</style><script>{CHECK}</script></head>\n<body>\n"
            f'<nav><a href="/">deployments</a><a href="/metrics">metrics</a></nav>\n'
            f"<h1>{_e(title)}</h1>\n<p class=\"muted\">read from the devices {_e(taken)}; this page reloads "
            f"every {refresh} s</p>\n" + "\n".join(body) + "\n</body></html>\n").encode()


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Cells are HTML already escaped by the caller."""
    return ("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</table>")


def _state(value: Any) -> str:
    return f'<span class="{_e(value)}">{_e(value)}</span>'


def _rollout_cell(deployment: str, rollout: Mapping[str, Any] | None) -> str:
    if not rollout:
        return "—"
    outcome = rollout.get("outcome") or "running"
    return (f'<a href="{_link("deployments", deployment, "rollouts", rollout["number"])}">#{_e(rollout["number"])}'
            f"</a> {_e(rollout.get('kind', ''))} {_state(outcome)}")


def _over(row: StatusRow) -> bool:
    return row.p95_ms is not None and row.slo_p95_ms is not None and row.p95_ms > row.slo_p95_ms


def index(snapshot: Snapshot) -> bytes:
    rows = []
    for name in sorted(snapshot.rows):
        devices = snapshot.rows[name]
        healthy = sum(1 for d in devices if str(d.health) == "Healthy")
        synced = sum(1 for d in devices if str(d.sync) == "Synced")
        over = sum(1 for d in devices if _over(d))
        found = snapshot.rollouts.get(name) or []
        newest = found[0] if found else None
        rows.append([f'<a href="{_link("deployments", name)}">{_e(name)}</a>', _e(len(devices)),
                     f'<span class="{"Healthy" if healthy == len(devices) else "Degraded"}">{healthy}</span>',
                     f'<span class="{"Synced" if synced == len(devices) else "OutOfSync"}">{synced}</span>',
                     f'<span class="{"over" if over else ""}">{over}</span>', _rollout_cell(name, newest)])
    body = [_table(["deployment", "devices", "healthy", "synced", "over p95 SLO", "last rollout"], rows)
            if rows else "<p>no deployment to show</p>"]
    if snapshot.broken:
        body.append("<h2>Not shown</h2>")
        body.append(_table(["file or deployment", "why"], [[_e(name), "<br>".join(_e(p) for p in problems)]
                                                             for name, problems in sorted(snapshot.broken.items())]))
    return _page("edgeops — fleets", body, snapshot)


def _number(value: float | None, unit: str, digits: str = ".3g") -> str:
    return "—" if value is None else f"{value:{digits}} {unit}"


def deployment_page(snapshot: Snapshot, name: str) -> bytes:
    devices = snapshot.rows[name]
    body: list[str] = []
    for fleet in sorted({d.fleet for d in devices}):
        body.append(f"<h2>fleet {_e(fleet)}</h2>")
        rows = []
        for d in (d for d in devices if d.fleet == fleet):
            energy = d.energy or {}
            p95 = _number(d.p95_ms, "ms")
            slo = f" / {_number(d.slo_p95_ms, 'ms')}" if d.slo_p95_ms is not None else ""
            rows.append([_e(d.device), _state(d.sync), _state(d.health),
                         _e(d.fleet_release or d.release or "—") + (
                             f'<br><span class="muted">{_e(d.release)}</span>' if d.fleet_release else ""),
                         f'<span class="{"over" if _over(d) else ""}">{_e(p95)}{_e(slo)}</span>',
                         _e(_number(energy.get("energy_per_inference_mj"), "mJ/inf")) + (
                             f'<br><span class="muted">{_e(energy.get("source"))}, {_e(energy.get("boundary"))}'
                             "</span>" if energy else ""),
                         _e(_number(d.peak_rss_mb, "MB", ".4g")), _e(_when(d.verified_at, snapshot.taken_at)),
                         _e(d.hardware_class), "<br>".join(f"{_e(k)}={_e(v)}" for k, v in d.labels),
                         _e(d.message or "")])
        body.append(_table(["device", "sync", "health", "release", "p95 / SLO (device)", "energy (device)",
                            "peak memory", "last verification", "hardware class", "labels", "message"], rows))
    rollouts = snapshot.rollouts.get(name) or []
    body.append("<h2>Rollouts</h2>")
    body.append(_table(["#", "kind", "outcome", "started", "finished", "who", "devices"], [
        [f'<a href="{_link("deployments", name, "rollouts", r["number"])}">#{_e(r["number"])}</a>', _e(r["kind"]),
         _state(r.get("outcome") or "running"), _e(r.get("started_at") or ""), _e(r.get("finished_at") or "—"),
         _e(r.get("actor") or ""), _e(len(r.get("devices") or []))] for r in rollouts])
        if rollouts else "<p>none yet</p>")
    return _page(f"edgeops — {name}", body, snapshot)


def respond(path: str, snapshot: Snapshot, metrics: Callable[[], bytes], report: ReportPage) -> Response:
    """The answer to GET ``path`` (read-only: nothing here changes a device or the ledger)."""
    parts = [urllib.parse.unquote(p) for p in urllib.parse.urlsplit(path).path.split("/") if p]
    html_type = "text/html; charset=utf-8"
    if not parts:
        return Response(200, html_type, index(snapshot))
    if parts == ["metrics"]:
        return Response(200, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics())
    if parts == ["healthz"]:
        age = time.time() - snapshot.taken_at
        return Response(200, "text/plain; charset=utf-8", f"ok, snapshot {age:.0f} s old\n".encode())
    if parts[0] == "deployments" and len(parts) >= 2 and parts[1] in snapshot.rows:
        if len(parts) == 2:
            return Response(200, html_type, deployment_page(snapshot, parts[1]))
        if len(parts) == 4 and parts[2] == "rollouts" and parts[3].isdigit():
            try:
                return Response(200, html_type, report(parts[1], int(parts[3])).encode())
            except KeyError:
                pass
    return Response(404, html_type, _page("not found", [f"<p>nothing at {_e(path)}; "
                                                        '<a href="/">the deployments</a></p>'], snapshot))
