"""What the ledger costs on each engine: recording a rollout, reading history, taking a fleet lock.

    python bench/state.py [--rollouts 200] [--devices 16]

SQLite: a file in a temporary directory. PostgreSQL: a throw-away cluster from Debian's package on
127.0.0.1 (labkit/postgres.py; fsync off, as the tests run it: a production server's commit latency
adds to the write figures). Each rollout records a start, one decision per device with a
measurement of 400 A/B samples per side (what a verified rollout writes), and a finish.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine, markdown_table  # noqa: E402

from edgeops.state import Ledger, open_ledger  # noqa: E402
from labkit.postgres import fresh_database, running_postgres  # noqa: E402

SAMPLES = {"latency": {"p50_ms": 0.02, "p95_ms": 0.03}, "samples_ms": {"new": [0.0213] * 400, "previous": [0.0209] * 400}}


def one_rollout(ledger: Ledger, devices: int) -> None:
    rollout = ledger.start_rollout("bench", "apply", "bench", {"commit": "abc"}, {"cpu": "f" * 64}, "rel-0123456789ab")
    for index in range(devices):
        ledger.device_event(rollout, "bench", f"lab/d{index:03d}", "update", "Passed", wave=1, release_id="r-1",
                            measurements=SAMPLES)
    ledger.finish_rollout(rollout, "succeeded", {"message": "ok"})


def measure(ledger: Ledger, rollouts: int, devices: int) -> list[str]:
    started = time.perf_counter()
    for _ in range(rollouts):
        one_rollout(ledger, devices)
    write = (time.perf_counter() - started) / rollouts
    reads = []
    for _ in range(20):
        started = time.perf_counter()
        ledger.history("bench", 20)
        reads.append(time.perf_counter() - started)
    locks = []
    for _ in range(50):
        started = time.perf_counter()
        with ledger.lock(["lab"], holder="bench"):
            pass
        locks.append(time.perf_counter() - started)
    return [f"{write * 1000:.0f}", f"{statistics.median(reads) * 1000:.0f}", f"{statistics.median(locks) * 1000:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=200)
    parser.add_argument("--devices", type=int, default=16)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = open_ledger(None, Path(tmp) / "ledger.sqlite")
        rows.append(["SQLite (file, WAL)", *measure(sqlite, args.rollouts, args.devices)])
    with running_postgres() as server:
        postgres = open_ledger(fresh_database(server, "bench"), Path("unused"))
        rows.append(["PostgreSQL 15 (127.0.0.1)", *measure(postgres, args.rollouts, args.devices)])
    print(f"Machine: {machine()}; {args.rollouts} rollouts of {args.devices} device decisions each\n")
    print(markdown_table(["engine", "record one rollout ms", "history (20 rollouts) ms", "take + release a lock ms"],
                         rows))


if __name__ == "__main__":
    main()
