"""A webhook receiver on 127.0.0.1 for tests: real HTTP, records what it is sent."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@contextmanager
def webhook_receiver(path: str = "/hook") -> Iterator[tuple[str, dict[str, Any]]]:
    """(URL, state): answers the first ``state["fail"]`` posts with 500, then records bodies in ``state["bodies"]``."""
    state: dict[str, Any] = {"fail": 0, "seen": 0, "bodies": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state["seen"] += 1
            if state["seen"] <= state["fail"]:
                self.send_response(500)
            else:
                state["bodies"].append(json.loads(body))
                self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{path}", state
    finally:
        server.shutdown()
