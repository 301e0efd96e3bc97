"""A listener on 127.0.0.1 that records every byte a client sends it: proof of what edgeops sent where."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

MQTT_CONNACK_REFUSED = bytes([0x20, 0x02, 0x00, 0x05])  # MQTT 3.1.1: not authorized


class Capture:
    def __init__(self) -> None:
        self.connections: list[bytes] = []
        self._lock = threading.Lock()

    @property
    def received(self) -> bytes:
        with self._lock:
            return b"".join(self.connections)


@contextmanager
def capturing_listener(reply: bytes = MQTT_CONNACK_REFUSED) -> Iterator[tuple[int, Capture]]:
    """(port, capture) of a TCP listener that keeps what each connection sends, answers ``reply``, hangs up."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    capture, stop = Capture(), threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(2)
                try:
                    data = conn.recv(65536)
                    if data:
                        conn.sendall(reply)
                except OSError:
                    data = b""
                with capture._lock:
                    capture.connections.append(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], capture
    finally:
        stop.set()
        thread.join(5)
        server.close()
