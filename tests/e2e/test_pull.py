"""Pull mode over the real thing: Debian's mosquitto and docker-registry, one agent daemon per lab device.

The devices accept no connection: each daemon follows its retained desired state, fetches the release's
blobs by digest from the registry, and runs the lifecycle and the gate itself.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner, Result
from paho.mqtt.enums import CallbackAPIVersion

from edgeops.cli import main
from edgeops.errors import ExitCode
from edgeops.lab import process_alive
from edgeops.labpull import lab_certificates, pull_lab_up, start_daemon, stop_daemon
from edgeops.manifest.workspace import load_workspace
from edgeops.targets import fleet_targets
from labkit.repo import PULL_DEPLOYMENT, edited, running_pull_lab

pytestmark = pytest.mark.pull
MANIFEST = f"manifests/{PULL_DEPLOYMENT}.yaml"
PROFILE = "device_profiles/lab-pull.yaml"
FLEET = "manifests/fleets/lab-pull.yaml"


@pytest.fixture(scope="module")
def running_lab(tmp_path_factory: pytest.TempPathFactory):
    with running_pull_lab(tmp_path_factory.mktemp("pull"), 3, report_deadline_s=10) as root:
        yield root


@pytest.fixture
def lab(running_lab: Path) -> Path:
    """The module's lab with its broker, registry and every daemon running (a test that failed with a device
    offline must not fail the ones after it)."""
    ws = load_workspace(running_lab)
    fleet = ws.fleets["lab-pull"]
    pull_lab_up(ws, fleet, fleet_targets(ws, fleet))
    return running_lab


def cli(root: Path, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--root", str(root)])


def devices(root: Path) -> dict[str, dict[str, Any]]:
    result = cli(root, "status", MANIFEST, "-o", "json")
    return {row["device"]: row for row in json.loads(result.stdout)[0]["devices"]}


# Three daemons measure at once on the test host's few cores: an A/B between two equally fast releases may end
# Inconclusive, which keeps the new release just as Passed does.
KEPT = {"Passed", "Inconclusive"}


def eventually(check: Callable[[], Any], timeout_s: float = 90) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def target(root: Path, name: str):  # noqa: ANN201
    ws = load_workspace(root)
    fleet = ws.fleets["lab-pull"]
    return next(t for t in fleet_targets(ws, fleet) if t.name == name), ws.root / ".edgeops" / "lab" / "lab-pull" / name


def offline(root: Path, name: str) -> None:
    device, state = target(root, name)
    assert stop_daemon(state, device)


def online(root: Path, name: str) -> None:
    device, state = target(root, name)
    start_daemon(device, state)


def controller_client(root: Path) -> mqtt.Client:
    """A client holding the controller's broker password, connected, its loop running (stop it: loop_stop)."""
    ws = load_workspace(root)
    settings = ws.fleets["lab-pull"].obj.spec.pull
    password = (ws.secrets_dir / "lab" / "lab-pull" / "controller.password").read_text().strip()
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.username_pw_set(settings.username, password)
    client.connect("127.0.0.1", int(settings.broker.rsplit(":", 1)[1]))
    client.loop_start()
    return client


def watch_status(root: Path, name: str, seen: Callable[[dict[str, Any]], None]) -> mqtt.Client:
    """A controller-side client that calls ``seen`` with each status ``name`` publishes (stop it: loop_stop)."""
    client = controller_client(root)
    client.on_message = lambda c, u, m: seen(json.loads(m.payload)) if m.payload else None
    client.subscribe(f"edgeops/lab-pull/{name}/{PULL_DEPLOYMENT}/status", qos=1)
    return client


def last_status(root: Path, name: str, deployment: str = PULL_DEPLOYMENT) -> dict[str, Any]:
    """The retained status message as the device published it (read over the broker as the controller)."""
    got: dict[str, Any] = {}
    client = controller_client(root)
    client.on_message = lambda c, u, m: got.update(json.loads(m.payload)) if m.payload else None
    client.subscribe(f"edgeops/lab-pull/{name}/{deployment}/status", qos=1)
    eventually(lambda: got, 5)
    client.loop_stop()
    client.disconnect()
    return got


