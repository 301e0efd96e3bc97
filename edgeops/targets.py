"""Which devices a deployment targets, each with its resolved profile and on-device root."""

from __future__ import annotations

from dataclasses import dataclass

from edgeops.spec.models import DeviceEntry, DeviceProfile, Fleet
from edgeops.spec.workspace import Document, Workspace


@dataclass(frozen=True)
class TargetDevice:
    fleet: Document[Fleet]
    device: DeviceEntry
    profile: Document[DeviceProfile]

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


def substitute(text: str, device: str, root: str) -> str:
    """Fill ``{device}`` and ``{root}`` in profile strings (plain replace: other braces stay)."""
    return text.replace("{device}", device).replace("{root}", root)


def target_devices(ws: Workspace, deployment_name: str) -> list[TargetDevice]:
    """Every device the deployment's targets select, in fleet order, without duplicates."""
    doc = ws.deployments[deployment_name]
    found: dict[str, TargetDevice] = {}
    for target in doc.obj.spec.targets:
        fleet = ws.fleets[target.fleet]
        wanted = target.selector.match_labels
        for device in fleet.obj.spec.devices:
            if all(device.labels.get(k) == v for k, v in wanted.items()):
                profile = ws.profiles[device.profile or fleet.obj.spec.profile]
                item = TargetDevice(fleet, device, profile)
                found.setdefault(item.key, item)
    return list(found.values())
