"""A TCP relay on 127.0.0.1 in front of a lab device, that can cut each connection after N bytes.

Used to put faults on the wire itself: an EOF in the middle of the SSH handshake (a few hundred bytes
in), or a reset later in a session. ``cut_after`` applies to connections opened while it is set.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Relay:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut_after: int | None = None   # bytes from the device to the client, then both sides are closed
        self.cut_upload_after: int | None = None  # bytes from the client to the device (an upload cut half way)
        self.cuts = 0
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(32)
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            directions = ((client, upstream, [self.cut_upload_after]), (upstream, client, [self.cut_after]))
            for source, sink, budget in directions:
                threading.Thread(target=self._pump, args=(source, sink, budget, client, upstream), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, budget: list[int | None],
              *both: socket.socket) -> None:
        try:
            source.settimeout(None)
            while data := source.recv(65536):
                if budget[0] is not None:
                    if len(data) >= budget[0]:
                        sink.sendall(data[:budget[0]])
                        self.cuts += 1
                        break
                    budget[0] -= len(data)
                sink.sendall(data)
        except OSError:
            pass
        for sock in both:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()


def relay_in_front(root: Path, device: str) -> Relay:
    """A relay in front of ``device``: the fleet dials the relay, which the device's host key also answers for."""
    fleet = root / "manifests" / "fleets" / "lab.yaml"
    text = fleet.read_text()
    line = next(x for x in text.splitlines() if f"name: {device}," in x)
    port = int(line.split("port: ")[1].split(",")[0])
    relay = Relay(port)
    fleet.write_text(text.replace(line, line.replace(f"port: {port},", f"port: {relay.port},")))
    known_hosts = root / ".edgeops" / "lab" / "known_hosts"
    entries = known_hosts.read_text().splitlines()
    alias = [e.replace(f"[127.0.0.1]:{port} ", f"[127.0.0.1]:{relay.port} ", 1)
             for e in entries if e.startswith(f"[127.0.0.1]:{port} ")]
    known_hosts.write_text("\n".join(entries + alias) + "\n")
    return relay


@contextmanager
def relay(target_port: int) -> Iterator[Relay]:
    found = Relay(target_port)
    try:
        yield found
    finally:
        found.close()