def publish_as_controller(root: Path, name: str, document: dict[str, Any]) -> None:
    """What a holder of the controller's broker password can do: publish any desired state for a device."""
    client = controller_client(root)
    client.publish(f"edgeops/lab-pull/{name}/{PULL_DEPLOYMENT}/desired", json.dumps(document), qos=1,
                   retain=True).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def ask_to_train_as_controller(root: Path, name: str, deployment: str, request: dict[str, Any]) -> dict[str, Any]:
    """What a holder of the controller's broker password can ask: a training request; the device's answer."""
    answers: list[dict[str, Any]] = []
    subscribed: list[int] = []
    client = controller_client(root)
    client.on_message = lambda c, u, m: answers.append(json.loads(m.payload))
    client.on_subscribe = lambda c, u, mid, codes, props: subscribed.append(mid)
    client.subscribe(f"edgeops/lab-pull/{name}/{deployment}/update", qos=1)
    eventually(lambda: subscribed, 5)
    try:
        client.publish(f"edgeops/lab-pull/{name}/{deployment}/train", json.dumps(request), qos=1).wait_for_publish(5)
        return eventually(lambda: next((a for a in answers if a.get("round") == request["round"]), None), 60)
    finally:
        client.loop_stop()
        client.disconnect()


def test_pull_devices_fetch_verify_and_commit_with_no_inbound_connection(lab: Path) -> None:
    planned = json.loads(cli(lab, "plan", MANIFEST, "-o", "json").stdout)[0]
    applied = cli(lab, "apply", MANIFEST, "-o", "json")
    assert applied.exit_code == ExitCode.OK, applied.output
    outcome = json.loads(applied.stdout)[0]
    assert {d["decision"] for d in outcome["devices"]} <= KEPT, outcome
    # bytes moved: what each device downloaded (every device fetches its own copy), as the plan predicted
    assert {d["key"]: d["bytes_moved"] for d in outcome["devices"]} == \
        {d["key"]: d["bytes_to_move"] for d in planned["devices"]}
    assert all(d["bytes_moved"] > 0 for d in outcome["devices"])
    rows = devices(lab)
    assert {r["sync"] for r in rows.values()} == {"Synced"} and {r["health"] for r in rows.values()} == {"Healthy"}
    assert len({r["fleet_release"] for r in rows.values()}) == 1
    # the devices' own numbers, from their own gate: measured on the device, with the sensor's boundary
    assert all(r["p50_ms"] > 0 and r["energy"]["boundary"] == "board" for r in rows.values())
    again = cli(lab, "apply", MANIFEST, "-o", "json")
    assert again.exit_code == ExitCode.OK and json.loads(again.stdout)[0]["outcome"] == "no-op", again.output


def test_a_device_may_read_only_its_own_desired_state(lab: Path) -> None:
    ws = load_workspace(lab)
    settings = ws.fleets["lab-pull"].obj.spec.pull
    shown = cli(lab, "lab", "status", "lab-pull").stdout.splitlines()  # the broker and registry it started, too
    assert any(line.startswith(f"lab-pull/broker  {settings.broker}  running (pid ") for line in shown), shown
    assert any(line.startswith(f"lab-pull/registry  {settings.registry}  running (pid ") for line in shown), shown
    config = json.loads((Path(target(lab, "pull-01")[0].root) / "agent" / "pull.json").read_text())
    got: list[str] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.username_pw_set(config["username"], config["password"])
    client.on_message = lambda c, u, m: got.append(m.topic)
    client.connect("127.0.0.1", int(settings.broker.rsplit(":", 1)[1]))
    client.loop_start()
    client.subscribe([(f"edgeops/lab-pull/pull-02/{PULL_DEPLOYMENT}/desired", 1),
                      (f"edgeops/lab-pull/pull-01/{PULL_DEPLOYMENT}/desired", 1)])
    eventually(lambda: got, 5)
    time.sleep(1)  # the neighbour's retained desired state would have arrived with its own
    client.loop_stop()
    client.disconnect()
    assert got == [f"edgeops/lab-pull/pull-01/{PULL_DEPLOYMENT}/desired"], got  # the broker's ACL held back pull-02's


