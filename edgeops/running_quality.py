"""The quality of the release a fleet runs against the one git asks for: a release lower than what runs by
more than ``regression.quality_drop`` is refused at plan time (exit 4), whatever the build gate said.

The build gate compares a model with its own original; the device's golden check compares a release with
itself. Neither sees a model swapped for a worse one. This does: the new artifact's quality is measured on
the repository's evaluation data now; the running artifact's is measured on the same data when its model is
in this machine's build cache and the metric needs only labels (accuracy), else it is the value recorded
when it was built (in its build report, or in the ledger's summary of the rollout that shipped it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeops.compress.cache import Cache
from edgeops.desired import Desired
from edgeops.manifest.models import Deployment
from edgeops.manifest.workspace import Document
from edgeops.state import Ledger
from edgeops.verify import quality_drop


@dataclass(frozen=True)
class QualityDrop:
    accelerator: str
    metric: str
    running: float
    new: float
    drop: float
    allowed: float
    running_release: str
    measured: str          # how the running value was obtained

    def message(self) -> str:
        return (f"quality regression: {self.metric} {self.running:.4g} ({self.running_release}, {self.measured}) "
                f"→ {self.new:.4g} on the repository's evaluation data, {self.drop:.4g} lower than what runs "
                f"(regression.quality_drop allows {self.allowed:g}); --accept-quality-drop to go on")


def last_landing(ledger: Ledger, deployment: str) -> dict[str, Any] | None:
    """The newest rollout that left the fleet on a known release: a succeeded apply, or a rollback onto one."""
    return next((r for r in ledger.history(deployment, 50) if r["outcome"] == "succeeded" and
                 (r["kind"] in ("apply", "resume") or (r["kind"] == "rollback" and r.get("release")))), None)


def recorded_quality(report: dict[str, Any] | None) -> dict[str, Any] | None:
    stages = (report or {}).get("stages") or []
    return stages[-1].get("quality") if stages else None


def _measured_now(cache: Cache, doc: Document[Deployment], accelerator: str, sha256: str) -> float | None:
    """Accuracy of a cached artifact on the repository's evaluation data, or None when that is not possible."""
    if doc.obj.spec.quality.metric != "accuracy":
        return None
    from edgeops.compress.data import load_dataset
    from edgeops.compress.evaluate import run_all, session
    from edgeops.compress.request import BuildRequest
    from edgeops.metrics import metric_value

    path = cache.model_of(sha256)
    if path is None:
        return None
    data = load_dataset(BuildRequest.of(doc, accelerator), "evaluation")
    if data.labels is None:
        return None
    outputs = run_all(session(path), data)
    name = doc.obj.spec.quality.output
    names = [o.name for o in session(path).get_outputs()]
    index = names.index(name) if name in names else 0
    return float(metric_value("accuracy", outputs[index], outputs[index], data.labels))


def quality_drops(ledger: Ledger, cache: Cache, doc: Document[Deployment], desired: Desired) -> list[QualityDrop]:
    """Every artifact git asks for whose quality is lower than the running one's by more than allowed."""
    last = last_landing(ledger, doc.name)
    if last is None:
        return []
    spec = doc.obj.spec
    allowed = spec.rollout.regression.quality_drop
    allowed = spec.quality.max_drop if allowed is None else allowed
    recorded = (last.get("summary") or {}).get("quality") or {}
    found = []
    for accelerator, artifact in sorted(desired.artifacts.items()):
        running_sha = (last.get("artifacts") or {}).get(accelerator)
        new = recorded_quality(artifact.report)
        if not running_sha or running_sha == artifact.model_sha256 or new is None:
            continue
        now = _measured_now(cache, doc, accelerator, running_sha)
        old = recorded_quality(cache.report_of(running_sha)) or recorded.get(accelerator)
        if now is not None:
            running, how = now, "measured now"
        elif old is not None and old.get("metric") == new["metric"]:
            running, how = float(old["value"]), "as recorded at its build"
        else:
            continue
        drop = quality_drop(new["metric"], running, float(new["value"]), spec.quality.drop == "relative")
        if drop > allowed + 1e-9:
            found.append(QualityDrop(accelerator, new["metric"], running, float(new["value"]), drop, allowed,
                                     last.get("release") or f"rollout #{last['number']}", how))
    return found
