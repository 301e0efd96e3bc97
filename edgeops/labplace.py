"""Where this clone's lab devices listen: the placement ``lab up`` decides and records.

A lab whose fleet-file ports another process holds (another clone's lab) moves to free ports, or to
``--port-base N``, with device roots of its own; a device with a link of its own listens at its namespace's
address. ``edgeops.manifest.placement`` records the result and applies it whenever the workspace loads.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from edgeops.lab import LabError, host_lock, link_mbit, own_link, own_roots, running_sshd
from edgeops.manifest.models import Fleet
from edgeops.manifest.placement import Place, on_loopback, placement_file, read_placement, write_placement
from edgeops.manifest.workspace import Document, Workspace
from edgeops.targets import fleet_targets


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (bound then released)."""
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def one_lab_up_at_a_time() -> AbstractContextManager[None]:
    """Held from choosing ports to listening on them: two clones starting their labs at once on one host take
    turns, so the second sees the first's ports taken and moves, instead of both picking the same."""
    return host_lock("edgeops-lab-up.lock")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def arrange(ws: Workspace, fleet: Document[Fleet], port_base: int | None = None,
            report: Callable[[str], None] = lambda message: None) -> bool:
    """Decide where this clone's lab devices listen; True when that changed (reload the workspace).

    A device with a link of its own listens at its namespace's address. ``port_base``: the others listen on
    port_base, port_base+1, ... in fleet order. Without it they stay where the fleet file (or an earlier
    placement) puts them unless another process holds one of those ports: then they all move to free ports.
    A moved device gets a root of this lab's own, so two clones never share a device's releases or trust
    root. Devices already running are never moved under their feet.
    """
    earlier = read_placement(ws.root, fleet.name)
    devices = [d for d in fleet.obj.spec.devices if on_loopback(d.host) or d.name in earlier]
    if not devices:
        return False
    local = [d for d in devices if link_mbit(fleet, d) is None]
    ports = {d.name: d.port for d in local}
    if port_base is not None:
        if not 1024 <= port_base <= 65535 - len(devices):
            raise LabError(f"--port-base {port_base}: the lab needs {len(devices)} ports from 1024 to 65535")
        ports = {d.name: port_base + index for index, d in enumerate(local)}
    else:
        taken = [d for d in local if not running_sshd(ws, fleet.name, d.name) and not _port_free(d.host or "", d.port)]
        if taken:
            ports = dict(zip([d.name for d in local], free_ports(len(local))))
            report(f"{', '.join(f'{d.host}:{d.port}' for d in taken)} taken by another process (another clone's "
                   f"lab?): {fleet.name} moves to free ports {', '.join(map(str, ports.values()))}, recorded in "
                   f"{placement_file(ws.root, fleet.name)} (`edgeops lab up --port-base N` picks them)")
    targets = {t.name: t for t in fleet_targets(ws, fleet)}
    own = own_roots(ws)

    def root(name: str) -> str:
        return targets[name].root if name in earlier else str(Path(targets[name].root).parent / own / name)

    places = dict(earlier)
    for device in devices:
        link = own_link(ws, fleet, device)
        if link is not None:
            places[device.name] = Place(link.device_ip, device.port, root(device.name))
        elif device.name in earlier or ports[device.name] != device.port:
            places[device.name] = Place("127.0.0.1", ports[device.name], root(device.name))
    if places == earlier:
        return False
    running = [d.name for d in devices if d.name in places and places[d.name] != earlier.get(d.name)
               and running_sshd(ws, fleet.name, d.name)]
    if running:
        raise LabError(f"lab devices {', '.join(running)} of {fleet.name} are running elsewhere",
                       hint=f"`edgeops lab down {fleet.name}` first, then lab up again")
    write_placement(ws.root, fleet.name, places)
    return True
