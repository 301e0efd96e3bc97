"""A device that drops the connection during the SSH handshake is named unreachable, never `Aborted!`."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from labkit.repo import copy_repo, lab_credentials, write_lab_fleet


@contextmanager
def hanging_up(banner: bytes) -> Iterator[int]:
    """A listener that says ``banner`` (or nothing) and closes every connection: EOF mid-handshake."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(32)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                if banner:
                    conn.sendall(banner)
                    try:
                        conn.settimeout(1)
                        conn.recv(4096)  # the client's banner, then hang up in the key exchange
                    except OSError:
                        pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.mark.parametrize("banner", [b"", b"SSH-2.0-OpenSSH_9.2\r\n"])
def test_eof_during_the_handshake_is_the_named_unreachable_error(tmp_path: Path, banner: bytes) -> None:
    root = copy_repo(tmp_path / "repo")
    write_lab_fleet(root, 1, tmp_path / "devices")
    lab_credentials(root, tmp_path / "secrets")
    with hanging_up(banner) as port:
        fleet = root / "manifests" / "fleets" / "lab.yaml"
        fleet.write_text(re.sub(r"port: \d+", f"port: {port}", fleet.read_text()))
        env = {"EDGEOPS_SECRETS_DIR": str(tmp_path / "secrets"), "EDGEOPS_CACHE_DIR": str(tmp_path / "cache")}
        for command in ("status", "apply", "plan"):
            result = CliRunner(env=env).invoke(main, [command, str(root / "manifests/wearable.yaml"), "-o", "json",
                                                      "--root", str(root)])
            assert "Aborted" not in result.output and "Traceback" not in result.output, result.output
            assert result.exit_code in (0, 1), (command, result.exit_code, result.output)
            found = json.loads(result.stdout)[0]["devices"][0]
            said = found.get("message") or found.get("reason") or ""
            assert "handshake" in said, (command, found)
            assert "Unreachable" in (found.get("health"), found.get("decision"), found.get("action").title()
                                     if found.get("action") else None), (command, found)
