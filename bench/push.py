"""Push a 5 MB artifact to 1, 4 and 16 lab devices over real sshd; first push, repeat push, rollback.

    python bench/push.py

Each device is a real OpenSSH sshd on 127.0.0.1 (this host: client and all
devices share its CPUs). Wall time covers connect + agent shipping + upload +
sha256 check + assembly; aggregate MB/s = model bytes moved / wall time.
Also times 16 devices at several worker-pool sizes to choose the default.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine, markdown_table  # noqa: E402

from edgeops.connections import Connections  # noqa: E402
from edgeops.device import Device  # noqa: E402
from edgeops.lab import lab_down, lab_up  # noqa: E402
from edgeops.manifest.workspace import load_workspace  # noqa: E402
from edgeops.release import ReleaseFile, make_release  # noqa: E402
from edgeops.render import render_device  # noqa: E402
from edgeops.targets import target_devices  # noqa: E402
from edgeops.types import DeviceStatus  # noqa: E402
from labkit.artifacts import build_for, lab_signed  # noqa: E402
from labkit.repo import copy_repo, lab_device_cpu_s, write_lab_fleet  # noqa: E402

PAYLOAD = 5_000_000


def releases(ws, targets, payload: Path):
    doc = ws.deployments["wearable-activity"]
    artifact = build_for(ws, doc.name, "cpu").artifact
    data = payload.read_bytes()
    extra = ReleaseFile("payload.bin", hashlib.sha256(data).hexdigest(), len(data), local=payload)
    out = {}
    for target in targets:
        release = make_release(doc.name, artifact, render_device(ws, doc, target, artifact.report["artifact"]))
        out[target.key] = replace(release, id=release.id + "-5mb", files=release.files + (extra,))
    return out


def run(connections: Connections, targets, work):
    started = time.perf_counter()
    results = connections.map(work, targets)
    wall = time.perf_counter() - started
    failures = [r for r in results.values() if isinstance(r, Exception)]
    if failures:
        raise failures[0]
    return wall, results


def main() -> None:
    rows, pool_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_repo(Path(tmp) / "repo")
        write_lab_fleet(root, 16, Path(tmp) / "devices")
        ws = load_workspace(root)
        fleet = ws.fleets["lab"]
        all_targets = target_devices(ws, "wearable-activity")
        lab_up(ws, fleet, all_targets)
        payload = Path(tmp) / "payload.bin"
        payload.write_bytes(os.urandom(PAYLOAD))
        try:
            first = releases(ws, all_targets, payload)
            for count in (1, 4, 16):
                targets = all_targets[:count]
                for t in targets:  # a clean device each time
                    os.system(f"rm -rf '{t.root}'")
                with Connections() as connections:
                    def device(t):
                        return Device(connections.get(t), t.root, t.python, "wearable-activity")

                    def commit(t, release):  # what a passed verification does: only committed releases are targets
                        d = device(t)
                        d.activate(release.id, signed=lab_signed(root, release))
                        d.record({"status": DeviceStatus.COMMITTED}, release=release.id)

                    def push(t):  # as apply does: one agent session per device
                        d = device(t)
                        with d.session():
                            return d.push(first[t.key])

                    if count == 16:  # for comparison: every step its own SSH exec (login shell, Python start)
                        cpu = lab_device_cpu_s(ws)
                        wall, _ = run(connections, targets, lambda t: device(t).push(first[t.key]))
                        connections.close()
                        time.sleep(0.3)
                        rows.append([count, "first push, one exec per step", f"{wall:.2f}", "", "",
                                     f"{(lab_device_cpu_s(ws) - cpu) / count:.2f}"])
                        for t in targets:
                            os.system(f"rm -rf '{t.root}'")

                    cpu = lab_device_cpu_s(ws)
                    wall, results = run(connections, targets, push)
                    connections.close()  # the device's sshd accounts a connection's CPU when it ends
                    time.sleep(0.3)
                    per_device = (lab_device_cpu_s(ws) - cpu) / count
                    moved = sum(r.bytes_moved for r in results.values())
                    rows.append([count, "first push", f"{wall:.2f}", f"{moved / 1e6:.1f}", f"{moved / 1e6 / wall:.1f}",
                                 f"{per_device:.2f}"])
                    run(connections, targets, lambda t: commit(t, first[t.key]))
                    wall, results = run(connections, targets, push)
                    moved = sum(r.bytes_moved for r in results.values())
                    rows.append([count, "repeat push", f"{wall:.2f}", f"{moved / 1e6:.1f}", "—", "—"])
                    # a second release (other runtime config, same model): then roll back to the first
                    second = {k: replace(r, id=r.id + "-b", files=tuple(
                        replace(f, content=(f.content or b"") + b" ", sha256=hashlib.sha256((f.content or b"") + b" ").hexdigest(),
                                size=f.size + 1) if f.name == "release.json" else f for f in r.files))
                        for k, r in first.items()}
                    run(connections, targets, lambda t: (device(t).push(second[t.key]), commit(t, second[t.key])))
                    sent = sum(connections.get(t).bytes_sent for t in targets)  # type: ignore[attr-defined]
                    wall, _ = run(connections, targets, lambda t: device(t).rollback())
                    moved = sum(connections.get(t).bytes_sent for t in targets) - sent  # type: ignore[attr-defined]
                    rows.append([count, "rollback", f"{wall:.2f}", f"{moved / 1e6:.1f}", "—", "—"])
            for workers in (1, 2, 4, 8, 16):
                for t in all_targets:
                    os.system(f"rm -rf '{t.root}'")
                with Connections(parallelism=workers) as connections:
                    wall, results = run(connections, all_targets, lambda t: Device(
                        connections.get(t), t.root, t.python, "wearable-activity").push(first[t.key]))
                moved = sum(r.bytes_moved for r in results.values())
                pool_rows.append([workers, f"{wall:.2f}", f"{moved / 1e6 / wall:.1f}"])
        finally:
            lab_down(ws, fleet)
    print(f"Machine: {machine()}; devices: real sshd on 127.0.0.1 sharing this host; payload 5 MB + model\n")
    print(markdown_table(["devices", "operation", "wall s", "MB moved", "aggregate MB/s", "device CPU s per device"],
                         rows))
    print("\n16 devices, first push, by worker-pool size:\n")
    print(markdown_table(["parallel connections", "wall s", "aggregate MB/s"], pool_rows))


if __name__ == "__main__":
    main()
