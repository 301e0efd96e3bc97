"""Wall time of apply (cold and no-op) and of status for 4, 16 and 32 lab devices.

    python bench/rollout.py [--sizes 4,16,32,100]

Devices are real sshd processes on 127.0.0.1 sharing this 2-core host with the
orchestrator; apply includes build (a cache hit after the first size), render,
plan, push, switch, on-device verification (400 interleaved runs) and commit,
in the wearable manifest's waves [1, 50%, 100%] with 4 devices in parallel.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine, markdown_table  # noqa: E402

from edgeops.connections import Connections  # noqa: E402
from edgeops.lab import lab_down, lab_up  # noqa: E402
from edgeops.manifest.workspace import load_workspace  # noqa: E402
from edgeops.operations import apply_deployment, status_rows  # noqa: E402
from edgeops.targets import target_devices  # noqa: E402
from labkit.artifacts import repo_at  # noqa: E402
from labkit.repo import copy_repo, lab_device_cpu_s, write_lab_fleet  # noqa: E402


def timed(fn):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,16,32,100")
    args = parser.parse_args()
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            root = copy_repo(Path(tmp) / "repo")
            write_lab_fleet(root, size, Path(tmp) / "devices")
            ws = load_workspace(root)
            doc = ws.deployments["wearable-activity"]
            fleet = ws.fleets["lab"]
            lab_up(ws, fleet, target_devices(ws, doc.name))
            try:
                repo = repo_at(root, ws)
                with Connections(parallelism=doc.obj.spec.rollout.parallelism) as c:
                    cold, (_, result) = timed(lambda: apply_deployment(repo, doc, c))
                assert result.outcome == "succeeded", result.message
                with Connections(parallelism=doc.obj.spec.rollout.parallelism) as c:
                    noop, (_, again) = timed(lambda: apply_deployment(repo, doc, c))
                assert again.outcome == "no-op"
                time.sleep(0.5)
                cpu = lab_device_cpu_s(ws)
                with Connections(parallelism=16) as c:
                    status, found = timed(lambda: status_rows(repo, doc, c))
                time.sleep(0.5)  # a device's sshd accounts a connection's CPU when it has closed
                status_cpu = (lab_device_cpu_s(ws) - cpu) / size
                assert all(r.sync == "Synced" for r in found)
            finally:
                lab_down(ws, fleet)
        rows.append([size, f"{cold:.1f}", f"{noop:.2f}", f"{status:.2f}", f"{status_cpu:.3f}", result.count("Passed")])
    print(f"Machine: {machine()}; devices: real sshd on 127.0.0.1 sharing this host\n")
    print(markdown_table(["devices", "apply cold s", "apply no-op s", "status s", "status: device CPU s per device",
                          "devices verified"], rows))


if __name__ == "__main__":
    main()
