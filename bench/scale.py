"""Pull mode at fleet scale: 1,000 simulated devices and 4 real agent daemons on one broker and one registry.

    python bench/scale.py [--simulated 1000] [--real 4] [--json results.json]

Everything real except the model runs of the simulated devices: Debian's mosquitto and docker-registry
(started as `edgeops lab up` starts them), one MQTT connection per simulated device with its own user and
ACL, blobs fetched over the OCI distribution API and checked against their sha256, the status documents
the agent publishes. A simulated device skips the benchmark and publishes a made-up verdict (Passed, or
Failed for the canary in the first apply). The 4 real devices run edgeops_pulld.py with onnxruntime.

Measured: the two applies (the first with a failing canary that must halt it in wave 1), `edgeops status`
of all devices (a fresh process, -o json), and the CPU the broker and the registry used in each phase.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import selectors
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from labkit.repo import PULL_DEPLOYMENT, copy_repo, free_ports  # noqa: E402

EDGEOPS = [sys.executable, "-m", "edgeops"]


def write_fleet(root: Path, simulated: int, real: int, device_roots: Path) -> Path:
    broker, registry = free_ports(2)
    lines = ["apiVersion: edgeops/v1", "kind: Fleet", "metadata: {name: scale}", "spec:", "  profile: lab-pull",
             "  pull:", f"    broker: mqtt://127.0.0.1:{broker}", f"    registry: http://127.0.0.1:{registry}",
             "    password_file: lab/scale/controller.password", "    report_deadline_s: 120",
             "    heartbeat_s: 30", "  devices:"]
    for index in range(1, real + 1):
        lines.append(f"    - {{name: real-{index:02d}, root: {device_roots / f'real-{index:02d}'}, labels: {{kind: real}}}}")
    for index in range(1, simulated + 1):
        ring = "canary" if index == 1 else "main"
        lines.append(f"    - {{name: sim-{index:04d}, labels: {{kind: simulated, ring: {ring}}}}}")
    path = root / "manifests" / "fleets" / "scale.yaml"
    path.write_text("\n".join(lines) + "\n")
    manifest = (root / "manifests" / "wearable.yaml").read_text()
    manifest = manifest.replace("name: wearable-activity", f"name: {PULL_DEPLOYMENT}").replace(
        "- fleet: lab\n", "- fleet: scale\n").replace("waves: [1, 50%, 100%]", 'waves: [{selector: "ring=canary"}, 10%, 100%]')
    (root / "manifests" / f"{PULL_DEPLOYMENT}.yaml").write_text(manifest)
    return path


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Simulated:
    """Many devices, one MQTT connection each, one thread for all their sockets and a pool for their fetches."""

    def __init__(self, names: list[str], passwords: dict[str, str], broker_port: int, registry: str) -> None:
        self.registry, self.failing = registry, {"sim-0001"}
        self.clients: dict[str, mqtt.Client] = {}
        self.pool = ThreadPoolExecutor(8)
        self.stop = threading.Event()
        self.handled = 0
        self.verified: set[tuple[str, int]] = set()  # (device, generation) measured, waiting for the commit
        for name in names:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{name}")
            client.username_pw_set(f"scale.{name}", passwords[name])
            client.user_data_set(name)
            client.on_connect = self.connected
            client.will_set(f"edgeops/scale/{name}/online", json.dumps({"online": False}), qos=1, retain=True)
            client.on_message = lambda c, u, m: self.pool.submit(self.handle, c, u, m.payload)
            client.connect("127.0.0.1", broker_port, keepalive=120)
            self.clients[name] = client
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    @staticmethod
    def connected(client: mqtt.Client, name: str, flags: Any, reason: Any, properties: Any = None) -> None:
        client.subscribe(f"edgeops/scale/{name}/+/desired", qos=1)
        client.publish(f"edgeops/scale/{name}/online", json.dumps({"online": True, "at": time.time()}), qos=1,
                       retain=True)

    def loop(self) -> None:
        selector = selectors.DefaultSelector()
        by_socket = {}
        for client in self.clients.values():
            sock = client.socket()
            selector.register(sock, selectors.EVENT_READ, client)
            by_socket[sock] = client
        last_misc = 0.0
        while not self.stop.is_set():
            for key, _ in selector.select(0.05):
                key.data.loop_read()
            for client in self.clients.values():
                if client.want_write():
                    client.loop_write()
            if time.monotonic() - last_misc > 1:
                last_misc = time.monotonic()
                for client in self.clients.values():
                    client.loop_misc()

    def handle(self, client: mqtt.Client, name: str, payload: bytes) -> None:
        if not payload:
            return
        desired = json.loads(payload)
        deployment, release = desired["deployment"], desired["release"]
        if desired["action"] == "withdraw":
            return  # a device waiting for its commit would revert; a simulated one never waits
        phase, fetched = "done", 0
        if desired["action"] == "install":
            fetched_before = (name, desired["generation"]) in self.verified
            for item in [] if fetched_before else desired["files"].values():  # GET by digest, check the digest
                url = f"{self.registry}/v2/{desired['registry']['repository']}/blobs/sha256:{item['sha256']}"
                with urllib.request.urlopen(url, timeout=60) as response:
                    assert hashlib.sha256(response.read()).hexdigest() == item["sha256"]
                fetched += item["size"]
            failed = name in self.failing
            outcome = "Failed" if failed else "Passed"
            check = {"name": "latency-slo", "outcome": outcome, "detail": f"simulated p95 ({outcome})"}
            verdict = {"outcome": outcome, "checks": [check], "reason": check["detail"],
                       "measurements": {"latency": {"p50_ms": 0.03, "p95_ms": 0.04}, "simulated": True}}
            result, status = ("rejected", None) if failed else ("committed", "committed")
            current = None if failed else release
            if not failed and desired.get("commit") == "on-order":  # the controller decides the commit
                self.verified.add((name, desired["generation"]))
                phase, result, status = "verified", "awaiting-commit", "verifying"
        else:
            verdict, result, status, current = None, "rolled-back", "rolled_back", release
        state = {"current": current, "previous": None, "releases": [current] if current else [],
                 "blobs": [i["sha256"] for i in desired.get("files", {}).values()], "free_bytes": 10 ** 10,
                 "state": {"current": current, "committed": current, "status": status,
                           "verification": ({"outcome": verdict["outcome"], "reason": verdict["reason"],
                                             "latency": {"p50_ms": 0.03, "p95_ms": 0.04}, "slo": desired["gate"]["slo"]}
                                            if verdict and current else None),
                           "releases": {current: {"state": "committed"}} if current else {}, "history": []},
                 "facts": {"python": {"executable": "/usr/bin/python3", "version": "3.11.2"}, "machine": "x86_64",
                           "onnxruntime": {"version": "simulated", "available_providers": ["CPUExecutionProvider"]},
                           "numpy": {"version": "simulated"}, "disk": {"free_bytes": 10 ** 10, "writable": True},
                           "power_sensor": {"source": "hwmon", "readable": True},
                           "trust": {"enrolled": False}}}
        document = {"schema": "edgeops.status/v1", "fleet": "scale", "device": name, "deployment": deployment,
                    "at": time.time(), "generation": desired["generation"], "release": release,
                    "action": desired["action"], "phase": phase, "result": result, "verdict": verdict,
                    "error": None, "state": state, "bytes_fetched": fetched}
        client.publish(f"edgeops/scale/{name}/{deployment}/status", json.dumps(document), qos=1, retain=True)
        self.handled += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for client in self.clients.values():
            client.disconnect()


def timed(argv: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - start, done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--simulated", type=int, default=1000)
    parser.add_argument("--real", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from edgeops.labpull import pull_dir, pull_lab_down, pull_lab_up
    from edgeops.manifest.workspace import load_workspace
    from edgeops.targets import fleet_targets

    with tempfile.TemporaryDirectory(prefix="edgeops-scale-") as tmp:
        root = copy_repo(Path(tmp) / "repo")
        write_fleet(root, args.simulated, args.real, Path(tmp) / "devices")
        ws = load_workspace(root)
        fleet = ws.fleets["scale"]
        targets = fleet_targets(ws, fleet)
        simulated = frozenset(t.name for t in targets if t.name.startswith("sim-"))
        started = time.perf_counter()
        pull_lab_up(ws, fleet, targets, simulate=simulated)
        state = pull_dir(ws, fleet)
        broker_pid = int((state / "broker" / "pid").read_text())
        registry_pid = int((state / "registry" / "pid").read_text())
        settings = fleet.obj.spec.pull
        assert settings is not None
        passwords = {n: (state / n / "broker.password").read_text().strip() for n in simulated}
        sims = Simulated(sorted(simulated), passwords, int(settings.broker.rsplit(":", 1)[1]), settings.registry)
        results: dict[str, Any] = {"simulated": args.simulated, "real": args.real,
                                   "lab_up_s": round(time.perf_counter() - started, 2)}
        env = {**os.environ, "EDGEOPS_ACTOR": "bench"}
        try:
            time.sleep(2)
            phases = [("apply with a failing canary", [*EDGEOPS, "apply", f"manifests/{PULL_DEPLOYMENT}.yaml", "-o", "json"]),
                      ("apply", [*EDGEOPS, "apply", f"manifests/{PULL_DEPLOYMENT}.yaml", "-o", "json"]),
                      ("status", [*EDGEOPS, "status", f"manifests/{PULL_DEPLOYMENT}.yaml", "-o", "json"]),
                      ("status again", [*EDGEOPS, "status", f"manifests/{PULL_DEPLOYMENT}.yaml", "-o", "json"]),
                      ("no-op apply", [*EDGEOPS, "apply", f"manifests/{PULL_DEPLOYMENT}.yaml", "-o", "json"])]
            for name, argv in phases:
                cpu = cpu_s(broker_pid), cpu_s(registry_pid)
                start = time.perf_counter()
                done = subprocess.run(argv, cwd=root, capture_output=True, text=True, env=env)
                wall = time.perf_counter() - start
                found = json.loads(done.stdout)[0] if done.stdout.strip().startswith("[") else {}
                row: dict[str, Any] = {"wall_s": round(wall, 2), "exit": done.returncode,
                                       "broker_cpu_s": round(cpu_s(broker_pid) - cpu[0], 2),
                                       "registry_cpu_s": round(cpu_s(registry_pid) - cpu[1], 2)}
                if "outcome" in found:
                    decisions: dict[str, int] = {}
                    for device in found["devices"]:
                        decisions[device["decision"]] = decisions.get(device["decision"], 0) + 1
                    row.update(outcome=found["outcome"], message=found["message"], decisions=decisions)
                elif "devices" in found:
                    rows = found["devices"]
                    row.update(devices=len(rows), synced=sum(r["sync"] == "Synced" for r in rows),
                               healthy=sum(r["health"] == "Healthy" for r in rows))
                else:
                    row["stderr"] = done.stderr[-500:]
                results[name] = row
                print(name, json.dumps(row), flush=True)
                if name == "apply with a failing canary":
                    sims.failing = set()  # the fix: the canary passes from now on
        finally:
            sims.close()
            pull_lab_down(ws, fleet, targets)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