def test_rollback_goes_over_the_broker_and_each_device_measures_where_it_lands(lab: Path) -> None:
    assert cli(lab, "apply", MANIFEST).exit_code == ExitCode.OK
    before = {name: row["release"] for name, row in devices(lab).items()}
    with edited((lab / PROFILE, "inter_op_num_threads: 1", "inter_op_num_threads: 4")):
        assert cli(lab, "apply", MANIFEST).exit_code == ExitCode.OK
        assert {name: row["release"] for name, row in devices(lab).items()} != before
        rolled = cli(lab, "rollback", PULL_DEPLOYMENT, "-o", "json")
        assert rolled.exit_code == ExitCode.OK, rolled.output
        outcome = json.loads(rolled.stdout)
        outcome = outcome[0] if isinstance(outcome, list) else outcome
        assert {d["decision"] for d in outcome["devices"]} == {"RolledBack"}, outcome
        assert all("verification Passed" in d["reason"] for d in outcome["devices"]), outcome
        rows = devices(lab)
        assert {name: row["release"] for name, row in rows.items()} == before
        assert {row["health"] for row in rows.values()} == {"RolledBack"}  # as over SSH: until the next apply


def test_the_broker_password_alone_cannot_roll_back_uninstall_or_install(lab: Path) -> None:
    """Desired states are orders signed by the release key: with only the broker's controller password an
    attacker can withhold updates, never change what a device runs (the pull half of the one door)."""
    assert cli(lab, "apply", MANIFEST).exit_code == ExitCode.OK
    before, health = devices(lab)["pull-01"]["release"], devices(lab)["pull-01"]["health"]
    state = json.loads((Path(target(lab, "pull-01")[0].root) / "deployments" / PULL_DEPLOYMENT / "state.json")
                       .read_text())
    other = next((r for r in state["releases"] if r != before), before)
    generation = int(time.time() * 1000) + 10_000
    attacks = [
        {"action": "rollback", "release": None},                                      # uninstall
        {"action": "rollback", "release": other, "allow_rejected": True},              # an old or rejected one
        {"action": "install", "release": before, "files": {}, "trial_window_s": 60,   # a replay without an order
         "registry": {"url": "http://127.0.0.1:1", "repository": "x"}},
    ]
    for index, attack in enumerate(attacks):
        document = {"schema": "edgeops.desired/v1", "deployment": PULL_DEPLOYMENT, "generation": generation + index,
                    "by": "attacker", "gate": None, **attack}
        publish_as_controller(lab, "pull-01", document)
        status = eventually(lambda: (s := last_status(lab, "pull-01")).get("generation") == generation + index
                            and s.get("phase") == "done" and s, 30)
        assert status and status["result"] == "failed" and status["error"]["kind"] == "unsigned", status
        assert devices(lab)["pull-01"]["release"] == before and devices(lab)["pull-01"]["health"] == health


def test_daemons_ride_out_a_broker_restart(lab: Path) -> None:
    assert cli(lab, "apply", MANIFEST).exit_code == ExitCode.OK
    ws = load_workspace(lab)
    fleet = ws.fleets["lab-pull"]
    broker = lab / ".edgeops" / "lab" / "lab-pull" / "broker"
    pid = int((broker / "pid").read_text())
    os.kill(pid, signal.SIGTERM)
    assert eventually(lambda: not process_alive(pid), 10)
    pull_lab_up(ws, fleet, fleet_targets(ws, fleet))  # starts the broker again (retained messages persisted)
    with edited((lab / PROFILE, "inter_op_num_threads: 1", "inter_op_num_threads: 5")):
        applied = cli(lab, "apply", MANIFEST, "-o", "json")  # every daemon reconnected and follows again
        assert applied.exit_code == ExitCode.OK, applied.output
        assert {d["decision"] for d in json.loads(applied.stdout)[0]["devices"]} <= KEPT, applied.stdout


