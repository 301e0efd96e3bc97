"""Fleet health as Prometheus metrics (OpenMetrics text), from what `status` read on the devices just now.

Every series is labelled with deployment, fleet and device. States are state sets (one series per
value, 1 for the current one), as kube-state-metrics does, so alerts can say `health="Damaged"`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.openmetrics.exposition import generate_latest

from edgeops.types import Decision, Health, Outcome, Sync


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
    @property
    def peak_rss_mb(self) -> float | None: ...
    @property
    def verified_at(self) -> str | None: ...
    @property
    def transport(self) -> str: ...
    @property
    def hardware_class(self) -> str: ...
    @property
    def profile(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def labels(self) -> tuple[tuple[str, str], ...]: ...

DEVICE = ("deployment", "fleet", "device")


ROLLOUT_OUTCOMES = (*Outcome, "failed", "running")  # and a failed federated round; an unfinished rollout


def unix_time(iso: str | None) -> float | None:
    """Seconds since the epoch of an ISO 8601 time as the ledger and devices write it (UTC when unzoned)."""
    if not iso:
        return None
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def registry_of(rows: Mapping[str, Iterable[StatusRow]], last_decisions: Mapping[str, Mapping[str, str]],
                broken: Iterable[str] = (), last_rollouts: Mapping[str, Mapping[str, Any]] | None = None,
                taken_at: float | None = None) -> CollectorRegistry:
    """A registry holding one snapshot: ``rows`` by deployment, the last rollout decision per device key, the
    newest rollout per deployment (from the ledger), and when the devices were read (``taken_at``)."""
    registry = CollectorRegistry()
    info = Gauge("edgeops_device_info", "1, labelled with how the device is reached (ssh or pull), its hardware "
                 "class and profile", [*DEVICE, "transport", "hardware_class", "profile"], registry=registry)
    memory = Gauge("edgeops_device_peak_memory_megabytes", "peak memory of the measuring process at the last "
                   "verification, on the device", DEVICE, registry=registry)
    power = Gauge("edgeops_device_average_power_milliwatts", "average power while inferring at the last "
                  "verification, with the reading's source and boundary", [*DEVICE, "source", "boundary"],
                  registry=registry)
    verified = Gauge("edgeops_device_last_verification_timestamp_seconds", "when the release the device runs was "
                     "last verified on it (Unix time)", DEVICE, registry=registry)
    scraped = Gauge("edgeops_snapshot_timestamp_seconds", "when edgeops last read the devices (Unix time)",
                    registry=registry)
    rollout_info = Gauge("edgeops_rollout_last_info", "1, labelled with the newest rollout of the deployment: its "
                         "number (as `edgeops history` shows it), kind and outcome", ["deployment", "number", "kind",
                                                                                      "outcome"], registry=registry)
    rollout_outcome = Gauge("edgeops_rollout_last_outcome", "1 for the outcome of the newest rollout",
                            ["deployment", "outcome"], registry=registry)
    rollout_started = Gauge("edgeops_rollout_last_started_timestamp_seconds", "when the newest rollout started",
                            ["deployment"], registry=registry)
    rollout_duration = Gauge("edgeops_rollout_last_duration_seconds", "how long the newest finished rollout took",
                             ["deployment"], registry=registry)
    rollout_devices = Gauge("edgeops_rollout_last_devices", "devices of the newest rollout, by decision",
                            ["deployment", "decision"], registry=registry)
    if taken_at is not None:
        scraped.set(taken_at)
    for deployment, rollout in (last_rollouts or {}).items():
        outcome = rollout.get("outcome") or "running"
        rollout_info.labels(deployment, str(rollout.get("number", "")), rollout.get("kind", ""), outcome).set(1)
        for state in ROLLOUT_OUTCOMES:
            rollout_outcome.labels(deployment, state).set(1 if outcome == state else 0)
        started, finished = unix_time(rollout.get("started_at")), unix_time(rollout.get("finished_at"))
        if started is not None:
            rollout_started.labels(deployment).set(started)
            if finished is not None:
                rollout_duration.labels(deployment).set(max(0.0, finished - started))
        counts = {d: 0 for d in Decision}
        for event in rollout.get("devices", []):
            if event.get("decision") in counts:
                counts[event["decision"]] += 1
        for decision_name, count in counts.items():
            rollout_devices.labels(deployment, decision_name).set(count)
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
            info.labels(*labels, row.transport, row.hardware_class, row.profile).set(1)
            for gauge, number in ((memory, row.peak_rss_mb), (verified, unix_time(row.verified_at))):
                if number is not None:
                    gauge.labels(*labels).set(number)
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
            if reading.get("average_power_mw") is not None:
                power.labels(*labels, reading.get("source") or "", reading.get("boundary") or "").set(
                    reading["average_power_mw"])
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
