"""Fewer round trips over real sshd: one agent session per device for a push, reads over SFTP alone.

The fast read must say exactly what the agent says, and hand over to the agent whenever only the
agent can know (a trial that may have expired, a switch to finish, facts too old).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeops.connections import ssh_connect
from edgeops.device import AgentFailed, Device, DeviceState
from edgeops.manifest.workspace import load_workspace
from edgeops.release import make_release
from edgeops.render import render_device
from edgeops.targets import TargetDevice, target_devices
from edgeops.types import DeviceStatus
from labkit.artifacts import build_for, lab_signed
from labkit.faults import deployment_dir, flip_byte

pytestmark = pytest.mark.ssh
DEPLOYMENT = "wearable-activity"


def _target(root: Path, index: int) -> TargetDevice:
    return target_devices(load_workspace(root), DEPLOYMENT)[index]


def _device(target: TargetDevice) -> Device:
    return Device(ssh_connect(target), target.root, target.python, DEPLOYMENT)


def _agent_read(device: Device, target: TargetDevice) -> DeviceState:
    return device.observe(target.power_sensor, verify=True)  # --verify always asks the agent


def _comparable(state: DeviceState) -> tuple[object, ...]:
    return (state.current, state.previous, state.releases, state.blobs, state.state, sorted(state.damaged),
            state.facts.python_version, state.facts.onnxruntime_version, state.facts.providers)


def _installed(root: Path, target: TargetDevice) -> Device:
    """A device with one committed release, installed through one agent session."""
    ws = load_workspace(root)
    doc = ws.deployments[DEPLOYMENT]
    artifact = build_for(ws, DEPLOYMENT, "cpu").artifact
    release = make_release(DEPLOYMENT, artifact, render_device(ws, doc, target, artifact.report["artifact"]))
    device = _device(target)
    with device.session():
        device.push(release)
        device.activate(release.id, signed=lab_signed(root, release))
        device.record({"status": DeviceStatus.COMMITTED}, release=release.id)
        device.keep_facts(target.power_sensor)  # as apply does after a commit: the next reads are file reads
    return device


def test_a_read_over_sftp_says_what_the_agent_says_and_runs_nothing_on_the_device(lab_repo: Path) -> None:
    target = _target(lab_repo, 0)
    device = _installed(lab_repo, target)
    by_agent = _agent_read(device, target)
    runs: list[list[str]] = []
    real_run = device.transport.run
    device.transport.run = lambda argv, **kw: runs.append(argv) or real_run(argv, **kw)  # type: ignore[method-assign]
    by_files = device.observe(target.power_sensor)
    assert runs == []  # no shell, no Python: SFTP only
    assert _comparable(by_files) == _comparable(by_agent) and not by_files.damaged
    assert by_files.free_bytes and abs(by_files.free_bytes - by_agent.free_bytes) < 50e6  # type: ignore[operator]


def test_a_modified_file_reads_as_damaged_as_the_agent_would_say(lab_repo: Path) -> None:
    target = _target(lab_repo, 1)
    device = _installed(lab_repo, target)
    _agent_read(device, target)
    flip_byte(target, DEPLOYMENT)  # at once: SFTP gives times to the second, and it may still be the install's
    by_files = device.observe(target.power_sensor)
    assert by_files.damaged == {by_files.current: ["model.onnx was modified after it was installed"]}
    by_agent = device.observe(target.power_sensor, verify=True)
    assert by_agent.damaged[by_agent.current][0].startswith("model.onnx")  # type: ignore[index]


@pytest.mark.parametrize("why", ["trial running", "facts too old", "link and state disagree"])
def test_the_agent_reads_whenever_only_it_can_know(lab_repo: Path, why: str) -> None:
    target = _target(lab_repo, 2)
    device = _installed(lab_repo, target)
    _agent_read(device, target)
    directory = deployment_dir(target, DEPLOYMENT)
    state_file, facts_file = directory / "state.json", Path(target.root) / "agent" / "facts.json"
    if why == "trial running":
        state = json.loads(state_file.read_text())
        state_file.write_text(json.dumps({**state, "trial": {"release": state["current"], "deadline": 1.0}}))
    elif why == "facts too old":
        kept = json.loads(facts_file.read_text())
        facts_file.write_text(json.dumps({**kept, "at": kept["at"] - 3600}))
    else:
        (directory / "current").unlink()
    runs: list[list[str]] = []
    real_run = device.transport.run
    device.transport.run = lambda argv, **kw: runs.append(argv) or real_run(argv, **kw)  # type: ignore[method-assign]
    facts_before = facts_file.read_bytes()
    found = device.observe(target.power_sensor)
    assert len(runs) == 1 and "state" in runs[0]  # the agent, which reports what was half done
    if why == "link and state disagree":  # reported, not finished: a read changes nothing
        assert found.half_done and not (directory / "current").is_symlink() and found.current is None
    assert facts_file.read_bytes() == facts_before


def test_one_session_runs_a_whole_push_in_one_agent_process(lab_repo: Path) -> None:
    target = _target(lab_repo, 3)
    device = _device(target)
    device.ensure_agent()
    runs: list[list[str]] = []
    real_run = device.transport.run
    device.transport.run = lambda argv, **kw: runs.append(argv) or real_run(argv, **kw)  # type: ignore[method-assign]
    ws = load_workspace(lab_repo)
    artifact = build_for(ws, DEPLOYMENT, "cpu").artifact
    release = make_release(DEPLOYMENT, artifact, render_device(ws, ws.deployments[DEPLOYMENT], target,
                                                                artifact.report["artifact"]))
    with device.session():
        device.push(release)
        device.activate(release.id, signed=lab_signed(lab_repo, release))
        measured = device.verify(release.id, None, runs=40, block=10, timeout=60)
        with pytest.raises(AgentFailed) as refused:  # a bad command is answered, and the session goes on
            device.agent("switch", "--root", target.root, "--deployment", DEPLOYMENT, "--nonsense")
        device.record({"status": DeviceStatus.COMMITTED}, release=release.id)
    assert runs == []  # prepare, assemble, switch, bench, record: all over the one session
    assert refused.value.kind == "usage"
    assert measured["a"]["latency"]["p95_ms"] > 0 and measured["peak_rss_mb"] > 0
    assert device.observe(target.power_sensor, verify=True).status == DeviceStatus.COMMITTED
