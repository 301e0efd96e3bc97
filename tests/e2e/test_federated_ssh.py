"""Federated adaptation over 8 real sshd lab devices: the wearable CNN's head, trained at first on two of four
activities, learns the others from the devices' own samples (a non-IID Dirichlet α=0.5 split); every round
whose head is better is a release verified on every device; only update bytes leave a device; a device whose
labels are flipped is named and does not drag the model down under trimmed_mean."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgeops.adapt.artifact import head_tensors, load_tensors
from edgeops.adapt.rounds import adapt_deployment
from edgeops.cli import main
from edgeops.connections import Connections, ssh_connect
from edgeops.manifest.workspace import load_workspace
from edgeops.operations import apply_deployment
from edgeops.targets import target_devices
from labkit.artifacts import repo_at
from labkit.federated import central_accuracy, scenario, write_base_model, write_device_samples, write_manifest
from labkit.repo import copy_repo, share_build_cache, write_lab_fleet

pytestmark = [pytest.mark.ssh, pytest.mark.slow]
DEVICES = 8
PLAIN, ROBUST = "wearable-fedavg", "wearable-robust"
SETTINGS = ("    rounds: 4\n    local_epochs: 5\n    learning_rate: 0.05\n    clip_norm: 5.0\n"
            "    min_improvement: 0.5\n    devices_per_round: {fraction: 1.0, min_devices: 4}\n")
POISONED = 3  # lab-03 (index 2) holds the most samples of the split: flipping its labels hurts most


@pytest.fixture(scope="module")
def fed_lab(tmp_path_factory: pytest.TempPathFactory, hostile_home: Path):
    from edgeops.lab import lab_down, lab_up

    base = tmp_path_factory.mktemp("federated")
    root = copy_repo(base / "repo")
    share_build_cache(root)
    write_lab_fleet(root, DEVICES, base / "devices")
    model = root / "models" / "wearable_base.onnx"
    sha, _ = write_base_model(model)
    write_manifest(root, PLAIN, model, sha, SETTINGS.replace("rounds: 4", "rounds: 3")
                   + "    aggregation: fedavg\n    personalize: true\n")
    write_manifest(root, ROBUST, model, sha, SETTINGS + "    aggregation: trimmed_mean\n    trim_fraction: 0.25\n")
    ws = load_workspace(root)
    lab_up(ws, ws.fleets["lab"], target_devices(ws, PLAIN), login_home=hostile_home)
    try:
        split = scenario(model, DEVICES)
        for index, target in enumerate(target_devices(ws, PLAIN)):
            write_device_samples(Path(target.root), PLAIN, split.parts[index])
            write_device_samples(Path(target.root), ROBUST, split.parts[index], flip_labels=index + 1 == POISONED)
        yield root, model, split
    finally:
        lab_down(ws, ws.fleets["lab"])


class Recorder:
    """Every byte the devices send back over SSH while it records: agent answers (session and one-off
    commands) and file reads, by device."""

    def __init__(self) -> None:
        self.answers: list[tuple[str, str, str]] = []   # (device, request, answer)
        self.reads: list[tuple[str, str, int]] = []     # (device, path, bytes)

    def connect(self, target: Any) -> Any:
        transport = ssh_connect(target)
        recorder, device = self, target.name
        real_open, real_run, real_read = transport.open_session, transport.run, transport.read_bytes

        def open_session(argv: list[str]) -> Any:
            session = real_open(argv)
            real_call = session.call

            def call(request: str, *args: Any, **kwargs: Any) -> str:
                answer = real_call(request, *args, **kwargs)
                recorder.answers.append((device, request, answer))
                return answer
            session.call = call
            return session

        def run(argv: list[str], *args: Any, **kwargs: Any) -> Any:
            result = real_run(argv, *args, **kwargs)
            recorder.answers.append((device, json.dumps(argv[2:])[:200], result.stdout))
            return result

        def read_bytes(path: str) -> Any:
            data = real_read(path)
            recorder.reads.append((device, path, len(data or b"")))
            return data
        transport.open_session, transport.run, transport.read_bytes = open_session, run, read_bytes
        return transport


def _apply(root: Path, name: str) -> None:
    ws = load_workspace(root)
    with Connections() as connections:
        _, result = apply_deployment(repo_at(root, ws), ws.deployments[name], connections)
    assert result.ok, result.message


def _rounds(root: Path, name: str, connect: Any = ssh_connect) -> list[Any]:
    ws = load_workspace(root)
    with Connections(connect) as connections:
        return adapt_deployment(repo_at(root, ws), ws.deployments[name], connections)


def test_the_fleet_learns_the_head_within_a_point_of_central_training_and_only_updates_leave(fed_lab) -> None:
    root, model, split = fed_lab
    _apply(root, PLAIN)
    recorder = Recorder()
    results = _rounds(root, PLAIN, recorder.connect)
    central = central_accuracy(split, model, epochs=5, learning_rate=0.05)
    released = [r for r in results if r.outcome == "released"]
    assert released and all(r.outcome in ("released", "kept") for r in results), \
        [(r.message, r.summary.get("refused")) for r in results]
    best = max(r.summary["accuracy_after"] for r in released)
    assert best >= central - 1.0, (best, central, [r.message for r in results])
    assert released[0].summary["accuracy_released"] < central - 20  # the base head had something to learn

    ws = load_workspace(root)
    repo = repo_at(root, ws)
    for r in released:  # each released round went through verification on every device
        rollout = next(h for h in repo.ledger.history(PLAIN, 50) if h["number"] == r.summary["rollout"])
        assert rollout["outcome"] == "succeeded"
        verified = {e["device"] for e in rollout["devices"] if e["decision"] in ("Passed", "Inconclusive")}
        assert len(verified) == DEVICES, [(e["device"], e["decision"]) for e in rollout["devices"]]
    # what runs is the last released head, or the device's own where it kept one (personalize), committed
    last = released[-1].summary
    fleet_head = load_tensors(repo.cache, last["tensors_sha256"])
    for target in target_devices(ws, PLAIN):
        deployment = Path(target.root) / "deployments" / PLAIN
        state = json.loads((deployment / "state.json").read_text())
        assert state["status"] in ("committed", "inconclusive") and state["current"] == state["committed"]
        running = head_tensors(deployment / "current" / "model.onnx", split.head)
        wanted = load_tensors(repo.cache, last["personal"][target.name]) if target.name in last["personal"] \
            else fleet_head
        assert all(np.array_equal(running[k], wanted[k]) for k in wanted), target.name
    assert set(last["personal"]) <= set(last["used"]) and set(last["personal"]) == set(last["personal_reasons"])
    assert any(r.summary["personal"] for r in released)  # non-IID devices kept heads of their own at some point

    page = CliRunner().invoke(main, ["report", PLAIN, "--root", str(root)])
    assert page.exit_code == 0 and "Federated adaptation" in page.output and "federated rounds" in page.output
    history = CliRunner().invoke(main, ["history", PLAIN, "-o", "json", "--root", str(root)])
    kinds = [r["kind"] for r in json.loads(history.output)]
    assert kinds.count("adapt") == len(results) and kinds.count("apply") >= len(released) + 1

    # the audit: what came back from a device in a training step is its update and counts, nothing else
    head = split.head
    trained = [(d, json.loads(a)) for d, q, a in recorder.answers if '"adapt-train"' in q]
    used = sum(len(r.summary.get("used") or []) + len(r.summary.get("excluded") or {}) for r in results)
    assert used <= len(trained) <= DEVICES * len(results)
    for device, answer in trained:
        assert set(answer) <= {"schema", "agent_version", "ok", "release", "samples", "files", "norm", "clipped",
                               "validation", "update"}, answer.keys()
        assert set(answer["update"]) == {head.weight, head.bias}
        sizes = {name: len(base64.b64decode(value)) for name, value in answer["update"].items()}
        assert sizes == {head.weight: head.inputs * head.classes * 4, head.bias: head.classes * 4}
        assert set(answer["validation"]) == {"samples", "sent_accuracy", "trained_accuracy"}
    update_bytes = sum(len(a) for d, q, a in recorder.answers if '"adapt-train"' in q)
    samples_bytes = sum(p.size for p in split.parts) * 3 * 128 * 4
    assert update_bytes < samples_bytes / 20
    assert not [r for r in recorder.reads if "/data/" in r[1]]  # no file under data/ was read over SFTP
    for device, request, answer in recorder.answers:  # no other answer carries sample-sized payloads
        if '"adapt-train"' not in request:
            assert '"update"' not in answer


def test_a_device_with_flipped_labels_is_named_and_trimmed_mean_keeps_the_fleet_near_central(fed_lab) -> None:
    root, model, split = fed_lab
    _apply(root, ROBUST)
    results = _rounds(root, ROBUST)
    central = central_accuracy(split, model, epochs=5, learning_rate=0.05)
    poisoned = f"lab-{POISONED:02d}"
    named = [r for r in results if poisoned in (r.summary.get("excluded") or {})]
    assert named, [r.summary.get("excluded") for r in results]
    final = max(r.summary["accuracy_after"] for r in results if r.outcome == "released")
    assert final >= central - 1.0, (final, central, [r.message for r in results])
    released = [r for r in results if r.outcome == "released"]
    assert released
    for r in named:
        assert poisoned not in r.summary["used"]
