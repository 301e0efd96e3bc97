"""Where this clone's lab put a fleet's devices when not where the fleet file says.

Two clones (or two people) on one host cannot both listen on the fleet file's ports or share its device roots,
so ``edgeops lab up`` may move a lab fleet: other ports on 127.0.0.1 (``--port-base``, or free ones when the
file's are taken), roots of this lab's own, or an address inside a network namespace the lab created (a shaped
link). It records where in ``.edgeops/lab/<fleet>/placement.json`` (never committed), and loading the workspace
puts each device there, so plan, apply, status and known_hosts use what the lab really listens on.

Only devices the fleet file puts on this machine's loopback are ever moved: a stale or foreign placement file
can never point a real fleet somewhere else.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeops.manifest.models import Fleet
    from edgeops.manifest.workspace import Document

FILE = "placement.json"


@dataclass(frozen=True)
class Place:
    host: str
    port: int
    root: str


def placement_file(root: Path, fleet: str) -> Path:
    return root / ".edgeops" / "lab" / fleet / FILE


def on_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_placement(root: Path, fleet: str) -> dict[str, Place]:
    """The recorded places of a fleet's lab devices (empty when the lab runs them where the file says)."""
    path = placement_file(root, fleet)
    try:
        recorded = json.loads(path.read_text())
        return {name: Place(str(p["host"]), int(p["port"]), str(p["root"])) for name, p in recorded.items()}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}  # unreadable: the devices stay where the file says, and lab up records them again


def write_placement(root: Path, fleet: str, places: dict[str, Place]) -> None:
    path = placement_file(root, fleet)
    if not places:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({name: asdict(p) for name, p in sorted(places.items())}, indent=2) + "\n")
    temporary.replace(path)


def placed(doc: Document[Fleet], places: dict[str, Place]) -> Document[Fleet]:
    """The fleet with its loopback devices moved where the lab put them (lines stay the file's)."""
    if not places:
        return doc
    devices = [d.model_copy(update=asdict(places[d.name])) if d.name in places and on_loopback(d.host) else d
               for d in doc.obj.spec.devices]
    spec = doc.obj.spec.model_copy(update={"devices": devices})
    return replace(doc, obj=doc.obj.model_copy(update={"spec": spec}))
