"""Two clones on one host run the quick start's commands at once: each lab finds its own ports and device roots.

The fleet file's ports are held by another process for the whole test (as another clone's lab would), so both
clones must move, by themselves, without a flag; `--port-base` then puts a lab exactly where asked.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest

from edgeops.manifest.placement import read_placement
from labkit.repo import copy_repo, free_ports

pytestmark = [pytest.mark.ssh, pytest.mark.slow]
FILE_PORTS = (22201, 22202, 22203, 22204)  # manifests/fleets/lab.yaml


def _hold(port: int, stack: ExitStack) -> None:
    sock = stack.enter_context(socket.socket())
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        pass  # already held (a lab of this checkout is up): taken either way


@pytest.fixture
def file_ports_taken() -> Iterator[None]:
    with ExitStack() as stack:
        for port in FILE_PORTS:
            _hold(port, stack)
        yield


def _edgeops(clone: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEOPS_SECRETS_DIR": str(clone / "secrets"),
           "EDGEOPS_STATE": f"sqlite:///{clone / 'state.db'}"}
    return subprocess.run([sys.executable, "-m", "edgeops", *args, "--root", str(clone)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def _quick_start(clone: Path) -> list[subprocess.CompletedProcess[str]]:
    steps = [("lab", "up", "lab"), ("apply", "manifests/wearable.yaml"), ("status", "manifests/wearable.yaml")]
    done = []
    for step in steps:
        done.append(_edgeops(clone, *step))
        if done[-1].returncode != 0:
            break
    return done


def test_two_clones_run_the_quick_start_at_once(tmp_path: Path, file_ports_taken: None) -> None:
    clones = [copy_repo(tmp_path / name) for name in ("one", "two")]
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(_quick_start, clones))
        for clone, steps in zip(clones, results):
            output = "\n".join(s.stdout + s.stderr for s in steps)
            assert [s.returncode for s in steps] == [0, 0, 0], output[-3000:]
            assert "taken by another process" in steps[0].stderr
            assert "4 device(s): 4 Synced, 0 OutOfSync, 0 Unknown; 4 Healthy" in output, output[-3000:]
        places = [read_placement(clone, "lab") for clone in clones]
        ports = [{p.port for p in placed.values()} for placed in places]
        roots = [{p.root for p in placed.values()} for placed in places]
        assert len(ports[0]) == len(ports[1]) == 4 and not ports[0] & ports[1] and not ports[0] & set(FILE_PORTS)
        assert not roots[0] & roots[1] and not roots[0] & {f"/var/tmp/edgeops-lab/lab-0{i}" for i in range(1, 5)}
        for clone, placed in zip(clones, places):  # status and lab status report where the devices really are
            lab = _edgeops(clone, "lab", "status")
            assert all(f"127.0.0.1:{p.port}  running" in lab.stdout for p in placed.values()), lab.stdout
    finally:
        for clone in clones:
            _edgeops(clone, "lab", "down", "--wipe")
    assert not any(Path(root).exists() for placed in places for root in {p.root for p in placed.values()})


def test_port_base_puts_the_lab_where_asked_and_refuses_to_move_a_running_one(tmp_path: Path) -> None:
    clone = copy_repo(tmp_path / "repo")
    base = free_ports(1)[0]
    while not all(_free(port) for port in range(base, base + 4)):
        base = free_ports(1)[0]
    try:
        up = _edgeops(clone, "lab", "up", "lab", "--port-base", str(base))
        assert up.returncode == 0, up.stderr
        assert [line.split()[2] for line in up.stdout.splitlines() if line.startswith("up ")] == \
            [f"127.0.0.1:{port}" for port in range(base, base + 4)]
        again = _edgeops(clone, "lab", "up", "lab")  # the recorded placement stays: nothing moves, nothing restarts
        assert again.returncode == 0 and again.stdout == up.stdout, again.stderr
        moved = _edgeops(clone, "lab", "up", "lab", "--port-base", str(base + 10))
        assert moved.returncode != 0 and "lab down lab" in moved.stderr and "Traceback" not in moved.stderr
    finally:
        _edgeops(clone, "lab", "down", "--wipe")
    assert read_placement(clone, "lab") == {}


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
