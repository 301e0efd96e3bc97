"""Deciding on the device, over real sshd: an auto build's finalists go to one device of each hardware class as
releases (never switched to), are measured there side by side, and each class rolls out what its own device
measured best; the decision, with every figure, is in the plan, the ledger and `edgeops decide`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.decide import DECIDE, choose
from edgeops.errors import ExitCode
from edgeops.manifest.workspace import load_workspace
from edgeops.targets import target_devices
from labkit.artifacts import repo_at
from labkit.decide import DECIDE_DEPLOYMENT, write_two_class_repo
from labkit.repo import copy_repo, share_build_cache

pytestmark = pytest.mark.ssh
NAME = DECIDE_DEPLOYMENT
MANIFEST = f"manifests/{NAME}.yaml"


@pytest.fixture(scope="module")
def decide_lab(tmp_path_factory: pytest.TempPathFactory, hostile_home: Path):
    from edgeops.lab import lab_down, lab_up

    base = tmp_path_factory.mktemp("decide")
    root = copy_repo(base / "repo")
    share_build_cache(root)
    write_two_class_repo(root, base / "devices")
    ws = load_workspace(root)
    lab_up(ws, ws.fleets["lab"], target_devices(ws, NAME), login_home=hostile_home)
    try:
        yield root
    finally:
        lab_down(ws, ws.fleets["lab"])


def cli(root: Path, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, [*args, "--root", str(root)])


def _decisions(root: Path) -> list[dict]:  # type: ignore[type-arg]
    ws = load_workspace(root)
    return repo_at(root, ws).ledger.summaries(NAME, DECIDE)


def test_each_hardware_class_runs_what_its_own_device_measured_best(decide_lab: Path) -> None:
    plan = cli(decide_lab, "plan", MANIFEST)
    assert plan.exit_code in (ExitCode.OK, ExitCode.CHANGES), plan.output
    assert "no decision yet for lab-x86, lab-x86-2t" in plan.output and "host's choice" in plan.output
    assert _decisions(decide_lab) == []  # a plan reads: it measured nothing on the devices

    applied = cli(decide_lab, "apply", MANIFEST, "-o", "json")
    assert applied.exit_code == ExitCode.OK, applied.output
    records = _decisions(decide_lab)
    assert len(records) == 1 and records[0]["outcome"] == "decided", records
    classes = records[0]["summary"]["classes"]
    assert set(classes) == {"lab-x86", "lab-x86-2t"}
    devices = {"lab-x86": "lab/lab-01", "lab-x86-2t": "lab/lab-02"}
    rows = {r["device"]: r for r in json.loads(cli(decide_lab, "status", MANIFEST, "-o", "json").stdout)[0]["devices"]}
    for hardware_class, decision in classes.items():
        assert decision["device"] == devices[hardware_class]
        figures = decision["candidates"]
        assert len(figures) == 3 and figures[-1]["label"] == "original"  # two finalists and the input
        assert all(f["p50_ms"] > 0 and f["size_bytes"] > 0 for f in figures)
        # the invariant, whatever the timings were: the choice is the rule applied to this device's own figures
        assert choose(figures, "latency", None)[0] == decision["label"]
        chosen = next(f for f in figures if f["label"] == decision["label"])
        name = devices[hardware_class].split("/")[1]
        assert rows[name]["release"] == chosen["release"], (hardware_class, rows[name], chosen)
        assert (rows[name]["sync"], rows[name]["health"]) == ("Synced", "Healthy")

    plan = cli(decide_lab, "plan", MANIFEST)
    assert plan.exit_code == ExitCode.OK, plan.output  # nothing to change
    for hardware_class, decision in classes.items():
        assert f"{hardware_class}: runs the {decision['label']} finalist, decided on {decision['device']}" in plan.output
    page = cli(decide_lab, "report", NAME, "--rollout", "1")  # the decide record, as the report shows it
    assert page.exit_code == ExitCode.OK and "(decide)" in page.stdout and "device p50 ms" in page.stdout
    page = cli(decide_lab, "report", NAME, "--rollout", "2")  # the apply: its build, and what each class chose
    assert page.exit_code == ExitCode.OK and "(apply)" in page.stdout and "Decided on the device" in page.stdout
    assert all(f"<td>{c}</td><td>{d['device']}</td><td>{d['label']}</td>" in page.stdout for c, d in classes.items())
    built = cli(decide_lab, "build", MANIFEST)
    assert built.exit_code == ExitCode.OK, built.output
    assert "decide_on: device: finalists" in built.output and "original (1.09 MB" in built.output
    for hardware_class, decision in classes.items():
        assert f"{hardware_class}: {decision['label']}, decided on {decision['device']}" in built.output
    again = cli(decide_lab, "apply", MANIFEST, "-o", "json")
    assert again.exit_code == ExitCode.OK and json.loads(again.stdout)[0]["outcome"] == "no-op", again.output
    assert len(_decisions(decide_lab)) == 1  # decided once for this build

    # measured again on demand: a new record, the same rule, and the devices untouched until the next apply
    before = {n: r["release"] for n, r in rows.items()}
    decided = cli(decide_lab, "decide", NAME, "-o", "json")
    assert decided.exit_code == ExitCode.OK, decided.output
    table = json.loads(decided.stdout)
    assert {c: choose(d["candidates"], "latency", None, classes[c]["label"])[0] for c, d in table.items()} == \
        {c: d["label"] for c, d in table.items()}  # measuring again keeps the standing pick among equals
    assert len(_decisions(decide_lab)) == 2
    rows = {r["device"]: r for r in json.loads(cli(decide_lab, "status", MANIFEST, "-o", "json").stdout)[0]["devices"]}
    assert {n: r["release"] for n, r in rows.items()} == before


def test_a_class_with_no_device_to_measure_keeps_the_hosts_choice_and_says_so(decide_lab: Path) -> None:
    """A hardware class whose only device cannot be reached: `edgeops decide` measures the others, names it,
    and exits 1; its devices would run the host's choice (nothing was decided for it)."""
    from labkit.repo import free_ports

    profiles, fleet = decide_lab / "device_profiles", decide_lab / "manifests" / "fleets" / "lab.yaml"
    (profiles / "lab-cpu-away.yaml").write_text((profiles / "lab-cpu.yaml").read_text()
                                                .replace("name: lab-cpu", "name: lab-cpu-away")
                                                .replace("hardware_class: lab-x86", "hardware_class: lab-x86-away"))
    original = fleet.read_text()
    fleet.write_text(original + f"    - {{name: lab-away, host: 127.0.0.1, port: {free_ports(1)[0]}, "
                                f"root: {decide_lab.parent / 'devices' / 'lab-away'}, profile: lab-cpu-away}}\n")
    try:
        decided = cli(decide_lab, "decide", NAME, "-o", "json")
        assert decided.exit_code == ExitCode.FAILED, decided.output
        table = json.loads(decided.stdout)
        assert "lab-x86-away" in table, decided.output
        away = table["lab-x86-away"]
        assert away["label"] is None and away["candidates"] == []
        assert "lab/lab-away" in away["why"] and "the host's choice stands" in away["why"]
        assert table["lab-x86"]["label"] and table["lab-x86-2t"]["label"]  # the reachable classes measured
    finally:
        fleet.write_text(original)
        (profiles / "lab-cpu-away.yaml").unlink()
