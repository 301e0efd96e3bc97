"""A rollout as a self-contained HTML page: what each device measured, and why the gate decided what it did.

Per device: the latency distributions of the new and the previous release from the interleaved A/B
samples the agent took (empirical CDFs), the confidence intervals the gate used against their limits,
and energy where a sensor measured it; per artifact: the build stages' size, quality and host speed.
Plots are drawn by matplotlib (its object API: no global state) as inline SVG; the page loads nothing.
"""

from __future__ import annotations

import html
import io
import math
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

NEW, PREVIOUS, LIMIT = "#1f77b4", "#7f7f7f", "#d62728"
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; } h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .5em 0 1em; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.Passed { color: #1a7f37; } .Failed, .Unreachable, .Refused { color: #cf222e; } .Inconclusive, .Paused { color: #9a6700; }
figure.plot { margin: .5em 0; } figure.plot svg { max-width: 100%; height: auto; }
.muted { color: #666; }
"""
# Set on <body> once every figure has drawn a non-empty SVG, and the errors met: what a browser test reads.
CHECK = """
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message)));
window.addEventListener("load", () => {
  const figures = [...document.querySelectorAll("figure.plot")];
  const drawn = figures.filter(f => { const s = f.querySelector("svg"); if (!s) return false;
    const box = s.getBoundingClientRect(); return box.width > 50 && box.height > 50 && s.querySelector("path"); });
  document.body.dataset.plotsExpected = String(figures.length);
  document.body.dataset.plotsDrawn = String(drawn.length);
  document.body.dataset.errors = String(window.__errors.length);
});
"""


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # inline: without the XML prolog and doctype


def _cdf(axes: Any, samples: list[float], label: str, color: str) -> None:
    ordered = sorted(samples)
    n = len(ordered)
    axes.step(ordered, [(i + 1) / n for i in range(n)], where="post", color=color, label=f"{label} (n={n})")


def device_figure(measurements: dict[str, Any]) -> str | None:
    """CDFs of the new and previous release's latency, and the gate's intervals; None without samples."""
    samples = measurements.get("samples_ms") or {}
    intervals = [c for c in measurements.get("checks") or [] if "point" in c]
    if not samples.get("new"):
        return None
    figure = Figure(figsize=(10, 3.2))
    cdf, gate = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    _cdf(cdf, samples["new"], "new", NEW)
    if samples.get("previous"):
        _cdf(cdf, samples["previous"], "previous", PREVIOUS)
    generative = bool(measurements.get("generation"))
    cdf.set(xlabel="time per decoded token (ms, on the device)" if generative else
            "latency per inference (ms, on the device, log scale)", ylabel="fraction of tokens" if generative else
            "fraction of runs", ylim=(0, 1.02), title="decode time distribution, interleaved A/B" if generative
            else "latency distribution, interleaved A/B")
    cdf.set_xscale("log")  # a few slow outliers would stretch a linear axis and flatten every curve at 0
    cdf.xaxis.set_major_formatter(ScalarFormatter())
    cdf.axhline(0.95, color="#bbb", linewidth=0.8, linestyle=":")
    cdf.legend(loc="lower right", fontsize=8)
    if intervals:
        names = [c["name"].removesuffix("-regression") for c in intervals]
        for row, check in enumerate(intervals):
            color = {"Failed": LIMIT, "Inconclusive": "#d4a017"}.get(check["outcome"], "#1a7f37")
            gate.errorbar(check["point"], row, xerr=[[check["point"] - check["low"]], [check["high"] - check["point"]]],
                          fmt="o", color=color, capsize=4)
            gate.plot([check["limit"]] * 2, [row - 0.35, row + 0.35], color=LIMIT, linewidth=1.5)
        gate.axvline(1.0, color="#bbb", linewidth=0.8, linestyle=":")
        gate.set(yticks=range(len(names)), yticklabels=names, ylim=(-0.6, len(names) - 0.4),
                 xlabel="new / previous (red: the limit)", title="what the gate decided on")
    else:
        gate.set_axis_off()
        gate.text(0.5, 0.5, "no previous release measured:\nabsolute SLOs only", ha="center", va="center")
    return _svg(figure)


def build_figure(report: dict[str, Any]) -> str:
    """Size and host p50 per build stage."""
    stages = report["stages"]
    labels = [s["step"] for s in stages]
    figure = Figure(figsize=(10, 2.6))
    size, speed = figure.subplots(1, 2)
    size.bar(labels, [s["size_bytes"] / 1000 for s in stages], color=NEW)
    size.set(ylabel="kB", title="size per stage")
    p50 = [s["latency_ms"]["p50"] for s in stages]
    errors = [[max(0.0, v - (s["latency_ms"].get("p50_ci95") or [v, v])[0]) for v, s in zip(p50, stages)],
              [max(0.0, (s["latency_ms"].get("p50_ci95") or [v, v])[1] - v) for v, s in zip(p50, stages)]]
    speed.bar(labels, p50, yerr=errors, capsize=4, color=PREVIOUS)
    speed.set(ylabel="ms", title="host p50 per stage (95% interval), 1 thread")
    return _svg(figure)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f'<td class="num">{value:.4g}</td>'
        if isinstance(value, int):
            return f'<td class="num">{value:,}</td>'
        return f"<td>{html.escape(str(value))}</td>"

    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows) + "</table>")


def _energy(measurements: dict[str, Any]) -> str:
    power = measurements.get("power") or {}
    if power.get("energy_per_inference_mj") is None:
        return f"energy: not measured ({html.escape(str(power.get('error') or 'no power source'))})"
    return (f"energy: {power['energy_per_inference_mj']:.4g} mJ per inference, {power['average_power_mw']:.4g} mW "
            f"average [source {html.escape(str(power['source']))}, boundary {html.escape(str(power['boundary']))}; "
            "measured on the device during verification]")


def _generation(measurements: dict[str, Any]) -> str:
    new, old = measurements["generation"], measurements.get("previous_generation")
    golden = measurements.get("golden") or {}
    text = (f"decode {new['tokens_per_s']:.1f} tokens/s, time to first token {new['ttft_ms']:.2f} ms for a "
            f"{new['prompt_tokens']}-token prompt [{new['runtime']}, on the device]")
    if old:
        text += f"; previous release {old['tokens_per_s']:.1f} tokens/s, {old['ttft_ms']:.2f} ms"
    if golden.get("agreement") is not None:
        text += f"; golden agreement {golden['agreement']:.1f}%, perplexity {golden['perplexity']:.4g}"
    return html.escape(text)


def learning_figure(rounds: list[dict[str, Any]]) -> str:
    """Accuracy on the evaluation data per federated round: the controller's head and the released one."""
    trained = [r for r in rounds if r["summary"].get("accuracy_after") is not None]
    figure = Figure(figsize=(10, 2.8))
    axes = figure.subplots()
    numbers = [r["summary"]["round"] for r in trained]
    axes.plot(numbers, [r["summary"]["accuracy_after"] for r in trained], marker="o", color=NEW,
              label="head after the round")
    released, best = [], None
    for r in trained:
        best = r["summary"]["accuracy_after"] if r["outcome"] == "released" else \
            (best if best is not None else r["summary"]["accuracy_released"])
        released.append(best)
    axes.step(numbers, released, where="post", color=PREVIOUS, label="what the fleet runs")
    axes.set(xlabel="round", ylabel="accuracy %", title="federated rounds (repository's evaluation data, host)")
    axes.legend(loc="lower right")
    return _svg(figure)


