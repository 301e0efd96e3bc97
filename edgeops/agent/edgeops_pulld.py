#!/usr/bin/env python3
"""edgeops pull-mode agent daemon: follow the desired state on an MQTT broker, fetch releases from an OCI registry.

Runs beside ``edgeops_agent.py`` and ``edgeops_gate.py`` (same directory) and needs only
python3, numpy, onnxruntime and paho-mqtt. No inbound connection to the device: it
dials out to the broker and the registry, and runs the same lifecycle a controller
drives over SSH, by calling the same agent commands:

    prepare -> fetch blobs by sha256 -> assemble (hashes checked) -> switch (trial, signature
    checked, dead-man timer armed) -> bench A/B against the committed release -> the gate
    (edgeops_gate, the controller's own) -> record (commit) | switch revert

    edgeops_pulld.py --config <root>/agent/pull.json

Topics (``P`` = topic prefix, QoS 1):

    P/<fleet>/<device>/<deployment>/desired   retained, from the controller: what to run
    P/<fleet>/<device>/<deployment>/status    retained, from here: what runs, the last verdict
    P/<fleet>/<device>/online                 retained: {"online": true, "at": ...}; the broker
                                              publishes {"online": false} when this connection dies

Commits are the controller's decision during a rollout: a desired state with ``commit: on-order``
is installed, switched (trial, timer armed) and measured, and the verdict published as
``awaiting-commit``; the release is committed only when the same desired state comes again with
``commit: on-pass``. A ``withdraw`` document, a newer desired state, or the trial window running
out reverts it: a device cut off from its controller never commits a release the rollout gave up
on. After a rollout succeeded the controller republishes ``on-pass`` for devices that were away,
so they catch up on their own.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import queue
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import edgeops_gate  # noqa: E402  (shipped beside this file)

STATUS_SCHEMA = "edgeops.status/v1"
DESIRED_SCHEMA = "edgeops.desired/v1"
AGENT = os.path.join(HERE, "edgeops_agent.py")


class Stopping(Exception):
    """The daemon is stopping while a release waits for its commit order: the trial is left as it is (its
    timer reverts it; after a restart the desired state is handled again)."""


class Failure(Exception):
    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def log(message):
    sys.stderr.write(time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + message + "\n")
    sys.stderr.flush()


def agent(*args, timeout=None):
    """Run an agent command with this interpreter; its JSON document, or Failure with its message."""
    try:
        done = subprocess.run([sys.executable, AGENT, *args], capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise Failure("timeout", "agent %s took longer than %ss" % (args[0], timeout))
    lines = done.stdout.strip().splitlines()
    try:
        document = json.loads(lines[-1]) if lines else None
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise Failure("agent-broken", "agent %s exited %s: %s" % (args[0], done.returncode,
                                                                  (done.stderr.strip() or "no output")[-300:]))
    if not document.get("ok"):
        raise Failure(str(document.get("error")), str(document.get("message")))
    return document


def kept_verdict(verdict, desired):
    """What the device keeps beside the release: the verdict and its numbers (the raw samples are published)."""
    return {"verification": {"outcome": verdict["outcome"], "reason": verdict["reason"],
                             **{k: v for k, v in verdict["measurements"].items() if k != "samples_ms"},
                             "slo": desired["gate"]["slo"]}}


BLOCKMAP_FORMAT = "edgeops.blockmap/v1"
TRAIN_SCHEMA = "edgeops.train/v1"
UPDATE_SCHEMA = "edgeops.update/v1"


def _runs(indices):
    """Sorted block indices as (first, last) runs of consecutive ones."""
    runs = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return [tuple(r) for r in runs]


class Daemon:
    def __init__(self, config):
        self.config = config
        self.root = config["root"]
        self.fleet, self.device = config["fleet"], config["device"]
        self.base = "%s/%s/%s" % (config.get("topic_prefix", "edgeops"), self.fleet, self.device)
        self.heartbeat_s = float(config.get("heartbeat_s", 30))
        self.work = queue.Queue()
        self.latest = {}          # deployment -> the newest desired document received
        self.training = {}        # deployment -> the newest training request received (federated rounds)
        self.trained = {}         # deployment -> the round this daemon last answered
        self.last_status = {}     # deployment -> the status document last published
        self.stopping = threading.Event()
        self.next_beat = 0.0
        self.reconnected = threading.Event()  # say everything again: a restarted broker may have lost it
        self.client = self._client()

    # ------------------------------------------------------------ broker

    def _client(self):
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edgeops-%s-%s" % (self.fleet, self.device),
                             clean_session=True)  # desired states are retained: on reconnect the broker
        # sends what is desired now, never a queue of what was desired while this device was away
        client.username_pw_set(self.config["username"], self.config.get("password"))
        if self.config["broker"].startswith("mqtts://"):
            client.tls_set(ca_certs=self.config.get("ca_file"))
        client.will_set(self.base + "/online", json.dumps({"online": False}), qos=1, retain=True)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            log("broker refused the connection: %s" % reason_code)
            return
        client.subscribe(self.base + "/+/desired", qos=1)
        client.subscribe(self.base + "/+/train", qos=1)
        self._online()
        self.reconnected.set()
        log("connected to %s as %s" % (self.config["broker"], self.config["username"]))

    def _on_message(self, client, userdata, message):
        deployment = message.topic.split("/")[-2]
        if message.topic.endswith("/train"):
            try:
                request = json.loads(message.payload.decode()) if message.payload else None
            except ValueError:
                request = None
            if isinstance(request, dict) and request.get("schema") == TRAIN_SCHEMA and \
                    request.get("deployment") == deployment:
                self.training[deployment] = request
                self.work.put(("train", deployment))
            return
        if not message.payload:  # cleared: stay on what runs
            self.latest.pop(deployment, None)
            return
        try:
            desired = json.loads(message.payload.decode())
        except ValueError:
            log("ignored a desired state that is not JSON on %s" % message.topic)
            return
        if not isinstance(desired, dict) or desired.get("schema") != DESIRED_SCHEMA:
            return
        if desired.get("deployment") != deployment:
            log("ignored a desired state for %s on the topic of %s" % (desired.get("deployment"), deployment))
            return
        self.latest[deployment] = desired
        self.work.put(deployment)

    def _online(self):
        self.client.publish(self.base + "/online", json.dumps({"online": True, "at": time.time()}), qos=1,
                            retain=True)

    def beat_if_due(self):
        """Say this device is alive, and what runs now (a trial may have expired meanwhile), every heartbeat."""
        if time.monotonic() < self.next_beat and not self.reconnected.is_set():
            return
        self.reconnected.clear()
        self.next_beat = time.monotonic() + self.heartbeat_s
        if self.client.is_connected():
            self._online()
            for known in list(self.last_status):
                self.publish(known)

    def publish(self, deployment, state=None, **fields):
        """The status of ``deployment`` with ``fields`` changed; ``state``: the agent's state, if just read."""
        try:
            state = state or self._state(deployment)
        except Failure as exc:
            state = {"error": exc.kind, "message": str(exc)}
        document = {"schema": STATUS_SCHEMA, "fleet": self.fleet, "device": self.device, "deployment": deployment,
                    "at": time.time(), "state": state,
                    **{k: v for k, v in self.last_status.get(deployment, {}).items()
                       if k in ("generation", "release", "phase", "result", "verdict", "error", "action", "rollout",
                                "bytes_fetched")},
                    **fields}
        self.last_status[deployment] = document
        self.client.publish("%s/%s/status" % (self.base, deployment), json.dumps(document), qos=1, retain=True)

    def _state(self, deployment):
        sensor = json.dumps(self.config.get("power_sensor") or {"source": "none"}, sort_keys=True)
        return agent("state", "--root", self.root, "--deployment", deployment, "--facts", "--power", sensor)

    # ------------------------------------------------------------ a federated round's local step

    def train(self, deployment):
        """Train the head on this device's own samples from the round's tensors (fetched from the registry by
        digest) and publish the agent's answer (the clipped update and counts) on ``<deployment>/update``.
        Changes nothing this device runs; a round is answered once."""
        request = self.training.pop(deployment, None)
        if request is None or self.trained.get(deployment) == request.get("round"):
            return
        self.trained[deployment] = request.get("round")
        if time.time() > float(request.get("deadline", 0)):
            return  # the round is over: an answer now would not be waited for
        answer = {"schema": UPDATE_SCHEMA, "deployment": deployment, "round": request.get("round")}
        path = None
        try:
            item = request["tensors"]
            path = os.path.join(self.root, ".staging", "adapt-%s.npz" % item["sha256"][:16])
            with self._blob_request(request, item["sha256"]) as response:
                data = response.read(int(item["size"]) + 1)
            if hashlib.sha256(data).hexdigest() != item["sha256"]:
                raise Failure("checksum-mismatch", "the round's tensors do not hash to %s" % item["sha256"][:12])
            with open(path, "wb") as out:
                out.write(data)
            left = max(1.0, float(request["deadline"]) - time.time())
            done = agent("adapt-train", "--root", self.root, "--deployment", deployment, "--tensors", path,
                         "--spec", json.dumps(request["spec"]), *self.order_args(request), timeout=left)
            answer.update({k: v for k, v in done.items() if k not in ("schema", "agent_version")})
        except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
            answer.update(ok=False, error="fetch-failed", message=str(getattr(exc, "reason", exc))[:300])
        except Failure as exc:
            answer.update(ok=False, error=exc.kind, message=str(exc)[:300])
        finally:
            if path and os.path.exists(path):
                os.unlink(path)
        self.client.publish("%s/%s/update" % (self.base, deployment), json.dumps(answer), qos=1, retain=False)

    # ------------------------------------------------------------ the lifecycle

    def handle(self, deployment):
        desired = self.latest.get(deployment)
        if desired is None:
            return
        done = self._handled(deployment)
        if done.get("generation") == desired.get("generation") and done.get("action") == desired.get("action"):
            if deployment not in self.last_status:
                self.publish(deployment, **done)  # after a restart: say again how it ended
            return
        common = {"generation": desired["generation"], "release": desired.get("release"),
                  "action": desired["action"], "rollout": desired.get("rollout")}
        if desired["action"] == "withdraw":  # a rollout that did not succeed took this device's desired state back
            self._remember(deployment, {**common, "phase": "done", "result": "withdrawn"})
            return
        try:
            self.check_order(deployment, desired)
            if desired["action"] == "rollback":
                outcome = {**common, **self.roll_back(deployment, desired)}
            else:
                outcome = {**common, **self.install(deployment, desired)}
        except Stopping:
            return
        except Failure as exc:
            log("%s: %s failed: %s" % (deployment, desired["release"], exc))
            outcome = {**common, "phase": "done", "result": "failed", "verdict": None,
                       "error": {"kind": exc.kind, "message": str(exc)}}
        self._remember(deployment, outcome)
        self.publish(deployment, **outcome)

    @staticmethod
    def order_action(desired):
        if desired["action"] == "install":
            return "activate"
        return "rollback" if desired.get("release") else "uninstall"

    @staticmethod
    def order_args(desired):
        order = desired.get("order") or {}
        return ["--order", order["order"], "--order-signature", order["signature"]] if order else []

    def check_order(self, deployment, desired):
        """On an enrolled device every desired state carries an order signed by the release key, newer than the
        last one taken: a broker credential alone can withhold updates, never install or roll back."""
        action = self.order_action(desired)
        agent("check-order", "--root", self.root, "--deployment", deployment, "--action", action,
              "--release", desired.get("release") or "none",
              *(["--allow-rejected"] if desired.get("allow_rejected") and action == "rollback" else []),
              *self.order_args(desired))

    def install(self, deployment, desired):
        common = ["--root", self.root, "--deployment", deployment]
        release, by = desired["release"], desired.get("by", "edgeops")
        state = self._state(deployment)
        entry = (state.get("state") or {}).get("releases", {}).get(release) or {}
        if state.get("current") == release and entry.get("state") == "committed":
            return {"phase": "done", "result": "committed", "verdict": None, "error": None, "unchanged": True}
        self.publish(deployment, state, generation=desired["generation"], release=release, action="install",
                     rollout=desired.get("rollout"), bytes_fetched=0,
                     phase="fetching", result=None, error=None)
        observed = agent("prepare", *common)
        staged, fetched = {}, 0
        bases = edgeops_gate.patch_bases(observed)
        try:
            for name, item in sorted(desired["files"].items()):
                if item["sha256"] not in set(observed["blobs"]) and item["sha256"] not in staged.values():
                    found, base = None, bases.get(name)
                    if item.get("blockmap") and base is not None and base[1] == item["size"]:
                        try:
                            found = self.fetch_changed_blocks(desired, name, item, base[0])
                        except Failure as exc:  # refused or not served: the whole file instead
                            log("%s: %s; fetching it whole" % (name, exc))
                    path, size = found or (self.fetch(desired, name, item), item["size"])
                    staged[path] = item["sha256"]
                    fetched += size
            files = json.dumps({n: f["sha256"] for n, f in desired["files"].items()}, sort_keys=True)
            agent("assemble", *common, "--release", release, "--files", files, "--staged", json.dumps(staged))
        finally:
            for path in staged:
                if os.path.exists(path):
                    os.unlink(path)
        signed = desired.get("signed") or {}
        extra = ["--metadata", signed["metadata"], "--signature", signed["signature"]] if signed else []
        before = agent("switch", *common, "--release", release, "--action", "activate", "--by", by,
                       "--trial-window", "%g" % desired["trial_window_s"], *extra, *self.order_args(desired))
        switched_at = time.monotonic()  # the trial window runs from here
        baseline = before.get("committed") if before.get("committed") != release else None
        self.publish(deployment, phase="verifying", bytes_fetched=fetched)
        verdict = self.verify(deployment, desired, baseline)
        record = kept_verdict(verdict, desired)
        keep = verdict["outcome"] == edgeops_gate.PASSED or (
            verdict["outcome"] == edgeops_gate.INCONCLUSIVE and desired["gate"]["retry_inconclusive"])
        if keep and desired.get("commit") == "on-order":
            undecided = self.await_commit(deployment, desired, verdict, fetched, switched_at)
            if undecided:
                agent("record", *common, "--json", json.dumps(record), "--by", by, "--release", release)
                # not a verdict on the release (it passed here): aborted, so a later rollout may run it again
                agent("switch", *common, "--action", "revert", "--aborted", "--by", by, "--reason", undecided)
                return {"phase": "done", "result": "withdrawn", "verdict": verdict, "error": None,
                        "bytes_fetched": fetched, "reason": undecided}
        if keep:
            status = "committed" if verdict["outcome"] == edgeops_gate.PASSED else "inconclusive"
            agent("record", *common, "--json", json.dumps({**record, "status": status}), "--by", by,
                  "--release", release)
            try:
                agent("prune", *common, "--keep", str(desired.get("keep_releases", 3)))
            except Failure as exc:
                log("pruning failed: %s" % exc)
            return {"phase": "done", "result": "committed", "verdict": verdict, "error": None, "bytes_fetched": fetched}
        agent("record", *common, "--json", json.dumps(record), "--by", by)
        agent("switch", *common, "--action", "revert", "--by", by, "--reason", verdict["outcome"].lower())
        return {"phase": "done", "result": "rejected", "verdict": verdict, "error": None, "bytes_fetched": fetched}

    def await_commit(self, deployment, desired, verdict, fetched, switched_at):
        """Publish the verdict and wait for the controller's decision. None: commit (the same desired state came
        again with ``commit: on-pass`` and a valid order); else why the release is reverted."""
        self.publish(deployment, phase="verified", result="awaiting-commit", verdict=verdict, bytes_fetched=fetched)
        window = float(desired["trial_window_s"])
        deadline = switched_at + window - min(30.0, window / 10)  # decide before the watchdog does
        seen = desired
        while not self.stopping.is_set():
            latest = self.latest.get(deployment)
            if latest is None:
                return "the controller cleared this desired state"
            if latest is not seen:
                seen = latest
                same = all(latest.get(k) == desired.get(k) for k in ("generation", "release", "action"))
                if not same:
                    return "superseded by another desired state (%s %s)" % (latest.get("action"),
                                                                          latest.get("release"))
                if latest.get("commit") == "on-pass":
                    try:
                        self.check_order(deployment, latest)
                    except Failure as exc:
                        log("%s: a commit order was refused: %s" % (deployment, exc))
                        continue
                    return None
            if time.monotonic() >= deadline:
                return "no commit order from the controller within the trial window"
            self.beat_if_due()
            self.stopping.wait(0.5)
        raise Stopping()

    def roll_back(self, deployment, desired):
        """Back to an earlier committed release (or none); with a gate, measured there against the absolute SLOs.
        A rejected release named with allow_rejected runs as a trial: committed only when it passes now."""
        common = ["--root", self.root, "--deployment", deployment]
        by = desired.get("by", "edgeops")
        if not desired["release"]:
            agent("switch", *common, "--action", "uninstall", "--by", by, *self.order_args(desired))
            return {"phase": "done", "result": "rolled-back", "verdict": None, "error": None}
        switched = agent("switch", *common, "--action", "rollback", "--release", desired["release"], "--by", by,
                         "--trial-window", "%g" % desired.get("trial_window_s", 1800),
                         *(["--allow-rejected"] if desired.get("allow_rejected") else []), *self.order_args(desired))
        if not desired.get("gate"):
            return {"phase": "done", "result": "rolled-back", "verdict": None, "error": None}
        verdict = self.verify(deployment, desired, None)
        record = kept_verdict(verdict, desired)
        if switched.get("trial_until"):
            if verdict["outcome"] not in (edgeops_gate.PASSED, edgeops_gate.INCONCLUSIVE):
                agent("record", *common, "--json", json.dumps(record), "--by", by, "--release", desired["release"])
                agent("switch", *common, "--action", "revert", "--by", by, "--reason", "failed again")
                raise Failure("verification-failed", "%s failed its verification again: %s" % (
                    desired["release"], verdict["reason"]))
            record["status"] = "committed" if verdict["outcome"] == edgeops_gate.PASSED else "inconclusive"
        agent("record", *common, "--json", json.dumps(record), "--by", by, "--release", desired["release"])
        return {"phase": "done", "result": "rolled-back", "verdict": verdict, "error": None}

    def verify(self, deployment, desired, baseline):
        gate = edgeops_gate.spec_from_json(desired["gate"])
        releases = os.path.join(self.root, "deployments", deployment, "releases")

        def run(runs, attempt):
            args = ["bench", os.path.join(releases, desired["release"]), "--runs", str(runs),
                    "--block", str(gate.verification.block), "--golden"]
            if baseline:
                args += ["--compare", os.path.join(releases, baseline)]
            return agent(*args, timeout=gate.verify_timeout_s * (2 ** min(attempt, 3)))

        try:
            return edgeops_gate.measure(run, gate, desired.get("host_golden"),
                                        "%s/%s:%s" % (self.fleet, self.device, desired["release"]))
        except Failure as exc:
            if exc.kind != "out-of-memory":
                raise
            return edgeops_gate.out_of_memory(str(exc))

    def _blob_request(self, desired, sha256, headers=None):
        registry = self.config.get("registry") or desired["registry"]["url"]
        url = "%s/v2/%s/blobs/sha256:%s" % (registry.rstrip("/"), desired["registry"]["repository"], sha256)
        context = ssl.create_default_context(cafile=self.config.get("ca_file")) if url.startswith("https") else None
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60, context=context)

    def fetch_changed_blocks(self, desired, name, item, base):
        """A file rebuilt from the blob ``base`` this device holds and the blocks of the new one that differ,
        fetched as byte ranges (the new file's block map says which); refused unless it hashes to the file
        table's sha256. (staging path, bytes fetched), or None when it would not save much."""
        try:
            with self._blob_request(desired, item["blockmap"]["sha256"]) as response:
                raw = response.read(8 << 20)
            if hashlib.sha256(raw).hexdigest() != item["blockmap"]["sha256"]:
                raise ValueError("the block map does not hash to its digest")
            line, _, digests = raw.partition(b"\n")
            bmap = json.loads(line)
            block, size, width = int(bmap["block"]), int(bmap["size"]), int(bmap["digest_bytes"])
            count = (size + block - 1) // block
            if bmap.get("format") != BLOCKMAP_FORMAT or size != item["size"] or block < 64 or width < 1 or \
                    len(digests) != count * width:
                raise ValueError("not a block map of this file")
            with open(os.path.join(self.root, "blobs", "sha256", base), "rb") as handle:
                old = handle.read()
            changed = [i for i in range(count) if hashlib.sha256(old[i * block:(i + 1) * block]).digest()[:width]
                       != digests[i * width:(i + 1) * width]]
            if len(old) != size or len(changed) * block > size // 2:
                return None
            fresh, fetched = {}, len(raw)
            for first, last in _runs(changed):
                start, end = first * block, min(size, (last + 1) * block) - 1
                with self._blob_request(desired, item["sha256"], {"Range": "bytes=%d-%d" % (start, end)}) as response:
                    data = response.read(end - start + 2)
                    if response.status != 206 or len(data) != end - start + 1:
                        raise ValueError("the registry did not serve byte ranges")
                fresh[start] = data
                fetched += len(data)
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
            raise Failure("patch-mismatch", "changed blocks of %s: %s" % (name, getattr(exc, "reason", exc)))
        data = bytearray(old)
        for start, chunk in fresh.items():
            data[start:start + len(chunk)] = chunk
        if hashlib.sha256(bytes(data)).hexdigest() != item["sha256"]:
            raise Failure("patch-mismatch", "%s rebuilt from its changed blocks does not hash to %s: refused"
                          % (name, item["sha256"][:12]))
        path = os.path.join(self.root, ".staging", "%s.%s.part" % (item["sha256"], uuid.uuid4().hex[:8]))
        with open(path, "wb") as out:
            out.write(bytes(data))
        return path, fetched

    def fetch(self, desired, name, item):
        """One blob by digest from the registry into staging; the agent's assemble checks its sha256."""
        registry = self.config.get("registry") or desired["registry"]["url"]
        path = os.path.join(self.root, ".staging", "%s.%s.part" % (item["sha256"], uuid.uuid4().hex[:8]))
        digest = hashlib.sha256()
        try:
            with self._blob_request(desired, item["sha256"]) as response, open(path, "wb") as out:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as exc:
            raise Failure("registry-unreachable", "fetching %s (%s) from %s: %s" % (
                name, item["sha256"][:12], registry, getattr(exc, "reason", exc)))
        if digest.hexdigest() != item["sha256"]:
            os.unlink(path)
            raise Failure("checksum-mismatch", "the registry served %s with sha256 %s, not %s: refused, the "
                          "previous release is untouched" % (name, digest.hexdigest(), item["sha256"]))
        return path

    # ------------------------------------------------------------ what was handled (survives restarts)

    def _handled_path(self, deployment):
        return os.path.join(self.root, "deployments", deployment, "pull-handled.json")

    def _handled(self, deployment):
        try:
            with open(self._handled_path(deployment)) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return {}

    def _remember(self, deployment, outcome):
        path = self._handled_path(deployment)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = "%s.%s" % (path, uuid.uuid4().hex[:8])
        with open(tmp, "w") as handle:
            json.dump(outcome, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    # ------------------------------------------------------------ main loop

    def run(self):
        host, _, port = self.config["broker"].split("://", 1)[1].rstrip("/").partition(":")
        default = 8883 if self.config["broker"].startswith("mqtts://") else 1883
        self.client.connect_async(host, int(port or default), keepalive=max(5, int(self.heartbeat_s)))
        self.client.loop_start()
        self.next_beat = time.monotonic() + self.heartbeat_s
        while not self.stopping.is_set():
            try:
                deployment = self.work.get(timeout=min(1.0, self.heartbeat_s))
            except queue.Empty:
                deployment = None
            if isinstance(deployment, tuple):
                self.train(deployment[1])
            elif deployment is not None:
                self.handle(deployment)
            self.beat_if_due()
        self.client.publish(self.base + "/online", json.dumps({"online": False}), qos=1, retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="edgeops_pulld.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="JSON: root, fleet, device, broker, username, password, ...")
    args = parser.parse_args(argv)
    with open(args.config) as handle:
        config = json.load(handle)
    if config.get("password_b64"):
        config["password"] = base64.b64decode(config["password_b64"]).decode()
    daemon = Daemon(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *a: daemon.stopping.set())
    daemon.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
