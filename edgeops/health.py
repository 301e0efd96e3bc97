"""Health and sync of one device, judged from what it reports now and what git asks for now (pure)."""

from __future__ import annotations

from typing import Any

from edgeops.facts import Preflight
from edgeops.manifest.models import SLO
from edgeops.plan import ObservedDevice
from edgeops.types import DeviceStatus, Health, Sync


def sync_of(observed: ObservedDevice, wanted_release: str) -> Sync:
    if not observed.reachable:
        return Sync.UNKNOWN
    return Sync.SYNCED if observed.current == wanted_release else Sync.OUT_OF_SYNC


def over_slo(verification: dict[str, Any] | None, slo: SLO) -> str | None:
    """Why the numbers recorded for the running release miss the SLO that git asks for now."""
    latency = (verification or {}).get("latency") or {}
    if slo.latency_p95_ms is not None and latency.get("p95_ms") is not None and latency["p95_ms"] > slo.latency_p95_ms:
        return f"measured p95 {latency['p95_ms']:.3f} ms exceeds the SLO {slo.latency_p95_ms:g} ms in git"
    generation = (verification or {}).get("generation") or {}
    if slo.ttft_ms is not None and generation.get("ttft_ms") is not None and generation["ttft_ms"] > slo.ttft_ms:
        return f"measured time to first token {generation['ttft_ms']:.1f} ms exceeds the SLO {slo.ttft_ms:g} ms in git"
    speed = generation.get("tokens_per_s")
    if slo.tokens_per_s is not None and speed is not None and speed < slo.tokens_per_s:
        return f"measured {speed:.1f} tokens/s is below the SLO {slo.tokens_per_s:g} in git"
    energy = ((verification or {}).get("power") or {}).get("energy_per_inference_mj")
    if slo.energy_per_inference_mj is not None and energy is not None and energy > slo.energy_per_inference_mj:
        return f"measured {energy:.4g} mJ/inference exceeds the SLO {slo.energy_per_inference_mj:g} mJ in git"
    return None


def health_of(o: ObservedDevice, checked: Preflight | None, slo: SLO) -> tuple[Health, str]:
    """The device's health and why, worst first: unreachable, unable to run releases, missing, damaged,
    a step left half done, over the SLO in git now, then by the status of the release it runs."""
    if not o.reachable:
        return Health.UNREACHABLE, o.error
    if checked is not None and not checked.ok:
        return Health.DEGRADED, "the device cannot run releases now: " + "; ".join(checked.refusals)
    if o.state_error:
        return Health.DAMAGED, f"{o.state_error} (apply rebuilds it)"
    if o.current is None:
        return Health.MISSING, "no release of this deployment on the device"
    if o.damaged:
        return Health.DAMAGED, f"{o.current} is damaged: {'; '.join(o.damaged)} (apply repairs it)"
    if o.damaged_other:
        return Health.DAMAGED, f"the rollback target is damaged: {'; '.join(o.damaged_other)} (apply repairs it)"
    if o.half_done:
        return Health.INTERRUPTED, "half done: " + "; ".join(o.half_done)
    verdict = (o.verification or {}).get("reason", "")
    kept = (DeviceStatus.COMMITTED, DeviceStatus.INCONCLUSIVE, DeviceStatus.ROLLED_BACK)
    if o.status in kept and (missed := over_slo(o.verification, slo)):
        return Health.DEGRADED, missed
    if o.status == DeviceStatus.COMMITTED:
        return Health.HEALTHY, verdict
    if o.status == DeviceStatus.INCONCLUSIVE:
        return Health.HEALTHY, "kept after an inconclusive verification: " + verdict
    if o.status == DeviceStatus.ROLLED_BACK:
        return Health.ROLLED_BACK, verdict or "rolled back"
    if o.status == DeviceStatus.PAUSED:
        return Health.DEGRADED, f"paused on a verification that did not pass ({verdict}): edgeops resume, promote " \
                                "or abort"
    return Health.DEGRADED, f"release not verified (status {o.status})"