def adaptation_section(rounds: list[dict[str, Any]]) -> list[str]:
    if not rounds:
        return []
    parts = ["<h2>Federated adaptation</h2>"]
    if any(r["summary"].get("accuracy_after") is not None for r in rounds):
        parts.append(f'<figure class="plot">{learning_figure(rounds)}</figure>')
    rows = []
    for r in rounds:
        s = r["summary"]
        rows.append([s.get("round", ""), r["outcome"], len(s.get("used") or []), len(s.get("asked") or []),
                     int(s.get("samples") or 0), s.get("accuracy_start", "—"), s.get("accuracy_after", "—"),
                     s.get("epsilon", "—"), "; ".join(f"{d}: {w}" for d, w in sorted(
                         {**(s.get("excluded") or {}), **(s.get("dropped") or {})}.items())) or "—"])
    parts.append(_table(["round", "outcome", "used", "asked", "samples", "accuracy before", "after", "ε",
                         "excluded or dropped"], rows))
    return parts


def render_html(deployment: str, rollout: dict[str, Any], reports: dict[str, dict[str, Any] | None],
                rounds: list[dict[str, Any]] | None = None, decided: dict[str, dict[str, Any]] | None = None) -> str:
    """The page for one rollout of ``deployment``; ``reports``: build report per accelerator (None: not cached);
    ``rounds``: the deployment's federated rounds (the learning curve); ``decided``: per hardware class, the
    finalist its device chose for the builds this rollout quoted (quantize.decide_on: device)."""
    e = html.escape
    title = f"{deployment}: rollout #{rollout.get('number', rollout['id'])} ({rollout['kind']})"
    parts = [f"<h1>edgeops report — {e(title)}</h1>",
             _table(["outcome", "release", "who", "started", "finished", "commit"],
                    [[rollout.get("outcome") or "unfinished", rollout.get("release") or "—", rollout.get("actor") or "",
                      rollout["started_at"], rollout.get("finished_at") or "—",
                      (rollout.get("git_commit") or "")[:12]]])]
    message = (rollout.get("summary") or {}).get("message")
    if message:
        parts.append(f"<p>{e(str(message))}</p>")
    parts.append("<h2>Build</h2>")
    for accelerator, report in sorted(reports.items()):
        sha = rollout["artifacts"][accelerator]
        parts.append(f"<h3>{e(accelerator)} artifact <code>{e(sha[:12])}</code></h3>")
        if report is None:
            parts.append('<p class="muted">not in this machine\'s build cache: no build stages to show</p>')
            continue
        if all(s.get("generation") for s in report["stages"]):
            rows = [[s["step"], s["size_bytes"], s["quality"]["metric"], float(s["quality"]["value"]),
                     float(s["quality"]["perplexity"]), float(s["generation"]["tokens_per_s"]),
                     float(s["generation"]["ttft_ms"])] for s in report["stages"]]
            parts.append(_table(["stage", "bytes", "metric", "value", "perplexity", "host tokens/s",
                                 "host TTFT ms"], rows))
        else:
            rows = [[s["step"], s["size_bytes"], s["quality"]["metric"], float(s["quality"]["value"]),
                     float(s["latency_ms"]["p50"]), float(s["latency_ms"]["p95"])] for s in report["stages"]]
            parts.append(_table(["stage", "bytes", "metric", "value", "host p50 ms", "host p95 ms"], rows))
        parts.append(f'<figure class="plot">{build_figure(report)}</figure>')
        speed = report.get("speed")
        if speed:
            parts.append(f"<p>speed: {speed['speedup']:.2f}x the original ({e(speed['method'])})</p>"
                         if speed["measurable"] else f"<p>speed: {e(speed['why'])}</p>")
    if decided:
        parts.append("<h3>Decided on the device</h3>")
        parts.append(_table(["hardware class", "measured on", "runs", "why", "finalists (device p50 ms)"],
                            [[c, d.get("device") or "—", d["label"], d.get("why") or "",
                              ", ".join(f"{r['label']} {float(r['p50_ms']):.4f}" for r in d.get("candidates") or [])]
                             for c, d in sorted(decided.items())]))
    parts += adaptation_section(rounds or [])
    parts.append("<h2>Devices</h2>")
    for event in rollout["devices"]:
        m = event.get("measurements") or {}
        decision = str(event["decision"])
        parts.append(f'<h3>{e(event["device"])} — <span class="{e(decision)}">{e(decision)}</span> '
                     f'<span class="muted">{e(event.get("release_id") or "")}</span></h3>')
        parts.append(f"<p>{e(event.get('reason') or '')}</p>")
        if m.get("candidates"):  # a decide record: the finalists as this device measured them side by side
            parts.append(_table(["finalist", "device p50 ms", "device p95 ms", "energy mJ", "host p50 ms", "bytes",
                                 "chosen"],
                                [[c["label"], float(c["p50_ms"]), float(c.get("p95_ms") or math.nan),
                                  float(c["energy_mj"]) if c.get("energy_mj") is not None else "—",
                                  float(c["host_p50_ms"]) if c.get("host_p50_ms") else "—", c["size_bytes"],
                                  "yes" if c["label"] == m.get("chosen") else ""] for c in m["candidates"]]))
        if not m.get("latency"):
            continue
        figure = device_figure(m)
        if figure:
            parts.append(f'<figure class="plot">{figure}</figure>')
        else:
            parts.append('<p class="muted">no A/B samples recorded for this decision</p>')
        checks = [[c["name"], c["outcome"], c["detail"]] for c in m.get("checks") or []]
        if checks:
            parts.append(_table(["check", "outcome", "detail"], checks))
        if m.get("generation"):
            parts.append(f"<p>{_generation(m)}</p>")
        parts.append(f"<p>{_energy(m)}</p>")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{STYLE}</style><script>{CHECK}</script></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
