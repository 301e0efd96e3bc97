"""Push a 5 MB artifact to 1, 4 and 16 lab devices over real sshd; first push, repeat push, rollback.

    python bench/push.py [--only loopback,shaped,overhead] [--links 1,10]

loopback: each device is a real OpenSSH sshd on 127.0.0.1 (this host: client and
all devices share its CPUs). Wall time covers connect + agent shipping + upload +
sha256 check + assembly; aggregate MB/s = model bytes moved / wall time.
Also times 16 devices at several worker-pool sizes to choose the default.

shaped: the same first push, each device in its own network namespace behind a
veth pair held to 1 and 10 Mbit/s each way (lab.link_mbit), one connection per
device (each has its own link).

overhead: what verification costs a small device. 4 lab devices on a quarter of a
core each (cgroups): device CPU seconds per device of a bare first push against a
first `edgeops apply` (push, on-device A/B measurement, gate, commit) with 20 and
with 400 measured runs; devices reset to their provisioned state (agent and trust
root, nothing installed, no facts kept) before each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
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
from edgeops.labplace import arrange  # noqa: E402
from edgeops.manifest.workspace import load_workspace  # noqa: E402
from edgeops.release import ReleaseFile, make_release  # noqa: E402
from edgeops.render import render_device  # noqa: E402
from edgeops.rollout import orders_for  # noqa: E402
from edgeops.targets import target_devices  # noqa: E402
from edgeops.types import DeviceStatus  # noqa: E402
from labkit.artifacts import build_for, lab_release_key, lab_signed  # noqa: E402
from labkit.repo import copy_repo, edited, lab_device_cpu_s, write_lab_fleet  # noqa: E402

PAYLOAD = 5_000_000


def releases(ws, targets, payload: Path | None):
    """The wearable release of each device, with ``payload`` added to it (as is, when None)."""
    doc = ws.deployments["wearable-activity"]
    artifact = build_for(ws, doc.name, "cpu").artifact
    out = {}
    for target in targets:
        release = make_release(doc.name, artifact, render_device(ws, doc, target, artifact.report["artifact"]))
        if payload is not None:
            data = payload.read_bytes()
            extra = ReleaseFile("payload.bin", hashlib.sha256(data).hexdigest(), len(data), local=payload)
            release = replace(release, id=release.id + "-5mb", files=release.files + (extra,))
        out[target.key] = release
    return out


def run(connections: Connections, targets, work):
    started = time.perf_counter()
    results = connections.map(work, targets)
    wall = time.perf_counter() - started
    failures = [r for r in results.values() if isinstance(r, Exception)]
    if failures:
        raise failures[0]
    return wall, results


def loopback() -> None:
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
                _reset(targets, forget_facts=True)  # a clean device each time (as provisioned: agent, trust root)
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
                        _reset(targets, forget_facts=True)

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
                    wall, _ = run(connections, targets, lambda t: device(t).rollback(
                        order=orders_for(t, lab_release_key(), "wearable-activity")))
                    moved = sum(connections.get(t).bytes_sent for t in targets) - sent  # type: ignore[attr-defined]
                    rows.append([count, "rollback", f"{wall:.2f}", f"{moved / 1e6:.1f}", "—", "—"])
            for workers in (1, 2, 4, 8, 16):
                _reset(all_targets, forget_facts=True)
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


def shaped_lab(base: Path, devices: int, lab: str) -> Path:
    """A repo copy whose lab fleet's devices have ``lab`` settings, up (placed where the lab puts them)."""
    root = copy_repo(base / "repo")
    fleet = write_lab_fleet(root, devices, base / "devices")
    fleet.write_text(fleet.read_text().replace("  devices:\n", f"  lab: {lab}\n  devices:\n"))
    ws = load_workspace(root)
    arrange(ws, ws.fleets["lab"])
    ws = load_workspace(root)
    lab_up(ws, ws.fleets["lab"], target_devices(ws, "wearable-activity"))
    return root


