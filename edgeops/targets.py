"""Which devices a deployment targets, each with its resolved profile and on-device root."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeops.errors import Problem
from edgeops.facts import DeviceNeeds
from edgeops.manifest.models import SLO, Deployment, DeviceEntry, DeviceProfile, Fleet, Target, WaveSelector
from edgeops.manifest.secrets import default_secrets_dir, secret_path
from edgeops.manifest.workspace import Document, Workspace
from edgeops.plan import waves_of


@dataclass(frozen=True)
class TargetDevice:
    fleet: Document[Fleet]
    device: DeviceEntry
    profile: Document[DeviceProfile]
    secrets_dir: Path = field(default_factory=lambda: default_secrets_dir(Path.home()), compare=False)

    @property
    def name(self) -> str:
        return self.device.name

    @property
    def key(self) -> str:
        """Unique across fleets: ``fleet/device``."""
        return f"{self.fleet.name}/{self.device.name}"

    @property
    def accelerator(self) -> str:
        return self.profile.obj.spec.accelerator

    @property
    def hardware_class(self) -> str:
        return self.profile.obj.spec.hardware_class

    @property
    def root(self) -> str:
        """The directory edgeops owns on the device, with ``{device}`` filled in."""
        return substitute(self.device.root or self.profile.obj.spec.device.root, self.name, "")

    @property
    def python(self) -> str:
        """The interpreter that runs the agent on the device (``{device}``/``{root}`` filled in)."""
        return substitute(self.profile.obj.spec.device.python, self.name, self.root)

    @property
    def power_sensor(self) -> dict[str, Any]:
        """The profile's power sensor as the agent reads it (paths filled in)."""
        power = self.profile.obj.spec.power
        sensor: dict[str, Any] = deep_substitute({**power.sensor.model_dump(mode="json"),
                                                  "interval_ms": power.interval_ms}, self.name, self.root)
        return sensor

    def needs(self, slo: SLO, generation: dict[str, Any] | None = None, model_bytes: int = 0,
              genai_version: str | None = None) -> DeviceNeeds:
        """What this device must have to run a release whose SLOs are ``slo``; a decoder's release also says its
        rendered ``generation`` section, its model's size and the onnxruntime-genai the controller has."""
        profile = self.profile
        runtime = profile.obj.spec.generation
        genai = (runtime.version or genai_version or "unknown") if generation and \
            runtime.runtime == "onnxruntime-genai" else None
        index = next(i for i, d in enumerate(self.fleet.obj.spec.devices) if d is self.device)  # not ==: O(n)
        root_at = self.fleet.where(("spec", "devices", index, "root")) if self.device.root \
            else profile.where(("spec", "device", "root"))
        return DeviceNeeds(
            python=self.python, python_at=profile.where(("spec", "device", "python")),
            providers=tuple(p.name for p in profile.obj.spec.execution_providers),
            providers_at=profile.where(("spec", "execution_providers")),
            power_needed=slo.energy_per_inference_mj is not None or slo.average_power_mw is not None,
            power_at=profile.where(("spec", "power", "sensor")),
            root=self.root, root_at=root_at,
            disk_budget_bytes=int(budget * 1e6) if (budget := profile.obj.spec.device.disk_budget_mb) else None,
            disk_budget_at=profile.where(("spec", "device", "disk_budget_mb")),
            signers_sha256=self.signers_sha256, signers_at=self.fleet.where(("spec", "trust", "allowed_signers")),
            enroll_command=f"edgeops enroll {self.fleet.name}",
            genai_version=genai, genai_at=profile.where(("spec", "generation")),
            memory_bytes=model_bytes + int(generation["kv_cache_bytes"]) if generation else 0,
            memory_limit_mb=profile.obj.spec.limits.max_memory_mb,
            memory_at=profile.where(("spec", "limits", "max_memory_mb")))

    @property
    def allowed_signers(self) -> Path | None:
        """The fleet's trust root on this machine, when its releases are signed."""
        trust = self.fleet.obj.spec.trust
        return self.fleet.resolve(trust.allowed_signers) if trust else None

    @property
    def signers_sha256(self) -> str | None:
        path = self.allowed_signers
        return hashlib.sha256(path.read_bytes()).hexdigest() if path and path.is_file() else None

    @property
    def signing_key(self) -> Path | None:
        trust = self.fleet.obj.spec.trust
        return self.secret(trust.signing_key) if trust and trust.signing_key else None

    def secret(self, name: str) -> Path:
        """A credential file the fleet names, in the controller's secrets directory (checked when loaded)."""
        return secret_path(self.secrets_dir, name)


def substitute(text: str, device: str, root: str) -> str:
    """Fill ``{device}`` and ``{root}`` in profile strings (plain replace: other braces stay)."""
    return text.replace("{device}", device).replace("{root}", root)


