"""Randomized faults against the release lifecycle, over real sshd lab devices and real pull devices.

    python bench/faults.py [--faults 100] [--devices 3] [--seed 1]

Each round changes the runtime config (so there is a rollout to disturb), injects one fault
drawn at random, lets the devices settle (waiting out the trial window where the controller
was killed), then checks the invariants on every device:

- the active link points at the release state.json names, which is committed (or a trial
  whose timer is armed), whose files hash right, and which was never rejected;
- status tells the truth: a tampered device shows Damaged (a repointed link: Interrupted), every other one
  what it runs (a pull device: the release its directory holds);
- reads change nothing: every byte under every device root is hashed before and after two
  `status --verify` and a `plan`;
- no traceback and no unnamed error: a fault ends in a result, never an exception;

then runs a plain `apply` and checks that it converges: every device Synced and Healthy,
every invariant holding. It prints counts per fault kind as a markdown table.

Faults: a connection cut before or after each agent step; an EOF at a random byte of the SSH
handshake, or a reset later in a session (a TCP relay in front of one device); tampering; the
controller killed (SIGKILL, SIGINT); the fleets' lock taken from a running apply while a second
controller waits; and on a pull fleet (mosquitto, docker-registry, agent daemons) the broker killed
mid-rollout, or a device's daemon stopped mid-rollout, each brought back seconds later.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine, markdown_table  # noqa: E402

from edgeops.connections import Connections, ssh_connect  # noqa: E402
from edgeops.device import Device  # noqa: E402
from edgeops.lab import lab_down, lab_up, process_alive  # noqa: E402
from edgeops.labpull import pull_lab_down, pull_lab_up, stop_daemon  # noqa: E402
from edgeops.manifest.workspace import load_workspace  # noqa: E402
from edgeops.operations import apply_deployment, plan_deployment, status_rows  # noqa: E402
from edgeops.pull.fleet import is_pull  # noqa: E402
from edgeops.rollout import device_for  # noqa: E402
from edgeops.targets import fleet_targets, target_devices  # noqa: E402
from edgeops.transport.local import LocalTransport  # noqa: E402
from edgeops.types import Decision  # noqa: E402
from labkit.artifacts import repo_at  # noqa: E402
from labkit.faults import (  # noqa: E402
    CutConnection,
    agent_command,
    damage_blob,
    delete_file,
    flip_byte,
    point_current_elsewhere,
)
from labkit.relay import Relay, relay_in_front  # noqa: E402
from labkit.repo import PULL_DEPLOYMENT, copy_repo, make_hostile_home, write_lab_fleet, write_pull_fleet  # noqa: E402

DEPLOYMENT = "wearable-activity"
TRIAL_WINDOW_S = 5
PULL_TRIAL_WINDOW_S = 30
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
WIRE = {"EOF in the SSH handshake": (1, 1500), "reset later in a session": (3000, 60000)}  # cut after N bytes
LOCKS = {"lock taken from a running apply"}
PULL = {"broker killed mid-rollout", "pull daemon stopped mid-rollout"}


def apply(root: Path, connect=ssh_connect, deployment: str = DEPLOYMENT):  # type: ignore[no-untyped-def]
    ws = load_workspace(root)
    with Connections(connect) as connections:
        return apply_deployment(repo_at(root, ws), ws.deployments[deployment], connections)[1]


def change_config(root: Path, profile_name: str = "lab-cpu") -> None:
    profile = root / "device_profiles" / f"{profile_name}.yaml"
    text = profile.read_text()
    line = next(x for x in text.splitlines() if "inter_op_num_threads" in x)
    now = int(line.split(":")[1])
    profile.write_text(text.replace(line, f"    inter_op_num_threads: {now % 3 + 1}"))  # always another value


def local_device(target, deployment: str) -> Device:  # type: ignore[no-untyped-def]
    """A device read straight from its directory (every lab device's root is on this machine)."""
    return Device(LocalTransport(target.name), target.root, target.python, deployment)


def violations(root: Path, deployment: str = DEPLOYMENT) -> list[str]:
    """Invariant violations on every device of ``deployment`` (empty: all hold)."""
    ws = load_workspace(root)
    found = []
    with Connections() as connections:
        for target in target_devices(ws, deployment):
            device = local_device(target, deployment) if is_pull(target) else \
                device_for(target, connections, deployment)
            state = device.observe(verify=True)
            releases = state.state.get("releases") or {}
            directory = Path(target.root) / "deployments" / deployment
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


def status_truthful(root: Path, damaged: str | None, health: str | None, deployment: str = DEPLOYMENT) -> bool:
    """Status shows ``health`` (Damaged, Interrupted) exactly on the device that was tampered with, every device
    with the release its own directory says runs, and reading twice gives the same answer."""
    ws = load_workspace(root)
    doc = ws.deployments[deployment]
    with Connections() as connections:
        rows = status_rows(repo_at(root, ws), doc, connections, verify=True)
        again = status_rows(repo_at(root, ws), doc, connections, verify=True)
    same = [(r.device, r.health, r.release) for r in rows] == [(r.device, r.health, r.release) for r in again]
    runs = {t.name: local_device(t, deployment).observe().current for t in target_devices(ws, deployment)}
    marked = {"Damaged", "Interrupted"}
    return same and all(row.release == runs[row.device] and
                        ((row.health == health) if row.device == damaged else row.health not in marked)
                        for row in rows)


def tree_digest(roots: list[Path]) -> str:
    """Every byte and name under the device roots (what a read must leave exactly as it found)."""
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*")):
            digest.update(str(path).encode())
            if path.is_symlink():
                digest.update(os.readlink(path).encode())
            elif path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def reads_change_nothing(root: Path, deployments: list[str]) -> bool:
    ws = load_workspace(root)
    roots = sorted({Path(t.root) for name in deployments for t in target_devices(ws, name)})
    before = tree_digest(roots)
    with Connections() as connections:
        for name in deployments:
            status_rows(repo_at(root, ws), ws.deployments[name], connections, verify=True)
            plan_deployment(repo_at(root, ws), ws.deployments[name], connections)
    return tree_digest(roots) == before


def settle_pull(root: Path) -> None:
    """Wait until no pull device runs a trial (a trial the rollout gave up reverts when its window ends)."""
    ws = load_workspace(root)
    deadline = time.monotonic() + PULL_TRIAL_WINDOW_S + 20
    while time.monotonic() < deadline:
        states = [local_device(t, PULL_DEPLOYMENT).observe() for t in target_devices(ws, PULL_DEPLOYMENT)]
        if all(s.status != "verifying" and not s.state.get("trial") for s in states):
            return
        time.sleep(1)


def controller(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "edgeops", "apply", "manifests/wearable.yaml", "--root",
                             str(root), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return process.returncode, err


def take_the_lock(root: Path, rng: random.Random) -> tuple[bool, str]:
    """A running apply loses its lock (its rows deleted, as an operator's forced unlock or an expiry would)
    while a second controller waits for it: both end with a named outcome (exit 0, 1 or 5), no traceback."""
    first = controller(root)
    time.sleep(rng.uniform(0.5, 5.0))
    second = controller(root, "--lock-timeout", "5m")
    time.sleep(0.3)
    with sqlite3.connect(root / ".edgeops" / "ledger.sqlite") as db:
        db.execute("DELETE FROM locks")
    codes, errors = zip(finished(first), finished(second))
    named = all(code in (0, 1, 5) for code in codes) and not any("Traceback" in e for e in errors)
    fenced = sum(e.count("fenced") + e.count("lock on fleet") for e in errors)
    return named, f"exit codes {codes}, {fenced} fenced/lock-lost message(s)"


def pull_fault(root: Path, kind: str, rng: random.Random) -> tuple[bool, str]:
    """A pull rollout with the broker killed, or one device's daemon stopped, a random moment in; both come back
    seconds later. The apply must end with a result, and the devices settle without a mixed fleet."""
    change_config(root, "lab-pull")
    ws = load_workspace(root)
    fleet = ws.fleets["lab-pull"]
    targets = fleet_targets(ws, fleet)
    state = root / ".edgeops" / "lab" / "lab-pull"
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = apply(root, deployment=PULL_DEPLOYMENT)
        except Exception:  # noqa: BLE001 - the bench counts it: a fault must end in a result
            outcome["error"] = traceback.format_exc()

    applying = threading.Thread(target=run)
    applying.start()
    time.sleep(rng.uniform(0.5, 8.0))
    if kind == "broker killed mid-rollout":
        pid = int((state / "broker" / "pid").read_text())
        os.kill(pid, signal.SIGKILL)
        while process_alive(pid):
            time.sleep(0.05)
        time.sleep(rng.uniform(1.0, 6.0))
        pull_lab_up(ws, fleet, targets)
    else:
        target = rng.choice(targets)
        stop_daemon(state / target.name, target)
        time.sleep(rng.uniform(1.0, 6.0))
        pull_lab_up(ws, fleet, targets)  # its daemon again; returns once it is online
    applying.join(900)
    settle_pull(root)
    result = outcome.get("result")
    detail = str(outcome.get("error") or (f"{result.outcome}: " + ", ".join(  # type: ignore[attr-defined]
        f"{d.key.split('/')[1]} {d.decision}" for d in result.devices)))  # type: ignore[attr-defined]
    return result is not None, detail


def one_round(root: Path, number: int, rng: random.Random, relay: Relay) -> dict[str, object]:
    change_config(root)
    kind = rng.choice(sorted(CUTS) + sorted(TAMPERS) + sorted(KILLS) + sorted(WIRE) + sorted(LOCKS) + sorted(PULL))
    tampered, damaged, health, named, detail = None, None, None, True, ""
    deployment = PULL_DEPLOYMENT if kind in PULL else DEPLOYMENT
    if kind in CUTS:
        when, after = CUTS[kind]
        apply(root, CutConnection(when, after))
    elif kind in TAMPERS:
        assert apply(root).ok
        target = rng.choice(target_devices(load_workspace(root), DEPLOYMENT))
        fault, health = TAMPERS[kind]
        fault(target, DEPLOYMENT)
        tampered, damaged = target.name, (target.name if health else None)
    elif kind in WIRE:
        relay.cut_after = rng.randint(*WIRE[kind])
        try:
            result = apply(root)  # an exception here is the failure this round looks for
        except Exception:  # noqa: BLE001
            named, detail = False, traceback.format_exc()
        else:
            relayed = next(d for d in result.devices if d.key.endswith("-01"))
            detail = f"{result.outcome}; the cut device: {relayed.decision} ({relayed.reason[:90]})"
            named = relayed.decision != Decision.FAILED or "Socket" not in relayed.reason
        finally:
            relay.cut_after = None
    elif kind in LOCKS:
        named, detail = take_the_lock(root, rng)
        time.sleep(TRIAL_WINDOW_S + 2.5)  # a step refused half way: the device's own timer acts
    elif kind in PULL:
        named, detail = pull_fault(root, kind, rng)
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
    truthful = status_truthful(root, damaged, health, deployment)
    for _ in range(10 if kind in PULL and not truthful else 0):  # a pull device's report is retained: after a
        time.sleep(1)                                             # broker restart it says it again on reconnect
        truthful = status_truthful(root, damaged, health, deployment)
    quiet = reads_change_nothing(root, [deployment])
    before = [] if tampered else violations(root, deployment)
    converged = apply(root, deployment=deployment).ok
    after = violations(root, deployment)
    return {"kind": kind, "violations_after_fault": len(before), "truthful": truthful, "converged": converged,
            "violations_after_apply": len(after), "details": before + after, "named": named, "quiet": quiet,
            "detail": detail}


def add_pull_fleet(root: Path, devices: Path) -> None:
    write_pull_fleet(root, 2, devices, report_deadline_s=60)
    wearable = (root / "manifests" / "wearable.yaml").read_text()
    (root / "manifests" / f"{PULL_DEPLOYMENT}.yaml").write_text(
        wearable.replace("name: wearable-activity", f"name: {PULL_DEPLOYMENT}").replace("- fleet: lab\n",
                                                                                        "- fleet: lab-pull\n"))
    profile = root / "device_profiles" / "lab-pull.yaml"
    profile.write_text(profile.read_text().replace("trial_window_s: 300", f"trial_window_s: {PULL_TRIAL_WINDOW_S}"))


COLUMNS = ["fault", "rounds", "rounds with a device off the invariants after the fault", "status truthful",
           "reads changed no byte", "named outcome, no traceback", "re-apply converged",
           "rounds with a device off after re-apply"]


def summary_row(kind: str, mine: list[dict[str, object]]) -> list[str]:
    return [kind, str(len(mine)), str(sum(int(r["violations_after_fault"]) > 0 for r in mine)),  # type: ignore[call-overload]
            str(sum(bool(r["truthful"]) for r in mine)), str(sum(bool(r["quiet"]) for r in mine)),
            str(sum(bool(r["named"]) for r in mine)), str(sum(bool(r["converged"]) for r in mine)),
            str(sum(int(r["violations_after_apply"]) > 0 for r in mine))]  # type: ignore[call-overload]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=100)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_repo(Path(tmp) / "repo")
        write_lab_fleet(root, args.devices, Path(tmp) / "devices")
        add_pull_fleet(root, Path(tmp) / "pull-devices")
        profile = root / "device_profiles" / "lab-cpu.yaml"
        profile.write_text(profile.read_text().replace(
            "    keep_releases: 3", f"    keep_releases: 3\n    trial_window_s: {TRIAL_WINDOW_S}"))
        home = make_hostile_home(Path(tmp) / "home")
        ws = load_workspace(root)
        lab_up(ws, ws.fleets["lab"], target_devices(ws, DEPLOYMENT), login_home=home)
        pull_lab_up(ws, ws.fleets["lab-pull"], fleet_targets(ws, ws.fleets["lab-pull"]))
        relay = relay_in_front(root, "lab-01")
        results = []
        try:
            assert apply(root).ok and apply(root, deployment=PULL_DEPLOYMENT).ok
            for number in range(args.faults):
                started = time.perf_counter()
                result = one_round(root, number, rng, relay)
                results.append(result)
                print(f"{number + 1:3d} {result['kind']:<32} converged={result['converged']} "
                      f"violations={result['violations_after_fault']}/{result['violations_after_apply']} "
                      f"truthful={result['truthful']} quiet={result['quiet']} named={result['named']} "
                      f"{time.perf_counter() - started:.1f} s {result['details'] or ''} {result['detail']}",
                      file=sys.stderr)
        finally:
            relay.close()
            ws = load_workspace(root)
            pull_lab_down(ws, ws.fleets["lab-pull"], fleet_targets(ws, ws.fleets["lab-pull"]))
            lab_down(ws, ws.fleets["lab"])
    kinds = Counter(r["kind"] for r in results)
    rows = [summary_row(str(kind), [r for r in results if r["kind"] == kind]) for kind in sorted(kinds)]
    rows.append(summary_row("**all**", results))
    print(machine() + f"; {args.devices} SSH devices (one behind a cutting relay) and 2 pull devices, seed "
          f"{args.seed}, trial window {TRIAL_WINDOW_S} s (pull {PULL_TRIAL_WINDOW_S} s)\n")
    print(markdown_table(COLUMNS, rows))


if __name__ == "__main__":
    main()