def test_an_offline_device_counts_as_unreachable_and_catches_up_when_it_connects(lab: Path) -> None:
    assert cli(lab, "apply", MANIFEST).exit_code == ExitCode.OK
    offline(lab, "pull-03")
    with edited((lab / PROFILE, "inter_op_num_threads: 1", "inter_op_num_threads: 2"),
                (lab / MANIFEST, "max_unreachable_devices: 25%", "max_unreachable_devices: 1"),
                (lab / FLEET, "report_deadline_s: 10", "report_deadline_s: 3600")):
        applied = cli(lab, "apply", MANIFEST, "-o", "json")
        assert applied.exit_code == ExitCode.OK, applied.output
        decisions = {d["key"].split("/")[1]: d for d in json.loads(applied.stdout)[0]["devices"]}
        # given up on its last will, not after the hour-long report deadline
        assert decisions["pull-03"]["decision"] == "Unreachable" and "last will" in decisions["pull-03"]["reason"]
        assert "catches up" in decisions["pull-03"]["reason"]
        assert {decisions[name]["decision"] for name in ("pull-01", "pull-02")} <= KEPT, decisions
        rows = devices(lab)
        assert rows["pull-03"]["sync"] == "OutOfSync" and "offline" in rows["pull-03"]["message"]
        online(lab, "pull-03")
        # on its trial release it reads Synced but Degraded (not verified yet), then Healthy once it committed
        caught_up = eventually(lambda: (devices(lab)["pull-03"]["sync"], devices(lab)["pull-03"]["health"]) ==
                               ("Synced", "Healthy"))
        assert caught_up, devices(lab)["pull-03"]
        assert devices(lab)["pull-03"]["fleet_release"] == rows["pull-01"]["fleet_release"]
        # the late verdict goes into that rollout's history with the next apply (here one with nothing to do)
        assert cli(lab, "apply", MANIFEST).exit_code == ExitCode.OK
        [rollout] = [r for r in json.loads(cli(lab, "history", PULL_DEPLOYMENT, "-o", "json").stdout)
                     if r["number"] == json.loads(applied.stdout)[0]["rollout"]]
        events = [e for e in rollout["devices"] if e["device"] == "lab-pull/pull-03"]
        assert [e["decision"] for e in events][0] == "Unreachable" and events[-1]["decision"] in KEPT, events
        assert "late verdict, accepted" in events[-1]["reason"] and events[-1]["bytes_moved"] > 0


def test_a_silent_device_past_the_unreachable_budget_halts_and_its_desired_state_is_withdrawn(lab: Path) -> None:
    assert cli(lab, "apply", MANIFEST).exit_code == ExitCode.OK
    before = {name: row["release"] for name, row in devices(lab).items()}
    offline(lab, "pull-03")
    with edited((lab / PROFILE, "inter_op_num_threads: 1", "inter_op_num_threads: 3"),
                (lab / MANIFEST, "max_unreachable_devices: 25%", "max_unreachable_devices: 0")):
        applied = cli(lab, "apply", MANIFEST, "-o", "json")
        assert applied.exit_code == ExitCode.FAILED, applied.output
        result = json.loads(applied.stdout)[0]
        assert result["outcome"] == "halted" and "max_unreachable_devices" in result["message"]
        decisions = {d["key"].split("/")[1]: d["decision"] for d in result["devices"]}
        assert decisions == {"pull-01": "RolledBack", "pull-02": "RolledBack", "pull-03": "Unreachable"}
        assert {n: r["release"] for n, r in devices(lab).items() if n != "pull-03"} == \
            {n: r for n, r in before.items() if n != "pull-03"}
        online(lab, "pull-03")
        assert eventually(lambda: last_status(lab, "pull-03").get("state", {}).get("facts"), 30)
        time.sleep(3)  # a withdrawn desired state must not be installed late
        assert devices(lab)["pull-03"]["release"] == before["pull-03"]


def test_a_tampered_blob_in_the_registry_is_refused_on_the_device(lab: Path) -> None:
    assert cli(lab, "apply", MANIFEST).exit_code == ExitCode.OK
    before = devices(lab)["pull-03"]["release"]
    offline(lab, "pull-03")
    with edited((lab / MANIFEST, "per_channel: true", "per_channel: false"),
                (lab / MANIFEST, "max_unreachable_devices: 25%", "max_unreachable_devices: 1")):
        applied = cli(lab, "apply", MANIFEST, "-o", "json")
        assert applied.exit_code == ExitCode.OK, applied.output
        model = json.loads(cli(lab, "plan", MANIFEST, "-o", "json").stdout)[0]["artifacts"]["cpu"]
        storage = lab / ".edgeops" / "lab" / "lab-pull" / "registry" / "storage"
        blob = storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / model[:2] / model / "data"
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        online(lab, "pull-03")
        refused = eventually(lambda: (last_status(lab, "pull-03").get("error") or {}).get("kind"))
        assert refused == "checksum-mismatch", last_status(lab, "pull-03")
        row = devices(lab)["pull-03"]
        assert row["release"] == before and row["health"] == "Healthy"
        assert not (Path(target(lab, "pull-03")[0].root) / "blobs" / "sha256" / model).exists()


