"""Randomized faults against the release lifecycle, over real sshd lab devices.

    python bench/faults.py [--faults 50] [--devices 3] [--seed 1]

Each round changes the runtime config (so there is a rollout to disturb), injects one fault
drawn at random, lets the devices settle (waiting out the trial window where the controller
was killed), then checks the invariants on every device:

- the active link points at the release state.json names, which is committed (or a trial
  whose timer is armed), whose files hash right, and which was never rejected;
- status tells the truth: a tampered device shows Damaged (a repointed link: Interrupted), every other one
  what it runs, and reading twice gives the same answer (reads change nothing);

then runs a plain `apply` and checks that it converges: every device Synced and Healthy,
every invariant holding. It prints counts per fault kind as a markdown table.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine, markdown_table  # noqa: E402

from edgeops.connections import Connections, ssh_connect  # noqa: E402
from edgeops.lab import lab_down, lab_up  # noqa: E402
from edgeops.manifest.workspace import load_workspace  # noqa: E402
from edgeops.operations import apply_deployment, status_rows  # noqa: E402
from edgeops.rollout import device_for  # noqa: E402
from edgeops.targets import target_devices  # noqa: E402
from labkit.artifacts import repo_at  # noqa: E402
from labkit.faults import (  # noqa: E402
    CutConnection,
    agent_command,
    damage_blob,
    delete_file,
    flip_byte,
    point_current_elsewhere,
)
from labkit.repo import copy_repo, make_hostile_home, write_lab_fleet  # noqa: E402

DEPLOYMENT = "wearable-activity"
TRIAL_WINDOW_S = 5
CUTS = {
    "cut before push": (agent_command("prepare"), False),
    "cut after assemble": (agent_command("assemble"), True),
    "cut after switch": (agent_command("switch", "activate"), True),
    "cut before verify": (agent_command("bench"), False),
    "cut after verify": (agent_command("bench"), True),
    "cut after commit": (agent_command("record", "committed"), True),
}
TAMPERS = {  # kind -> (fault, the health status must then show on that device; None: what it runs, truthfully)
    "flip a model byte": (flip_byte, "Damaged"), "delete runtime.json": (delete_file, "Damaged"),
    "damage a blob": (damage_blob, None),  # the running release is intact: Healthy is the truth
    "repoint current by hand": (point_current_elsewhere, "Interrupted"),  # a read reports it, never restores it
}
KILLS = {"SIGKILL the controller": signal.SIGKILL, "SIGINT the controller": signal.SIGINT}


def apply(root: Path, connect=ssh_connect):  # type: ignore[no-untyped-def]
    ws = load_workspace(root)
    with Connections(connect) as connections:
        return apply_deployment(repo_at(root, ws), ws.deployments[DEPLOYMENT], connections)[1]


def change_config(root: Path, round_number: int) -> None:
    profile = root / "device_profiles" / "lab-cpu.yaml"
    text = profile.read_text()
    line = next(x for x in text.splitlines() if "inter_op_num_threads" in x)
    profile.write_text(text.replace(line, f"    inter_op_num_threads: {1 + round_number % 3}"))


def violations(root: Path) -> list[str]:
    """Invariant violations on every device (empty: all hold). Reading finishes any half-done step."""
    ws = load_workspace(root)
    found = []
    with Connections() as connections:
        for target in target_devices(ws, DEPLOYMENT):
            state = device_for(target, connections, DEPLOYMENT).observe(verify=True)
            releases = state.state.get("releases") or {}
            directory = Path(target.root) / "deployments" / DEPLOYMENT
            link = os.readlink(directory / "current").split("/")[-1] if (directory / "current").is_symlink() else None
            if link != state.current:
                found.append(f"{target.name}: link {link} but state {state.current}")
            entry = releases.get(state.current or "", {})
            trial_armed = entry.get("state") == "trial" and (state.state.get("trial") or {}).get("release") == state.current
            if state.current and entry.get("state") != "committed" and not trial_armed:
                found.append(f"{target.name}: runs {state.current} in state {entry.get('state')} without a timer")
            if state.damaged:
                found.append(f"{target.name}: damaged {state.damaged}")
            if state.previous and releases.get(state.previous, {}).get("state") != "committed":
                found.append(f"{target.name}: previous {state.previous} is not committed")
    return found


def status_truthful(root: Path, damaged: str | None, health: str | None) -> bool:
    """Status shows ``health`` (Damaged, Interrupted) exactly on the device that was tampered with, and reading
    changes nothing: the same answer twice."""
    ws = load_workspace(root)
    with Connections() as connections:
        rows = status_rows(repo_at(root, ws), ws.deployments[DEPLOYMENT], connections, verify=True)
        again = status_rows(repo_at(root, ws), ws.deployments[DEPLOYMENT], connections, verify=True)
    same = [(r.device, r.health, r.release) for r in rows] == [(r.device, r.health, r.release) for r in again]
    marked = {"Damaged", "Interrupted"}
    return same and all((row.health == health) if row.device == damaged else row.health not in marked
                        for row in rows)


def one_round(root: Path, number: int, rng: random.Random) -> dict[str, object]:
    change_config(root, number)
    kind = rng.choice(sorted(CUTS) + sorted(TAMPERS) + sorted(KILLS))
    tampered, damaged, health = None, None, None
    if kind in CUTS:
        when, after = CUTS[kind]
        apply(root, CutConnection(when, after))
    elif kind in TAMPERS:
        assert apply(root).ok
        target = rng.choice(target_devices(load_workspace(root), DEPLOYMENT))
        fault, health = TAMPERS[kind]
        fault(target, DEPLOYMENT)
        tampered, damaged = target.name, (target.name if health else None)
    else:
        process = subprocess.Popen([sys.executable, "-m", "edgeops", "apply", "manifests/wearable.yaml", "--root",
                                    str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 4.0))
        process.send_signal(KILLS[kind])
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        time.sleep(TRIAL_WINDOW_S + 2.5)  # nobody calls the devices: their own timers act
    truthful = status_truthful(root, damaged, health)
    before = [] if tampered else violations(root)
    converged = apply(root).ok
    after = violations(root)
    return {"kind": kind, "violations_after_fault": len(before), "truthful": truthful, "converged": converged,
            "violations_after_apply": len(after), "details": before + after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=50)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_repo(Path(tmp) / "repo")
        write_lab_fleet(root, args.devices, Path(tmp) / "devices")
        profile = root / "device_profiles" / "lab-cpu.yaml"
        profile.write_text(profile.read_text().replace(
            "    keep_releases: 3", f"    keep_releases: 3\n    trial_window_s: {TRIAL_WINDOW_S}"))
        home = make_hostile_home(Path(tmp) / "home")
        ws = load_workspace(root)
        lab_up(ws, ws.fleets["lab"], target_devices(ws, DEPLOYMENT), login_home=home)
        results = []
        try:
            assert apply(root).ok
            for number in range(args.faults):
                started = time.perf_counter()
                result = one_round(root, number, rng)
                results.append(result)
                print(f"{number + 1:3d} {result['kind']:<26} converged={result['converged']} "
                      f"violations={result['violations_after_fault']}/{result['violations_after_apply']} "
                      f"{time.perf_counter() - started:.1f} s {result['details'] or ''}", file=sys.stderr)
        finally:
            lab_down(ws, ws.fleets["lab"])
    kinds = Counter(r["kind"] for r in results)
    rows = []
    for kind in sorted(kinds):
        mine = [r for r in results if r["kind"] == kind]
        rows.append([kind, str(len(mine)), str(sum(r["violations_after_fault"] > 0 for r in mine)),
                     str(sum(bool(r["truthful"]) for r in mine)), str(sum(bool(r["converged"]) for r in mine)),
                     str(sum(r["violations_after_apply"] > 0 for r in mine))])
    rows.append(["**all**", str(len(results)), str(sum(r["violations_after_fault"] > 0 for r in results)),
                 str(sum(bool(r["truthful"]) for r in results)), str(sum(bool(r["converged"]) for r in results)),
                 str(sum(r["violations_after_apply"] > 0 for r in results))])
    print(machine() + f"; {args.devices} devices, seed {args.seed}, trial window {TRIAL_WINDOW_S} s\n")
    print(markdown_table(["fault", "rounds", "rounds with a device off the invariants after the fault",
                          "status truthful", "re-apply converged", "rounds with a device off after re-apply"], rows))


if __name__ == "__main__":
    main()