def deep_substitute(value: Any, device: str, root: str) -> Any:
    """``substitute`` through nested lists and mappings."""
    if isinstance(value, str):
        return substitute(value, device, root)
    if isinstance(value, list):
        return [deep_substitute(v, device, root) for v in value]
    if isinstance(value, dict):
        return {k: deep_substitute(v, device, root) for k, v in value.items()}
    return value


def fleet_targets(ws: Workspace, fleet: Document[Fleet]) -> list[TargetDevice]:
    """Every device of a fleet with its resolved profile."""
    return [TargetDevice(fleet, d, ws.profiles[d.profile or fleet.obj.spec.profile], ws.secrets_dir)
            for d in fleet.obj.spec.devices]


def target_devices(ws: Workspace, deployment_name: str) -> list[TargetDevice]:
    """Every device the deployment's targets select, in fleet order, without duplicates."""
    doc = ws.deployments[deployment_name]
    found: dict[str, TargetDevice] = {}
    for target in doc.obj.spec.targets:
        fleet = ws.fleets[target.fleet]
        for device in selected(fleet.obj, target):
            profile = ws.profiles[device.profile or fleet.obj.spec.profile]
            item = TargetDevice(fleet, device, profile, ws.secrets_dir)
            found.setdefault(item.key, item)
    return list(found.values())


def selected(fleet: Fleet, target: Target) -> list[DeviceEntry]:
    """The fleet's devices a deployment target's selector matches, in fleet order."""
    wanted = target.selector.match_labels
    return [d for d in fleet.spec.devices if all(d.labels.get(k) == v for k, v in wanted.items())]


@dataclass(frozen=True)
class _Member:
    key: str
    hardware_class: str
    labels: tuple[tuple[str, str], ...]


def label_summary(devices: Sequence[DeviceEntry]) -> str:
    """``ring=canary|main, site=lab``: the labels a set of devices has, for a selector that matched none."""
    values: dict[str, set[str]] = {}
    for device in devices:
        for key, value in device.labels.items():
            values.setdefault(key, set()).add(value)
    return ", ".join(f"{k}={'|'.join(sorted(v))}" for k, v in sorted(values.items())) or "none"


def selection_problems(ws: Workspace, docs: Sequence[Document[Any]]) -> list[Problem]:
    """Target selectors and selector waves that take no device of the fleets the deployment targets: a typo or a
    stale label, whatever the fleet's size."""
    return [p for error, p in _selection(ws, docs) if error]


def wave_warnings(ws: Workspace, docs: Sequence[Document[Any]]) -> list[Problem]:
    """Count and percentage waves that add no device to the fleets as they are now (too small for the policy,
    which may be meant for a larger fleet)."""
    return [p for error, p in _selection(ws, docs) if not error]


def _selection(ws: Workspace, docs: Sequence[Document[Any]]) -> list[tuple[bool, Problem]]:
    problems: list[tuple[bool, Problem]] = []
    for dep in docs:
        if not isinstance(dep.obj, Deployment):
            continue
        members: dict[str, _Member] = {}
        complete = True
        for index, target in enumerate(dep.obj.spec.targets):
            fleet = ws.fleets.get(target.fleet)
            if fleet is None:
                complete = False
                continue
            matched = selected(fleet.obj, target)
            if target.selector.match_labels and not matched:
                problems.append((True, dep.problem(("spec", "targets", index, "selector", "match_labels"),
                                                   f"matches no device of fleet {fleet.name} (its labels: "
                                                   f"{label_summary(fleet.obj.spec.devices)})")))
            for device in matched:
                profile = ws.profiles.get(device.profile or fleet.obj.spec.profile)
                if profile is None:
                    complete = False
                    continue
                key = f"{fleet.name}/{device.name}"
                members.setdefault(key, _Member(key, profile.obj.spec.hardware_class,
                                                tuple(sorted(device.labels.items()))))
        if not complete or not members:
            continue
        policy = dep.obj.spec.rollout
        _, empty = waves_of(list(members.values()), policy)
        for index in empty:
            wave = policy.waves[index]
            if isinstance(wave, WaveSelector):
                targeted = [d for t in dep.obj.spec.targets if t.fleet in ws.fleets
                            for d in ws.fleets[t.fleet].obj.spec.devices]
                why = f"selects no device{' an earlier wave did not take' if index else ''} ({wave.selector!r}; " \
                      f"labels here: {label_summary(targeted)})"
                problems.append((True, dep.problem(("spec", "rollout", "waves", index), f"wave {index + 1} {why}; "
                                                   "remove it (or pass --allow-empty where an empty wave is meant)")))
            else:
                problems.append((False, dep.problem(("spec", "rollout", "waves", index), f"wave {index + 1} adds no "
                                                    f"device: the waves before it already take all {len(members)} "
                                                    "targeted device(s) (fine if the fleet will grow)")))
    return problems