@pytest.fixture(scope="module")
def tls_lab(tmp_path_factory: pytest.TempPathFactory):
    with running_pull_lab(tmp_path_factory.mktemp("pull-tls"), 1, report_deadline_s=10, tls=True) as root:
        yield root


def test_over_tls_devices_verify_the_broker_and_registry_and_so_does_the_controller(tls_lab: Path) -> None:
    fleet = load_workspace(tls_lab).fleets["lab-pull"].obj.spec.pull
    assert fleet.broker.startswith("mqtts://") and fleet.registry.startswith("https://")
    applied = cli(tls_lab, "apply", MANIFEST)
    assert applied.exit_code == ExitCode.OK, applied.output
    assert devices(tls_lab)["pull-01"]["health"] == "Healthy"
    other_ca = lab_certificates(tls_lab / "another-ca")[0]  # a CA that did not sign the broker's certificate
    fleet_file = tls_lab / "manifests" / "fleets" / "lab-pull.yaml"
    with edited((fleet_file, "ca_file: ../../.edgeops/lab/lab-pull/ca.pem", f"ca_file: {other_ca}")):
        refused = cli(tls_lab, "status", MANIFEST, "-o", "json")
        row = json.loads(refused.stdout)[0]["devices"][0]
        assert refused.exit_code == ExitCode.FAILED and row["health"] == "Unreachable"
        assert "TLS failed" in row["message"] and "certificate" in row["message"], row["message"]
    with edited((fleet_file, "ca_file: ../../.edgeops/lab/lab-pull/ca.pem", "ca_file: /etc/ssl/certs/ca.pem")):
        outside = cli(tls_lab, "status", MANIFEST)
        assert outside.exit_code == ExitCode.INVALID and "resolves outside the repository" in outside.output


def test_a_broker_killed_mid_rollout_leaves_no_mixed_fleet(lab: Path) -> None:
    """The canary committed, the others are measuring when the broker dies. The controller gives up on them at
    once (it lost the broker), halts, and takes the canary back once the broker is there again; the others,
    never sent a commit order, revert. Every device ends on the release it ran before, none on a trial."""
    import threading

    assert cli(lab, "apply", MANIFEST).exit_code == ExitCode.OK
    before = {name: row["release"] for name, row in devices(lab).items()}
    ws = load_workspace(lab)
    fleet = ws.fleets["lab-pull"]
    broker = lab / ".edgeops" / "lab" / "lab-pull" / "broker"
    done: dict[str, Result] = {}
    with edited((lab / PROFILE, "inter_op_num_threads: 1", "inter_op_num_threads: 4"),
                (lab / MANIFEST, "max_unreachable_devices: 25%", "max_unreachable_devices: 0")):
        pid = int((broker / "pid").read_text())
        killed = threading.Event()

        def kill_when_measuring(status: dict[str, Any]) -> None:  # on the watcher's thread, as the status arrives
            if status.get("release") not in (None, before["pull-02"]) and status.get("phase") == "verifying":
                if not killed.is_set():
                    os.kill(pid, signal.SIGKILL)
                    killed.set()

        watcher = watch_status(lab, "pull-02", kill_when_measuring)
        applying = threading.Thread(target=lambda: done.update(result=cli(lab, "apply", MANIFEST, "-o", "json")))
        applying.start()
        try:
            assert killed.wait(180), last_status(lab, "pull-02")
            assert eventually(lambda: not process_alive(pid), 10)
            time.sleep(4)  # two heartbeats: the controller gives its waiting devices up
            pull_lab_up(ws, fleet, fleet_targets(ws, fleet))  # the broker again (retained messages persisted)
        finally:
            applying.join(600)
            watcher.loop_stop()
    result = json.loads(done["result"].stdout)[0]
    assert result["outcome"] == "halted", result
    decisions = {d["key"].split("/")[1]: d for d in result["devices"]}
    assert decisions["pull-01"]["decision"] == "RolledBack", decisions["pull-01"]

    def settled() -> bool:
        rows = devices(lab)
        return all(rows[name]["release"] == before[name] and rows[name]["health"] in ("Healthy", "RolledBack")
                   for name in rows)

    assert eventually(settled, 120), ({n: (r["release"], r["health"], r["message"]) for n, r in devices(lab).items()},
                                      before, {n: (d["decision"], d["reason"]) for n, d in decisions.items()})