def shaped(links: list[float]) -> None:
    rows = []
    for mbit in links:
        with tempfile.TemporaryDirectory() as tmp:
            root = shaped_lab(Path(tmp), 16, f"{{link_mbit: {mbit:g}}}")
            ws = load_workspace(root)
            all_targets = target_devices(ws, "wearable-activity")
            payload = Path(tmp) / "payload.bin"
            payload.write_bytes(os.urandom(PAYLOAD))
            try:
                first = releases(ws, all_targets, payload)
                for count in (1, 4, 16):
                    targets = all_targets[:count]
                    _reset(targets, forget_facts=True)
                    with Connections(parallelism=count) as connections:
                        def push(t):  # noqa: ANN001, ANN202
                            d = Device(connections.get(t), t.root, t.python, "wearable-activity")
                            with d.session():
                                started = time.perf_counter()
                                result = d.push(first[t.key])
                                return result, time.perf_counter() - started
                        wall, results = run(connections, targets, push)
                    per_device = [seconds for _, seconds in results.values()]
                    moved = sum(r.bytes_moved for r, _ in results.values())
                    rows.append([f"{mbit:g} Mbit/s", count, f"{wall:.1f}", f"{min(per_device):.1f}–{max(per_device):.1f}",
                                 f"{moved / count / 1e6:.2f}", f"{moved * 8 / 1e6 / wall / count:.2f}"])
            finally:
                lab_down(ws, ws.fleets["lab"], wipe=True)
    print(f"Machine: {machine()}; devices: real sshd, each in its own network namespace behind a tbf-shaped veth "
          "pair; payload 5 MB + model; one connection per device\n")
    print(markdown_table(["link", "devices", "wall s", "s per device", "MB per device", "Mbit/s per device"], rows))


def _reset(targets, forget_facts: bool) -> None:  # noqa: ANN001
    """Nothing installed (the agent and the trust root stay); ``forget_facts``: as freshly provisioned, else as a
    device that ran a release before (the agent kept its runtime facts then)."""
    for t in targets:
        for name in ("deployments", ".staging", "blobs"):
            shutil.rmtree(Path(t.root) / name, ignore_errors=True)
        if forget_facts:
            for name in ("runtime-facts.json", "facts.json"):
                (Path(t.root) / "agent" / name).unlink(missing_ok=True)


def overhead(devices: int = 4, cpu: float = 0.25) -> None:
    from click.testing import CliRunner

    from edgeops.cli import main as cli

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = shaped_lab(Path(tmp), devices, f"{{cpu: {cpu:g}}}")
        ws = load_workspace(root)
        targets = target_devices(ws, "wearable-activity")
        manifest = root / "manifests" / "wearable.yaml"
        try:
            first = releases(ws, targets, None)  # the release apply pushes: the difference is verification
            for repeat, fresh in ((1, True), (2, True), (3, False), (4, False)):
                device_kind = "fresh device" if fresh else "device that ran a release before"
                _reset(targets, fresh)
                with Connections() as connections:
                    def push(t):  # noqa: ANN001, ANN202
                        d = Device(connections.get(t), t.root, t.python, "wearable-activity")
                        with d.session():
                            return d.push(first[t.key])
                    cpu_before = lab_device_cpu_s(ws)
                    run(connections, targets, push)
                time.sleep(0.5)
                rows.append([repeat, device_kind, "bare push of the same release (state read, upload, assemble)",
                             f"{(lab_device_cpu_s(ws) - cpu_before) / devices:.3f}"])
                for runs in (20, 400):
                    _reset(targets, fresh)
                    with edited((manifest, "    on_inconclusive: retry\n",
                                 f"    on_inconclusive: retry\n    verification: {{runs: {runs}}}\n")):
                        cpu_before = lab_device_cpu_s(ws)
                        done = CliRunner().invoke(cli, ["apply", "manifests/wearable.yaml", "-o", "json",
                                                        "--root", str(root)])
                    time.sleep(0.5)
                    result = json.loads(done.stdout)[0]
                    decisions = sorted({d["decision"] for d in result["devices"]})
                    rows.append([repeat, device_kind, f"apply, {runs} runs ({result['outcome']}: {', '.join(decisions)})",
                                 f"{(lab_device_cpu_s(ws) - cpu_before) / devices:.3f}"])
        finally:
            lab_down(ws, ws.fleets["lab"], wipe=True)
    print(f"Machine: {machine()}; {devices} lab devices, each limited to {cpu:g} core (cgroup), on loopback; "
          "device CPU = the sshd listeners' finished children, read from /proc\n")
    print(markdown_table(["round", "device", "operation", "device CPU s per device"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="loopback,shaped,overhead")
    parser.add_argument("--links", default="1,10", help="link rates in Mbit/s for the shaped rows")
    args = parser.parse_args()
    parts = args.only.split(",")
    if "loopback" in parts:
        loopback()
    if "shaped" in parts:
        shaped([float(v) for v in args.links.split(",")])
    if "overhead" in parts:
        overhead()


if __name__ == "__main__":
    main()
