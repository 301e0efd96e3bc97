"""A lab device's own network link: a namespace the lab creates, joined to the host by a veth pair with a rate.

A device with ``lab: {link_mbit: N}`` runs its sshd (and so its agent) inside the network namespace
``edgeops-<id>``; the host reaches it at an address of a /30 in 10.213.0.0/16 over the veth pair
``eoh-<id>`` (host end) / ``eod-<id>`` (device end). A token bucket (``tc`` ``tbf``) on each end holds both
directions to N Mbit/s, as a cellular or factory link would. ``lab link DEVICE down`` takes the host end down:
a partition (packets go nowhere, connections stall, nothing is refused), ``up`` heals it. Latency and loss
would need ``netem``, which this kernel does not offer: the lab does not simulate them.

Every address and interface is one the lab created; nothing here touches the host's own links.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edgeops.errors import EdgeopsError

LAB_NET = ipaddress.ip_network("10.213.0.0/16")
HOST_PREFIX, DEVICE_PREFIX, NS_PREFIX = "eoh-", "eod-", "edgeops-"


class LinkUnavailable(EdgeopsError):
    """This host cannot give a lab device a link of its own (no network namespaces, no tc, not root)."""


@dataclass(frozen=True)
class Link:
    id: str               # 8 hex: the same for the same lab, fleet and device
    host_ip: str
    device_ip: str

    @property
    def namespace(self) -> str:
        return NS_PREFIX + self.id

    @property
    def host_if(self) -> str:
        return HOST_PREFIX + self.id

    @property
    def device_if(self) -> str:
        return DEVICE_PREFIX + self.id


def link_for(lab: str, fleet: str, device: str) -> Link:
    """The link of one lab device: names and addresses derived from the lab, fleet and device."""
    digest = hashlib.sha256(f"{lab}/{fleet}/{device}".encode()).hexdigest()
    subnets = LAB_NET.num_addresses // 4
    first = int(digest[8:16], 16) % subnets
    taken, own = _addresses_in_use(), HOST_PREFIX + digest[:8]
    for step in range(subnets):  # another lab's device on the same /30: take the next free one
        base = LAB_NET.network_address + 4 * ((first + step) % subnets)
        host_ip, device_ip = str(base + 1), str(base + 2)
        if taken.get(host_ip, own) == own:
            return Link(digest[:8], host_ip, device_ip)
    raise LinkUnavailable("every lab link address in 10.213.0.0/16 is taken")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def _must(*argv: str) -> None:
    done = _run(*argv)
    if done.returncode != 0:
        raise LinkUnavailable(f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()[:300]}")


def _addresses_in_use() -> dict[str, str]:
    """IPv4 addresses on this host's interfaces in the lab's net, with the interface holding each."""
    done = _run("ip", "-o", "-4", "addr", "show")
    found = {}
    for line in done.stdout.splitlines():
        words = line.split()
        if "inet" in words:
            address = words[words.index("inet") + 1].split("/")[0]
            if ipaddress.ip_address(address) in LAB_NET:
                found[address] = words[1].split("@")[0]
    return found


def exists(link: Link) -> bool:
    return Path(f"/sys/class/net/{link.host_if}").exists()


def is_up(link: Link) -> bool:
    try:
        return int(Path(f"/sys/class/net/{link.host_if}/flags").read_text(), 16) & 1 == 1  # IFF_UP
    except (OSError, ValueError):
        return False


def create(link: Link, mbit: float) -> None:
    """The namespace, the veth pair, the addresses and the rate (idempotent: an existing link gets the rate)."""
    if os.geteuid() != 0:
        raise LinkUnavailable("network namespaces need root")
    if not exists(link):
        _run("ip", "netns", "del", link.namespace)  # a namespace left without its link by a crash
        _must("ip", "netns", "add", link.namespace)
        _must("ip", "link", "add", link.host_if, "type", "veth", "peer", "name", link.device_if)
        _must("ip", "link", "set", link.device_if, "netns", link.namespace)
        _must("ip", "addr", "add", f"{link.host_ip}/30", "dev", link.host_if)
        _must("ip", "-n", link.namespace, "addr", "add", f"{link.device_ip}/30", "dev", link.device_if)
        _must("ip", "-n", link.namespace, "link", "set", "lo", "up")
        _must("ip", "-n", link.namespace, "link", "set", link.device_if, "up")
        _must("ip", "link", "set", link.host_if, "up")
    shape(link, mbit)


def shape(link: Link, mbit: float) -> None:
    """Both directions held to ``mbit`` by a token bucket on each end of the pair."""
    rate_bytes = mbit * 1e6 / 8
    burst = max(16 * 1024, int(rate_bytes / 100))  # 10 ms of traffic: smooth, yet enough for the timer's tick
    qdisc = ["root", "tbf", "rate", f"{mbit:g}mbit", "burst", str(burst), "latency", "200ms"]
    _must("tc", "qdisc", "replace", "dev", link.host_if, *qdisc)
    _must("ip", "netns", "exec", link.namespace, "tc", "qdisc", "replace", "dev", link.device_if, *qdisc)


def set_up(link: Link, up: bool) -> None:
    """Heal or partition the link (the host end up or down; addresses and rate stay)."""
    if not exists(link):
        raise LinkUnavailable(f"the lab link {link.host_if} does not exist (is the device up with lab.link_mbit?)")
    _must("ip", "link", "set", link.host_if, "up" if up else "down")


def remove(link: Link) -> None:
    """What still runs in the namespace is stopped (a session cut by a partition waits for a peer that is not
    coming), then the namespace goes, and with it the device end; the host end goes with its peer."""
    for pid in _run("ip", "netns", "pids", link.namespace).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGTERM)
    _run("ip", "netns", "del", link.namespace)
    if exists(link):
        _run("ip", "link", "del", link.host_if)


def in_namespace(link: Link, argv: list[str]) -> list[str]:
    """``argv`` run inside the device's network namespace, and only that: not ``ip netns exec``, which mounts
    a sysfs of its own over /sys and so hides the cgroup files the agent reads its OOM kills from."""
    return ["nsenter", f"--net=/run/netns/{link.namespace}", "--", *argv]


def is_lab_address(host: str) -> bool:
    """An address the lab gave one of its devices' links (for the no-traffic-off-this-machine audits)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address in LAB_NET and any(name.startswith(HOST_PREFIX) for name in os.listdir("/sys/class/net"))
