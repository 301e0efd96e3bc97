"""What a reviewer reads about a change before any device is touched: what the build already tells about
the targets, and each new artifact and runtime config against the release the fleet was last left on."""

from __future__ import annotations

import json
from typing import Any

from edgeops.desired import Desired
from edgeops.manifest.models import Deployment
from edgeops.manifest.workspace import Document
from edgeops.metrics import LOWER_IS_BETTER
from edgeops.operations import Repo
from edgeops.plan import field_changes
from edgeops.running_quality import last_landing


def plan_warnings(doc: Document[Deployment], desired: Desired) -> list[str]:
    """What the build already tells about the targets before any device is touched."""
    warnings = []
    slo = doc.obj.spec.slo.latency_p95_ms
    for accelerator, artifact in sorted(desired.artifacts.items()):
        report = artifact.report
        host_p95 = report["stages"][-1]["latency_ms"]["p95"]
        if slo is not None and accelerator == "cpu" and host_p95 > slo:
            warnings.append(f"{accelerator} artifact already misses the p95 SLO on the build host "
                            f"({host_p95:.3f} ms > {slo:g} ms)")
        warnings += [f"{accelerator} artifact: {w}" for w in report.get("warnings", [])]
        size = report["artifact"]["size_bytes"]
        for target in desired.targets:
            limit = target.profile.obj.spec.limits.max_model_bytes
            if target.accelerator == accelerator and limit is not None and size > limit:
                warnings.append(f"{target.key}: the {accelerator} artifact ({size:,} bytes) exceeds profile "
                                f"{target.profile.name}'s max_model_bytes ({limit:,})")
    return list(dict.fromkeys(warnings))


def against_what_runs(repo: Repo, doc: Document[Deployment], desired: Desired) -> tuple[list[str], list[str]]:
    """(comparison lines, warnings): each new artifact against the one the fleet was last left on (by an apply,
    or by a rollback to a known release).

    Host numbers from the two build reports (p50, 1 thread): a first look before the devices measure."""
    last = last_landing(repo.ledger, doc.name)
    lines: list[str] = []
    warnings: list[str] = []
    if last is None:
        return lines, warnings
    for accelerator, artifact in sorted(desired.artifacts.items()):
        running = last.get("artifacts", {}).get(accelerator)
        if not running or running == artifact.model_sha256:
            continue
        where = f"artifact `{running[:12]}`, rollout #{last['number']}"
        old = repo.cache.report_of(running)
        if old is None:
            lines.append(f"{accelerator}: what runs ({where}) is not in this machine's build cache: no comparison")
            continue
        line, worse = compare_reports(old, artifact.report)
        lines.append(f"{accelerator}: against what runs ({where}): {line}")
        warnings += [f"{accelerator} artifact is {w} than what the fleet runs" for w in worse]
    running_release = repo.ledger.release(doc.name, last["release"]) if last.get("release") else None
    if running_release is not None:
        lines += config_changes(running_release["configs"], desired.configs(), running_release["id"])
    return lines, warnings


def config_changes(old: dict[str, list[str]], new: dict[str, list[str]], running: str) -> list[str]:
    """Field by field, per hardware class, how the runtime config git asks for differs from the one that runs."""
    lines = []
    for cls, texts in sorted(new.items()):
        before = old.get(cls)
        if before is None:
            lines.append(f"runtime config ({cls}): a hardware class {running} does not have")
        elif before != texts:
            if len(before) == len(texts) == 1:
                old_config, new_config = json.loads(before[0]), json.loads(texts[0])
                for part in ("model", "golden"):  # their digests follow the artifact, compared above
                    old_config.get(part, {}).pop("sha256", None)
                    new_config.get(part, {}).pop("sha256", None)
                changes = field_changes(old_config, new_config)
            else:
                changes = [f"{len(before)} → {len(texts)} variant(s) by device labels"]
            lines += [f"runtime config ({cls}) against {running}: {change}" for change in changes]
    return lines


def compare_reports(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, list[str]]:
    """A one-line comparison of two build reports' results, and what got worse (slower, lower quality).

    Slower is claimed only past 10% and, where both reports carry the p50's interval, when the intervals
    do not overlap: one host measurement each, so noise must not read as a regression."""
    a, b = old["stages"][-1], new["stages"][-1]
    size = b["size_bytes"] / a["size_bytes"]
    p50_old, p50_new = a["latency_ms"]["p50"], b["latency_ms"]["p50"]
    ci_old, ci_new = a["latency_ms"].get("p50_ci95"), b["latency_ms"].get("p50_ci95")
    q_old, q_new = a["quality"], b["quality"]
    higher_is_better = q_new["metric"] not in LOWER_IS_BETTER
    delta = (q_new["value"] - q_old["value"]) if higher_is_better else (q_old["value"] - q_new["value"])
    worse = []
    apart = not (ci_old and ci_new) or ci_new[0] > ci_old[1]
    if p50_old and p50_new > p50_old * 1.10 and apart:
        worse.append(f"{p50_new / p50_old:.2f}x slower on the host (p50)")
    if q_new["metric"] == q_old["metric"] and delta < -1e-9:
        worse.append(f"lower in {q_new['metric']} ({q_old['value']:.4g} → {q_new['value']:.4g})")
    speed = f"{p50_old / p50_new:.2f}x the speed" if p50_new else "speed unknown"
    if p50_new and ci_old and ci_new and ci_new[0] > 0:
        speed += f", 95% CI {ci_old[0] / ci_new[1]:.2f}–{ci_old[1] / ci_new[0]:.2f}x"
    scale = f"{size:.2f}x larger" if size >= 1 else f"{1 / size:.2f}x smaller"
    if a.get("generation") and b.get("generation"):  # a decoder: its speed in tokens per second
        g_old, g_new = a["generation"], b["generation"]
        return (f"size {a['size_bytes'] / 1000:.1f} → {b['size_bytes'] / 1000:.1f} kB ({scale}); "
                f"{q_new['metric']} {q_old['value']:.4g} → {q_new['value']:.4g}; perplexity "
                f"{q_old.get('perplexity', float('nan')):.4g} → {q_new.get('perplexity', float('nan')):.4g}; host "
                f"{g_old['tokens_per_s']:.0f} → {g_new['tokens_per_s']:.0f} tokens/s, time to first token "
                f"{g_old['ttft_ms']:.2f} → {g_new['ttft_ms']:.2f} ms (one host measurement each, 1 thread)"), worse
    return (f"size {a['size_bytes'] / 1000:.1f} → {b['size_bytes'] / 1000:.1f} kB ({scale}); "
            f"{q_new['metric']} {q_old['value']:.4g} → {q_new['value']:.4g}; "
            f"host p50 {p50_old:.3f} → {p50_new:.3f} ms "
            f"({speed}; one host measurement each, 1 thread)"), worse