def test_a_head_retrained_in_git_reaches_pull_devices_as_its_changed_blocks(lab: Path) -> None:
    """Deltas over the registry: each daemon reads the new file's block map, fetches the blocks that differ as
    byte ranges, and rebuilds the file, which must hash to the signed file table before it is used."""
    from labkit.federated import retrain_head, write_float_digits

    model = write_float_digits(lab, "digits-pull", "lab-pull")
    manifest = "manifests/digits-pull.yaml"
    first = cli(lab, "apply", manifest, "-o", "json")
    assert first.exit_code == ExitCode.OK, first.output
    size = model.stat().st_size
    retrain_head(model)
    second = cli(lab, "apply", manifest, "-o", "json")
    assert second.exit_code == ExitCode.OK, second.output
    moved = {d["key"]: d["bytes_moved"] for d in json.loads(second.stdout)[0]["devices"]}
    assert len(moved) == 3 and all(0 < m <= 0.05 * size for m in moved.values()), (moved, size)
    print(f"head-only release over pull: {max(moved.values())} bytes fetched per device, "
          f"{max(moved.values()) / size:.2%} of the model's {size}")
    rows = {r["device"]: r for r in json.loads(cli(lab, "status", manifest, "-o", "json").stdout)[0]["devices"]}
    assert {(r["sync"], r["health"]) for r in rows.values()} == {("Synced", "Healthy")}
    assert cli(lab, "status", manifest, "--verify").exit_code == ExitCode.OK  # every file hashes as recorded

    # a changed block damaged in the registry: the file rebuilt from the ranges does not hash as signed and is
    # refused; the whole file is refused too; the device stays on the release it committed
    before = rows["pull-03"]["release"]
    offline(lab, "pull-03")
    retrain_head(model)
    head = onnx.load(str(model))
    with edited((lab / manifest, "waves: [1, 100%]", "waves: [1, 100%]\n    max_unreachable_devices: 1")):
        third = cli(lab, "apply", manifest)
        assert third.exit_code == ExitCode.OK, third.output
        sha = json.loads(cli(lab, "plan", manifest, "-o", "json").stdout)[0]["artifacts"]["cpu"]
    blob = lab / ".edgeops" / "lab" / "lab-pull" / "registry" / "storage" / "docker" / "registry" / "v2" / \
        "blobs" / "sha256" / sha[:2] / sha / "data"
    data = bytearray(blob.read_bytes())
    weight = next(i for i in head.graph.initializer if i.name == "head.3.weight").raw_data
    assert data.find(weight) > 0
    data[data.find(weight) + 10] ^= 0xFF  # inside a block that changed: fetched as a range
    blob.write_bytes(bytes(data))
    online(lab, "pull-03")
    refused = eventually(lambda: (last_status(lab, "pull-03", "digits-pull").get("error") or {}).get("kind"))
    assert refused == "checksum-mismatch"
    log = (lab / ".edgeops" / "lab" / "lab-pull" / "pull-03" / "pulld.log").read_text()
    assert "rebuilt from its changed blocks does not hash" in log
    row = {r["device"]: r for r in json.loads(cli(lab, "status", manifest, "-o", "json").stdout)[0]["devices"]}
    assert row["pull-03"]["release"] == before and row["pull-03"]["health"] == "Healthy"


