"""Aiming with label selectors over real sshd: plan, apply, status and rollback touch only what they pick."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgeops.cli import main
from edgeops.errors import ExitCode
from labkit.repo import edited, running_lab

pytestmark = pytest.mark.ssh
MANIFEST = "manifests/wearable.yaml"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, hostile_home: Path):
    with running_lab(tmp_path_factory.mktemp("selectors"), 3, hostile_home) as root:  # lab-01: ring=canary
        yield root


def cli(root: Path, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--root", str(root)])


def running(root: Path) -> dict[str, str | None]:
    rows = json.loads(cli(root, "status", MANIFEST, "-o", "json").stdout)[0]["devices"]
    return {row["device"]: row["release"] for row in rows}


def test_apply_with_a_selector_changes_only_the_devices_it_picks(lab: Path) -> None:
    plan = cli(lab, "plan", MANIFEST, "-l", "ring=main", "-o", "json")
    assert plan.exit_code == ExitCode.CHANGES, plan.output
    assert sorted(d["device"] for d in json.loads(plan.stdout)[0]["devices"]) == ["lab-02", "lab-03"]
    applied = cli(lab, "apply", MANIFEST, "--selector", "ring=canary")
    assert applied.exit_code == ExitCode.OK, applied.output
    now = running(lab)
    assert now["lab-01"] and now["lab-02"] is None and now["lab-03"] is None
    picked = json.loads(cli(lab, "status", MANIFEST, "-l", "ring in (canary)", "-o", "json").stdout)[0]["devices"]
    assert [row["device"] for row in picked] == ["lab-01"]
    row = picked[0]  # numbers in JSON, with where they came from
    assert row["p50_ms"] > 0 and row["energy"]["energy_per_inference_mj"] > 0
    assert (row["energy"]["source"], row["energy"]["boundary"]) == ("hwmon", "board")


def test_a_bad_selector_is_invalid_input_before_any_device_is_touched(lab: Path) -> None:
    before = running(lab)
    for command in (("plan", MANIFEST), ("apply", MANIFEST), ("status", MANIFEST), ("rollback", "wearable-activity")):
        result = cli(lab, *command, "-l", "ring>main")
        assert result.exit_code == ExitCode.INVALID and "--selector" in result.output, (command, result.output)
    assert running(lab) == before


def test_rollback_with_a_selector_leaves_the_other_devices_alone(lab: Path) -> None:
    assert cli(lab, "apply", MANIFEST).exit_code == ExitCode.OK
    on, released = running(lab), fleet_view(lab)["lab-02"][0]
    assert all(on.values())
    with edited((lab / "device_profiles" / "lab-cpu.yaml", "inter_op_num_threads: 1", "inter_op_num_threads: 2")):
        assert cli(lab, "apply", MANIFEST).exit_code == ExitCode.OK
        newer = running(lab)
        result = cli(lab, "rollback", "wearable-activity", "-l", "ring=main")
        assert result.exit_code == ExitCode.OK, result.output
        after = running(lab)
        assert after["lab-01"] == newer["lab-01"]  # not picked: still on the newer release
        assert after["lab-02"] == on["lab-02"] and after["lab-03"] == on["lab-03"]
        back = json.loads(cli(lab, "history", "wearable-activity", "-o", "json").stdout)[0]
        assert (back["kind"], back["release"]) == ("rollback", released)  # what the devices it moved run now


def fleet_view(root: Path) -> dict[str, tuple[str | None, str | None]]:
    rows = json.loads(cli(root, "status", MANIFEST, "-o", "json").stdout)[0]["devices"]
    return {row["device"]: (row["fleet_release"], row["release"]) for row in rows}


def test_one_id_names_the_fleet_wide_release_and_rollback_to_it_puts_each_device_on_its_own_copy(lab: Path) -> None:
    plan = json.loads(cli(lab, "plan", MANIFEST, "-o", "json").stdout)[0]
    assert cli(lab, "apply", MANIFEST).exit_code == ExitCode.OK
    first = fleet_view(lab)
    assert {fleet for fleet, _ in first.values()} == {plan["release"]} and plan["release"].startswith("rel-")
    assert len({own for _, own in first.values()}) == 3  # each runtime config names its device: three copies
    with edited((lab / "device_profiles" / "lab-cpu.yaml", "inter_op_num_threads: 1", "inter_op_num_threads: 2")):
        assert cli(lab, "apply", MANIFEST).exit_code == ExitCode.OK
        second = fleet_view(lab)
        assert len({fleet for fleet, _ in second.values()}) == 1 and second["lab-01"][0] != plan["release"]
        assert cli(lab, "rollback", "wearable-activity", "--to", "rel-000000").exit_code == ExitCode.INVALID
        result = cli(lab, "rollback", "wearable-activity", "--to", plan["release"][:9])  # a prefix will do
        assert result.exit_code == ExitCode.OK, result.output
        assert fleet_view(lab) == first
        history = json.loads(cli(lab, "history", "wearable-activity", "-o", "json").stdout)
        assert [(r["kind"], r["release"]) for r in history[:2]] == [
            ("rollback", plan["release"]), ("apply", second["lab-01"][0])]


def test_a_wave_named_by_a_selector_takes_every_device_it_picks(lab: Path) -> None:
    manifest, fleet = lab / MANIFEST, lab / "manifests" / "fleets" / "lab.yaml"
    assert fleet.read_text().count("ring: canary") == 1
    # two canaries now; and a change every device must take that does not slow it down (two intra-op threads
    # did, 1.8x: rolled back)
    with edited((fleet, "labels: {ring: main}", "labels: {ring: canary}"),
                (manifest, "waves: [1, 50%, 100%]", 'waves: [{selector: "ring=canary"}, 100%]'),
                (lab / "device_profiles" / "lab-cpu.yaml", "inter_op_num_threads: 1", "inter_op_num_threads: 3")):
        plan = json.loads(cli(lab, "plan", MANIFEST, "-o", "json").stdout)[0]
        waves = {d["device"]: d["wave"] for d in plan["devices"]}
        assert waves == {"lab-01": 1, "lab-02": 1, "lab-03": 2}, waves
        applied = cli(lab, "apply", MANIFEST, "-o", "json")
        assert applied.exit_code == ExitCode.OK, applied.output
        history = json.loads(cli(lab, "history", "wearable-activity", "-o", "json").stdout)[0]
        assert {e["device"]: e["wave"] for e in history["devices"]} == {"lab/lab-01": 1, "lab/lab-02": 1,
                                                                         "lab/lab-03": 2}
