"""A model-based test of the device lifecycle (Hypothesis' rule-based state machine) against the real agent on
a real local directory: random sequences of installs, verdicts, trials left to expire, reverts, rollbacks
(allowed or not), uninstalls, reads, tampered files, hand-repointed links, torn state files, heals, stale
controllers, the controller killed in the middle of an agent step (the agent dies at its n-th file system
write) and a full disk (ENOSPC at the n-th flush). After every step the invariants hold:

(a) a device that had a committed release still has one (unless the user uninstalled);
(b) what runs is committed, or a trial with its timer armed, or a half-done step a read reports;
(c) every file of the running and previous releases hashes as recorded, unless tampered since the last heal
    (and then a verifying read says so);
(d) a read changes no byte;
(e) the model and the device agree on what runs and what is committed;
(f) a change from a controller older than the newest one is refused.

The agent runs in this process (labkit.inprocess) so thousands of steps fit in CI; bench/model_check.py runs
the same machine longer. Every failure it finds becomes a named regression test below.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from edgeops.device import AgentFailed, Device
from edgeops.signing import (
    RELEASE_NAMESPACE,
    FileDigest,
    SignedMetadata,
    allowed_signers_line,
    generate_key,
    release_metadata,
    sign,
    sign_order,
)
from labkit.artifacts import agent_module
from labkit.inprocess import InProcessAgent
from tests.integration.test_one_transition import tree_digest

DEPLOYMENT = "wearable-activity"
COUNT = 3


class Killed(BaseException):
    """The agent's process is gone (SIGKILL, or its controller's session hung up): nothing in it runs on."""


@contextmanager
def failing_at(name: str, call: int, failure: Callable[[], BaseException]) -> Iterator[None]:
    """``os.<name>`` fails with ``failure()`` at its ``call``-th use inside the block (the agent runs in this
    process, so this is where it dies or finds its disk full)."""
    real, count = getattr(os, name), [0]

    def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
        count[0] += 1
        if count[0] == call:
            raise failure()
        return real(*args, **kwargs)

    setattr(os, name, wrapped)
    try:
        yield
    finally:
        setattr(os, name, real)
STEPS_RUN: list[str] = []  # every rule that ran, for the claim "at least N steps"


class Lifecycle(RuleBasedStateMachine):
    """One device, three releases, one release key; ``fence`` is the newest controller's lock token."""

    releases: list = []  # type: ignore[type-arg]   (set by the test before it runs)
    key: Path = Path()
    base: Path = Path()

    @initialize()
    def enroll(self) -> None:
        root = Path(self.base) / f"device-{time.time_ns()}"
        self.device = Device(InProcessAgent("model-01", agent_module()), str(root), sys.executable, DEPLOYMENT)
        self.device.enroll(allowed_signers_line(Path(f"{self.key}.pub").read_text()).encode())
        self.directory = root / "deployments" / DEPLOYMENT
        self.fence = 1
        self.device.fence = self.fence
        self.had_committed = False
        self.uninstalled = False
        self.tampered: set[str] = set()
        self.repointed = False
        self.torn = False
        self.verified: set[str] = set()  # releases a verdict committed (the only ones that may be in the chain)

    # ---------------------------------------------------------------- helpers

    def state(self) -> dict:  # type: ignore[type-arg]
        return json.loads((self.directory / "state.json").read_text()) if (self.directory / "state.json").exists() \
            else {}

    def signed(self, release) -> SignedMetadata:  # type: ignore[no-untyped-def]
        data = release_metadata(DEPLOYMENT, release.id, [FileDigest(f.name, f.sha256, f.size) for f in release.files],
                                release.config_digest, time.time_ns() // 1_000_000, 3600)
        return SignedMetadata(data, sign(self.key, RELEASE_NAMESPACE, data))

    def order(self, allow_rejected: bool = False):  # type: ignore[no-untyped-def]
        return lambda action, release: sign_order(self.key, DEPLOYMENT, "lab/model-01", action, release,
                                                  allow_rejected and action == "rollback")

    def settled(self) -> None:
        """A mutating step finishes what was half done (the link), as the agent does, and a revert restores its
        target's recorded bytes from the blobs: tampered files that hash as recorded again are healed."""
        self.repointed = False
        agent, releases = agent_module(), (self.state().get("releases") or {})
        for item in list(self.tampered):
            release, name = item.split("/")
            meta = ((releases.get(release) or {}).get("files") or {}).get(name)
            path = self.directory / "releases" / release / name
            if meta and path.exists() and agent._sha256_file(str(path)) == meta["sha256"]:
                self.tampered.discard(item)

    def allowed(self, exc: AgentFailed, *kinds: str) -> None:
        assert exc.kind in kinds, (exc.kind, exc.message)

    def switched_to(self, release) -> bool:  # type: ignore[no-untyped-def]
        """Push a release and run it as a trial (signed, timer armed); False when the device refused."""
        try:
            self.device.push(release)
            self.device.activate(release.id, signed=self.signed(release), trial_window_s=60)
            return True
        except AgentFailed as exc:
            self.allowed(exc, "release-rejected", "release-damaged", "blob-damaged", "file-mismatch")
            return False
        finally:
            self.settled()

    # ---------------------------------------------------------------- rules

    @precondition(lambda self: not self.torn)
    @rule(index=st.integers(0, COUNT - 1), passes=st.booleans())
    def install(self, index: int, passes: bool) -> None:
        STEPS_RUN.append("install")
        release = self.releases[index]
        if not self.switched_to(release):
            return
        if passes:
            self.device.record({"status": "committed"}, release=release.id)
            self.had_committed, self.uninstalled = True, False
            self.verified.add(release.id)
        else:
            try:
                self.device.revert(reason="failed verification")
            except AgentFailed as exc:  # the way back could not be healed: the trial stays, its timer armed
                self.allowed(exc, "release-damaged")
            self.settled()

    @precondition(lambda self: not self.torn)
    @rule(index=st.integers(0, COUNT - 1))
    def leave_a_trial(self, index: int) -> None:
        STEPS_RUN.append("leave_a_trial")
        self.switched_to(self.releases[index])

    @precondition(lambda self: not self.torn)
    @rule()
    def the_trial_timer_fires(self) -> None:
        """The trial window ends (a skewed clock, or time passing) and the device's timer runs."""
        STEPS_RUN.append("the_trial_timer_fires")
        data = self.state()
        trial = data.get("trial")
        if trial:
            data["trial"]["deadline"] = 1.0
            (self.directory / "state.json").write_text(json.dumps(data))
            self.device.transport.run([sys.executable, "agent", "watchdog", "--root", self.device.root,
                                       "--deployment", DEPLOYMENT, "--release", trial["release"], "--deadline", "1.0"])
            self.settled()

    @precondition(lambda self: not self.torn)
    @rule(index=st.integers(0, COUNT - 1), allow_rejected=st.booleans())
    def rollback(self, index: int, allow_rejected: bool) -> None:
        STEPS_RUN.append("rollback")
        release = self.releases[index]
        try:
            self.device.rollback(to=release.id, allow_rejected=allow_rejected, trial_window_s=60,
                                 order=self.order(allow_rejected))
        except AgentFailed as exc:
            self.allowed(exc, "release-missing", "release-not-committed", "release-rejected", "release-damaged",
                         "file-mismatch", "unsigned", "expired", "downgrade")
        self.settled()

    @precondition(lambda self: not self.torn)
    @rule()
    def revert(self) -> None:
        STEPS_RUN.append("revert")
        try:
            self.device.revert(verdict=False, reason="an error")
        except AgentFailed as exc:
            self.allowed(exc, "release-damaged")
        self.settled()

    @precondition(lambda self: not self.torn and self.had_committed)
    @rule(data=st.data())
    def uninstall_when_asked(self, data: st.DataObject) -> None:
        STEPS_RUN.append("uninstall_when_asked")
        if data.draw(st.integers(0, 9)) == 0:  # rare: the user asks for it
            self.device.uninstall(order=self.order()("uninstall", None))
            self.uninstalled = True
            self.settled()

    @precondition(lambda self: not self.torn)
    @rule(index=st.integers(0, COUNT - 1), write=st.integers(1, 6), rollback=st.booleans())
    def the_controller_is_killed_mid_step(self, index: int, write: int, rollback: bool) -> None:
        """A switch (or a rollback) whose agent dies at its n-th rename: whatever it left is finished or undone
        by the next step, and until then a read reports it."""
        STEPS_RUN.append("the_controller_is_killed_mid_step")
        release = self.releases[index]
        try:
            if not rollback:
                self.device.push(release)
            with failing_at("replace", write, lambda: Killed()):
                if rollback:
                    self.device.rollback(to=release.id, trial_window_s=60, order=self.order())
                else:
                    self.device.activate(release.id, signed=self.signed(release), trial_window_s=60)
        except Killed:
            STEPS_RUN.append("killed")
            self.repointed = True  # a half-done step at most, which a read reports and the next change finishes
        except AgentFailed as exc:
            self.allowed(exc, "release-rejected", "release-damaged", "blob-damaged", "file-mismatch",
                          "release-missing", "release-not-committed", "downgrade")
            self.settled()
        else:
            self.settled()

    @precondition(lambda self: not self.torn)
    @rule(index=st.integers(0, COUNT - 1), flush=st.integers(1, 8))
    def the_disk_is_full(self, index: int, flush: int) -> None:
        """ENOSPC at the n-th fsync of an install: a named error (disk-full), and the device as it was or on a
        trial with its timer armed (the failing write came after the switch's own)."""
        STEPS_RUN.append("the_disk_is_full")
        release = self.releases[index]
        before = self.state().get("current")
        try:
            with failing_at("fsync", flush, lambda: OSError(errno.ENOSPC, "No space left on device")):
                self.device.push(release)
                self.device.activate(release.id, signed=self.signed(release), trial_window_s=60)
        except AgentFailed as exc:
            self.allowed(exc, "disk-full", "release-rejected", "release-damaged", "blob-damaged", "file-mismatch")
            if exc.kind == "disk-full":
                STEPS_RUN.append("full")
                state = self.state()
                trial = state.get("trial") or {}
                assert state.get("current") == before or (trial.get("release") == state.get("current")
                                                          and trial.get("deadline")), state  # as it was, or a trial
                self.repointed = True  # at most a half-done link: a read reports it, the next change finishes it
                return
        self.settled()

    @rule(verify=st.booleans())
    def read(self, verify: bool) -> None:
        STEPS_RUN.append("read")
        before = tree_digest(Path(self.device.root))
        seen = self.device.observe(verify=verify)
        assert tree_digest(Path(self.device.root)) == before  # (d)
        if self.torn:
            assert seen.state_error
        if verify and not self.torn:
            state = self.state()
            watched = {state.get("current"), state.get("previous"), state.get("committed")} - {None}
            expect = {t.split("/")[0] for t in self.tampered} & watched
            assert expect <= set(seen.damaged), (expect, seen.damaged)  # (c) said by the read

    @precondition(lambda self: not self.torn)
    @rule(index=st.integers(0, COUNT - 1))
    def tamper(self, index: int) -> None:
        STEPS_RUN.append("tamper")
        path = self.directory / "releases" / self.releases[index].id / "runtime.json"
        if path.exists() and f"{self.releases[index].id}/runtime.json" not in self.tampered:  # twice: intact again
            os.chmod(path, 0o644)
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 1
            path.write_bytes(bytes(data))
            self.tampered.add(f"{self.releases[index].id}/runtime.json")

    @precondition(lambda self: not self.torn)
    @rule(index=st.integers(0, COUNT - 1))
    def repoint_the_link_by_hand(self, index: int) -> None:
        STEPS_RUN.append("repoint_the_link_by_hand")
        target = self.directory / "releases" / self.releases[index].id
        if target.is_dir() and (self.directory / "state.json").exists():
            if os.path.islink(self.directory / "current") and os.readlink(self.directory / "current").endswith(
                    target.name):
                return  # already there: nothing to repoint
            STEPS_RUN.append("repointed")
            tmp = self.directory / ".hand"
            os.symlink(f"releases/{target.name}", tmp)
            os.replace(tmp, self.directory / "current")
            self.repointed = True

    @precondition(lambda self: not self.torn and self.had_committed and not self.uninstalled)
    @rule()
    def tear_the_state_file(self) -> None:
        STEPS_RUN.append("tear_the_state_file")
        self.committed_before_tear = self.state().get("committed")
        path = self.directory / "state.json"
        path.write_text(path.read_text()[:30])
        self.torn = True

    @rule()
    def heal(self) -> None:
        STEPS_RUN.append("heal")
        if not (self.directory / "state.json").exists():
            return
        done = self.device.heal(committed=getattr(self, "committed_before_tear", None) if self.torn else None)
        self.tampered -= set(done["healed"])
        if self.torn:
            self.torn, self.repointed = False, False
        self.settled()

    @precondition(lambda self: not self.torn)
    @rule()
    def a_stale_controller_is_refused(self) -> None:
        STEPS_RUN.append("a_stale_controller_is_refused")
        self.fence += 1
        self.device.fence = self.fence
        if not (self.directory / "state.json").exists():
            return
        try:
            self.device.revert(verdict=False, reason="newer controller")  # records the newer token
        except AgentFailed as exc:
            self.allowed(exc, "release-damaged")
        self.settled()
        stale = Device(self.device.transport, self.device.root, sys.executable, DEPLOYMENT)
        stale.fence = self.fence - 1
        try:
            stale.revert(verdict=False, reason="stale controller")
        except AgentFailed as exc:
            assert exc.kind == "fenced", exc.message  # (f)
        else:
            raise AssertionError("a change from an older lock holder was taken")

    # ---------------------------------------------------------------- invariants

    @invariant()
    def a_committed_release_is_never_lost(self) -> None:  # (a), (e)
        if self.torn or not hasattr(self, "device"):
            return
        state = self.state()
        if self.had_committed and not self.uninstalled:
            assert state.get("committed"), state
            assert (self.directory / "releases" / state["committed"]).is_dir()

    @invariant()
    def only_verified_releases_are_committed(self) -> None:  # (b), (e): no side door commits a release
        if self.torn or not hasattr(self, "device"):
            return
        chain = self.state().get("chain") or []
        assert set(chain) <= self.verified, (chain, self.verified)

    @invariant()
    def what_runs_is_committed_or_a_trial_with_its_timer(self) -> None:  # (b)
        if self.torn or self.repointed or not hasattr(self, "device"):
            return
        state = self.state()
        current = state.get("current")
        link = os.readlink(self.directory / "current").split("/")[-1] if os.path.islink(
            self.directory / "current") else None
        assert link == current, (link, current)
        if current is None:
            return
        trial = state.get("trial") or {}
        assert current in state.get("chain", []) or (trial.get("release") == current and trial.get("deadline")), \
            state

    @invariant()
    def files_hash_as_recorded_unless_tampered(self) -> None:  # (c)
        if self.torn or not hasattr(self, "device"):
            return
        agent = agent_module()
        state = self.state()
        for release in {state.get("current"), state.get("previous")} - {None}:
            entry = (state.get("releases") or {}).get(release) or {}
            for name, meta in (entry.get("files") or {}).items():
                if f"{release}/{name}" in self.tampered:
                    continue
                path = self.directory / "releases" / release / name
                assert agent._sha256_file(str(path)) == meta["sha256"], (release, name)


@pytest.fixture(scope="module")
def lifecycle(repo_copy_module: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.integration.test_device_local import releases

    base = tmp_path_factory.mktemp("model")
    generate_key(base / "release_key", "model release key")
    Lifecycle.releases, Lifecycle.key, Lifecycle.base = releases(repo_copy_module, COUNT), base / "release_key", base
    return Lifecycle


@pytest.fixture(scope="module")
def repo_copy_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from labkit.repo import copy_repo

    return copy_repo(tmp_path_factory.mktemp("model-repo") / "repo")


STEPS = int(os.environ.get("EDGEOPS_MODEL_STEPS", "2000"))


def test_the_lifecycle_holds_its_invariants_under_random_steps_and_faults(lifecycle) -> None:  # type: ignore[no-untyped-def]
    per_run = 25
    runner = lifecycle.TestCase
    runner.settings = settings(max_examples=max(1, STEPS * 3 // (per_run * 2)), stateful_step_count=per_run, deadline=None,
                               suppress_health_check=list(HealthCheck), derandomize=True)
    STEPS_RUN.clear()
    runner().runTest()
    steps = [name for name in STEPS_RUN if name not in ("repointed", "killed", "full")]  # markers, not steps
    assert len(steps) >= STEPS, len(steps)  # the steps claimed really ran
    ran = {name: steps.count(name) for name in sorted(set(steps))}
    assert all(ran.get(name, 0) > 0 for name in ("install", "rollback", "tamper", "heal", "tear_the_state_file",
                                                  "the_trial_timer_fires", "a_stale_controller_is_refused")), ran
    faults = {name: STEPS_RUN.count(name) for name in ("killed", "full")}  # the kills and full disks really hit
    assert all(faults.values()), faults
    pairs = sum(1 for a, b in zip(STEPS_RUN, STEPS_RUN[1:]) if a == "repointed" and b == "read")
    print(f"{len(steps)} steps: {ran}; {faults}; a read right after a repointed link: {pairs}")


# ---------------------------------------------------------------- what the machine found, kept as named tests


def machine(lifecycle) -> Lifecycle:  # type: ignore[no-untyped-def]
    state = lifecycle()
    state.enroll()
    return state


def check(state: Lifecycle) -> None:
    state.a_committed_release_is_never_lost()
    state.only_verified_releases_are_committed()
    state.what_runs_is_committed_or_a_trial_with_its_timer()
    state.files_hash_as_recorded_unless_tampered()


def test_found_a_revert_to_a_damaged_committed_release_restores_it_from_the_blobs(lifecycle) -> None:  # type: ignore[no-untyped-def]
    state = machine(lifecycle)
    state.install(0, True)
    state.tamper(0)
    state.install(1, False)  # its verdict fails: the way back is the damaged committed release
    check(state)
    assert state.state()["current"] == lifecycle.releases[0].id and not state.tampered


def test_found_a_rebuilt_state_file_goes_back_to_the_committed_release(lifecycle) -> None:  # type: ignore[no-untyped-def]
    state = machine(lifecycle)
    state.install(0, True)
    state.leave_a_trial(1)
    state.tear_the_state_file()
    state.heal()
    check(state)
    assert state.state()["current"] == lifecycle.releases[0].id


def test_found_a_newer_controllers_token_is_kept_even_when_its_step_fails(lifecycle) -> None:  # type: ignore[no-untyped-def]
    state = machine(lifecycle)
    state.install(0, True)
    state.device.fence = 7
    try:
        state.device.rollback(to="r-not-there", order=state.order())  # a step that fails
    except AgentFailed:
        pass
    stale = Device(state.device.transport, state.device.root, sys.executable, DEPLOYMENT)
    stale.fence = 6
    with pytest.raises(AgentFailed) as refused:
        stale.revert(verdict=False, reason="stale")
    assert refused.value.kind == "fenced"


def test_found_a_full_disk_after_the_switch_leaves_a_trial_with_its_timer(lifecycle) -> None:  # type: ignore[no-untyped-def]
    """ENOSPC at every flush of an install in turn: a named disk-full error, and the device as it was or on a
    trial with its timer armed; a read reports a link the failed step left behind, the next change finishes it."""
    for flush in range(1, 9):
        state = machine(lifecycle)
        state.install(0, True)
        state.the_disk_is_full(1, flush)
        seen = state.device.observe()
        link = os.readlink(state.directory / "current").split("/")[-1]
        assert link == seen.current or seen.half_done, (flush, link, seen.current)
        state.install(2, True)  # the next change settles whatever was left
        check(state)
        assert state.state()["current"] == lifecycle.releases[2].id