def test_pull_devices_train_in_federated_rounds_and_get_the_learned_head_through_the_broker(lab: Path) -> None:
    """A federated round over the broker: the tensors go to the registry, a training request to each device's
    train topic; the daemon answers with the update alone, and a better head rolls out like any release."""
    from edgeops.operations import reconcile_loop
    from edgeops.settings import Settings
    from labkit.artifacts import repo_at
    from labkit.federated import scenario, write_base_model, write_device_samples, write_manifest

    model = lab / "models" / "wearable_base.onnx"
    sha, _ = write_base_model(model)
    write_manifest(lab, "pull-adapt", model, sha, "    rounds: 1\n    clip_norm: 5.0\n    round_deadline_s: 30\n"
                                                    "    every_s: 0.5\n    privacy: {noise_multiplier: 0.01}\n"
                                                    "    devices_per_round: {fraction: 1.0, min_devices: 2}\n",
                   fleet="lab-pull")
    ws = load_workspace(lab)
    targets = fleet_targets(ws, ws.fleets["lab-pull"])
    split = scenario(model, len(targets))
    for index, device in enumerate(targets):
        write_device_samples(Path(device.root), "pull-adapt", split.parts[index])
    assert cli(lab, "apply", "manifests/pull-adapt.yaml").exit_code == ExitCode.OK
    requests: list[dict[str, Any]] = []  # what the controller asks pull-01, as a holder of its password sees it
    spy = controller_client(lab)
    spy.on_message = lambda c, u, m: requests.append(json.loads(m.payload)) if m.payload else None
    spy.subscribe("edgeops/lab-pull/pull-01/pull-adapt/train", qos=1)
    try:
        adapted = cli(lab, "adapt", "pull-adapt", "-o", "json")
    finally:
        spy.loop_stop()
        spy.disconnect()
    assert adapted.exit_code == ExitCode.OK, adapted.output
    results = json.loads(adapted.stdout)
    first = results[0]
    assert sorted(first["used"]) == ["pull-01", "pull-02", "pull-03"], first
    assert first["samples"] == sum(p.size - p.size // 5 for p in split.parts)
    assert first["outcome"] == "released" and first["accuracy_after"] > first["accuracy_released"] + 10
    assert first["epsilon"] > 0 and first["noise_std"] > 0  # the budget this round spent
    rows = {r["device"]: r for r in json.loads(cli(lab, "status", "manifests/pull-adapt.yaml", "-o",
                                                   "json").stdout)[0]["devices"]}
    assert {(r["sync"], r["health"]) for r in rows.values()} == {("Synced", "Healthy")}
    # the request carried the controller's order, signed by the release key: the broker password alone can make
    # the device train on its own samples and send what it learned neither without one nor by bending one
    [sent] = requests
    assert set(sent["order"]) == {"order", "signature"}
    spec = {**sent["spec"], "release": last_status(lab, "pull-01", "pull-adapt")["release"]}  # the released head's
    forged = {"unsigned": {**{k: v for k, v in sent.items() if k != "order"}, "spec": spec},
              "order-mismatch": {**sent, "spec": spec}}  # the round's order, for the release trained then
    for kind, request in forged.items():
        answer = ask_to_train_as_controller(lab, "pull-01", "pull-adapt",
                                            {**request, "round": f"forged-{kind}", "deadline": time.time() + 60})
        assert answer["ok"] is False and answer["error"] == kind and "update" not in answer, answer
    # the reconcile loop runs the rounds when adapt.every_s says they are due (the fleet in sync)
    time.sleep(0.6)
    logged: list[str] = []
    assert reconcile_loop(lab, Settings.from_environment(os.environ), ["pull-adapt"], 0, 1, logged.append) == 0
    rounds = repo_at(lab).ledger.summaries("pull-adapt", "adapt")
    assert len(rounds) == 2 and any("round 2" in line for line in logged), logged
    assert rounds[1]["summary"]["epsilon"] > first["epsilon"]  # composed over the noisy rounds
    # a device that is away does not stall a round: it is named, the others train
    offline(lab, "pull-03")
    try:
        with edited((lab / "manifests" / "pull-adapt.yaml", "round_deadline_s: 30", "round_deadline_s: 8")):
            alone = cli(lab, "adapt", "pull-adapt", "--rounds", "1", "-o", "json")
        result = json.loads(alone.stdout)[0]
        away = {**result["skipped"], **(result.get("dropped") or {})}  # unreachable, or no update by the deadline
        assert "pull-03" in away and sorted(result["used"]) == ["pull-01", "pull-02"], result
    finally:
        online(lab, "pull-03")

