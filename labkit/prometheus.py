"""A throw-away Prometheus (Debian's package) on 127.0.0.1 that scrapes one target with edgeops' alert rules."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from labkit.repo import REPO, free_ports

RULES = REPO / "deploy" / "prometheus" / "edgeops-rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "edgeops.json"


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is not installed: scripts/test.sh installs Debian's prometheus package " \
                  "(EDGEOPS_TEST_TOOLS=1 scripts/install.sh)"
    return found


@contextmanager
def running_prometheus(target: str, interval_s: int = 1) -> Iterator[str]:
    """Prometheus scraping ``target`` (host:port) every ``interval_s`` and evaluating the rules as often;
    yields its base URL; stopped and removed when the block ends, however it ends."""
    base = Path(tempfile.mkdtemp(prefix="edgeops-prom-"))
    config = {"global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"},
              "rule_files": [str(RULES)],
              "scrape_configs": [{"job_name": "edgeops", "static_configs": [{"targets": [target]}]}]}
    (base / "prometheus.yml").write_text(json.dumps(config))   # JSON is YAML
    port = free_ports(1)[0]
    log = (base / "prometheus.log").open("w")
    server = subprocess.Popen([tool("prometheus"), f"--config.file={base / 'prometheus.yml'}",
                               f"--storage.tsdb.path={base / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prometheus did not start: {(base / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def query(url: str, expression: str) -> list[dict[str, Any]]:
    """The instant vector of ``expression`` (raises on a query Prometheus rejects)."""
    address = f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expression})}"
    with urllib.request.urlopen(address, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def wait_for(url: str, expression: str, timeout_s: float = 90) -> list[dict[str, Any]]:
    """The first non-empty answer to ``expression`` within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = query(url, expression)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expression) of every query in the Grafana dashboard, its variables filled for all."""
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"].replace("$deployment", ".*"))
            for panel in board["panels"] for target in panel["targets"]]
