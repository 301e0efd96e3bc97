"""Fleet health as Prometheus metrics (OpenMetrics text), from what `status` read on the devices just now.

Every series is labelled with deployment, fleet and device. States are state sets (one series per
value, 1 for the current one), as kube-state-metrics does, so alerts can say `health="Damaged"`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.openmetrics.exposition import generate_latest

from edgeops.types import Decision, Health, Sync


class StatusRow(Protocol):
    """What the exporter reads of a status row (edgeops.operations.StatusRow is one)."""

    @property
    def fleet(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def health(self) -> Health: ...
    @property
    def sync(self) -> Sync: ...
    @property
    def p50_ms(self) -> float | None: ...
    @property
    def p95_ms(self) -> float | None: ...
    @property
    def slo_p95_ms(self) -> float | None: ...
    @property
    def energy(self) -> dict[str, Any] | None: ...
    @property
    def release(self) -> str | None: ...
    @property
    def fleet_release(self) -> str | None: ...
    @property
    def tokens_per_s(self) -> float | None: ...
    @property
    def ttft_ms(self) -> float | None: ...

DEVICE = ("deployment", "fleet", "device")


def registry_of(rows: Mapping[str, Iterable[StatusRow]], last_decisions: Mapping[str, Mapping[str, str]],
                broken: Iterable[str] = ()) -> CollectorRegistry:
    """A registry holding one snapshot: ``rows`` by deployment, the last rollout decision per device key."""
    registry = CollectorRegistry()
    health = Gauge("edgeops_device_health", "1 for the health the device is in", [*DEVICE, "health"],
                   registry=registry)
    sync = Gauge("edgeops_device_sync", "1 for whether the device runs the release git asks for", [*DEVICE, "sync"],
                 registry=registry)
    p50 = Gauge("edgeops_device_latency_p50_milliseconds", "median latency at the last verification, on the device",
                DEVICE, registry=registry)
    p95 = Gauge("edgeops_device_latency_p95_milliseconds", "p95 latency at the last verification, on the device",
                DEVICE, registry=registry)
    slo = Gauge("edgeops_device_latency_p95_slo_milliseconds", "the p95 SLO git asks for", DEVICE,
                registry=registry)
    energy = Gauge("edgeops_device_energy_per_inference_millijoules",
                   "energy per inference at the last verification, with the reading's source and boundary",
                   [*DEVICE, "source", "boundary"], registry=registry)
    tokens = Gauge("edgeops_device_decode_tokens_per_second", "text generation: median decode speed at the last "
                   "verification, on the device", DEVICE, registry=registry)
    ttft = Gauge("edgeops_device_time_to_first_token_milliseconds", "text generation: median time to first token "
                 "at the last verification, on the device", DEVICE, registry=registry)
    decision = Gauge("edgeops_device_last_rollout_decision", "1 for the decision of the last rollout on the device",
                     [*DEVICE, "decision"], registry=registry)
    running = Gauge("edgeops_device_release_info", "1, labelled with the release the device runs: fleet-wide "
                    "(rel-..., empty when the ledger does not know it) and the device's own copy (r-...)",
                    [*DEVICE, "release", "materialisation"], registry=registry)
    unreadable = Gauge("edgeops_deployment_unreadable", "1 when status could not show a deployment (or file)",
                       ["deployment"], registry=registry)
    for deployment, group in rows.items():
        for row in group:
            labels = (deployment, row.fleet, row.device)
            for state in Health:
                health.labels(*labels, state).set(1 if row.health == state else 0)
            for in_sync in Sync:
                sync.labels(*labels, in_sync).set(1 if row.sync == in_sync else 0)
            for gauge, number in ((p50, row.p50_ms), (p95, row.p95_ms), (slo, row.slo_p95_ms),
                                  (tokens, row.tokens_per_s), (ttft, row.ttft_ms)):
                if number is not None:
                    gauge.labels(*labels).set(number)
            reading: dict[str, Any] = row.energy or {}
            if reading.get("energy_per_inference_mj") is not None:
                energy.labels(*labels, reading.get("source") or "", reading.get("boundary") or "").set(
                    reading["energy_per_inference_mj"])
            if row.release:
                running.labels(*labels, row.fleet_release or "", row.release).set(1)
            last = last_decisions.get(deployment, {}).get(f"{row.fleet}/{row.device}")
            if last is not None:
                for outcome in Decision:
                    decision.labels(*labels, outcome).set(1 if last == outcome else 0)
    for name in broken:
        unreadable.labels(name).set(1)
    return registry


def openmetrics(registry: CollectorRegistry) -> bytes:
    text: bytes = generate_latest(registry)  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    return text
