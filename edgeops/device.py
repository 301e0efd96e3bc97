"""Release operations on one device, on top of a transport and the shipped agent.

A push never leaves a device half-updated: files go to ``.staging/``, the
agent checks their sha256 and moves them into ``blobs/``; the release
directory is assembled in staging and renamed into place; ``current`` is
switched by renaming a new symlink over it. Until that rename the previous
release keeps running; after it the new one is complete.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeops.agent import AGENT_FILE
from edgeops.agent.edgeops_gate import patch_bases
from edgeops.blocks import PATCH_FORMAT, PATCH_MIN_BYTES, block_hashes, patch_block
from edgeops.errors import DeviceError, ReadOnlyFiles, RemoteCommandFailed, TransportError
from edgeops.facts import DISK_MARGIN_BYTES, DeviceFacts
from edgeops.release import Release, ReleaseFile
from edgeops.signing import SignedMetadata, SignedOrder
from edgeops.transport.base import AgentSession, CommandResult, FileView, Transport, sha256_of

FACTS_MAX_AGE_S = 600  # a read over SFTP takes the facts the agent kept when they are younger than this


class AgentFailed(DeviceError):
    """The agent ran and reported a failure (kind says which)."""

    def __init__(self, device: str, kind: str, message: str, detail: str = "") -> None:
        self.device, self.kind, self.detail = device, kind, detail or message
        super().__init__(f"{device}: {message}")


TRUST_REFUSALS = ("unsigned", "bad-signature", "expired", "downgrade", "file-mismatch", "metadata-mismatch",
                  "order-mismatch", "replay", "verifier-unsupported")


class ReleaseNotTrusted(AgentFailed):
    """The device refused to run a release (or a new trust root) whose signature or metadata does not hold."""

    def __init__(self, device: str, kind: str, message: str) -> None:
        super().__init__(device, kind, f"refused ({kind}): {message}")


@dataclass(frozen=True)
class DeviceState:
    """What is on the device for one deployment, as read from it."""

    current: str | None = None
    previous: str | None = None
    releases: tuple[str, ...] = ()
    blobs: frozenset[str] | None = frozenset()    # None: unknown (the agent could not run)
    free_bytes: int | None = None
    state: dict[str, Any] = field(default_factory=dict)
    facts: DeviceFacts = field(default_factory=DeviceFacts)
    damaged: dict[str, list[str]] = field(default_factory=dict)   # release -> what is wrong with its files
    half_done: tuple[str, ...] = ()         # what a crash or a cut left half done (a read reports, never finishes)
    state_error: str | None = None          # state.json is corrupt (Damaged: the next apply rebuilds it)

    @classmethod
    def from_agent(cls, doc: dict[str, Any]) -> DeviceState:
        """From the agent's ``state --facts`` document (read over SSH, or published by a pull-mode device)."""
        return cls(current=doc["current"], previous=doc["previous"], releases=tuple(doc["releases"]),
                   blobs=frozenset(doc["blobs"]), free_bytes=doc["free_bytes"], state=doc["state"] or {},
                   facts=DeviceFacts.from_agent(doc["facts"]), damaged=doc.get("damaged") or {},
                   half_done=tuple(doc.get("half_done") or ()), state_error=doc.get("state_error"))

    @property
    def status(self) -> str | None:
        return self.state.get("status")

    @property
    def committed(self) -> str | None:
        """The last release this device committed: the baseline and the way back."""
        return self.state.get("committed")


def _sensor_argument(power_sensor: dict[str, Any] | None) -> str:
    """The agent's ``--power`` argument; also what kept facts are matched by."""
    return json.dumps(power_sensor or {"source": "none"}, sort_keys=True)


def _file_problems(files: dict[str, dict[str, Any]], found: dict[str, tuple[int, int] | None]) -> list[str]:
    """The agent's cheap check of a release's files (``_release_problems``), from sizes and whole-second times."""
    problems = []
    for name, meta in sorted(files.items()):
        seen = found.get(name)
        if seen is None:
            problems.append(f"{name} is missing")
        elif seen[0] != meta["size"]:
            problems.append(f"{name} has {seen[0]} bytes, not {meta['size']}")
        elif "mtime_ns" in meta and seen[1] != meta["mtime_ns"] // 1_000_000_000:
            problems.append(f"{name} was modified after it was installed")
    return problems


@dataclass(frozen=True)
class PushResult:
    bytes_moved: int
    files_moved: int
    files_skipped: int


DEFAULT_TRIAL_WINDOW_S = 1800.0  # a device profile's default (device.trial_window_s)


class Device:
    """One device's ``<root>`` as edgeops lays it out."""

    def __init__(self, transport: Transport, root: str, python: str, deployment: str) -> None:
        self.transport, self.root, self.python, self.deployment = transport, root.rstrip("/"), python, deployment
        self.name = transport.device
        self.agent_path = f"{self.root}/agent/edgeops_agent.py"
        self._agent_bytes = AGENT_FILE.read_bytes()
        self.agent_sha256 = sha256_of(self._agent_bytes)
        self._session: AgentSession | None = None
        self.fence: int | None = None  # the fleet lock's fencing token: a device refuses changes from older holders

    # ---------------------------------------------------------------- agent

    def agent(self, *args: str, timeout: float | None = None, agent_path: str | None = None,
              inline: bool = False) -> dict[str, Any]:
        """Run an agent command; return its JSON document or raise AgentFailed with its message.

        ``inline`` passes the agent's source with ``python -c`` instead of running the installed
        file: reading commands then work, in this controller's version, on a device that has no
        agent yet or an older one, and nothing is installed on it.
        """
        if self._session is not None and not inline and agent_path is None:
            try:
                answer = self._session.call(json.dumps(list(args)), timeout, what=args[0])
            except TransportError:
                self._session = None  # broken: later commands run one by one
                raise
            result = CommandResult([self.python, self.agent_path, *args], 0, answer, "")
        else:
            program = ["-c", self._agent_bytes.decode()] if inline else [agent_path or self.agent_path]
            argv = [self.python, *program, *args]
            try:
                result = self.transport.run(argv, timeout=timeout, check=False)
            except RemoteCommandFailed as exc:  # pragma: no cover - check=False
                raise AgentFailed(self.name, "command-failed", exc.message) from None
        lines = result.stdout.strip().splitlines()
        try:
            document = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            document = None
        if not isinstance(document, dict):
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise AgentFailed(self.name, "agent-broken", f"agent exited {result.exit_status} without a JSON "
                                                        f"document: {tail}", detail=f"exit {result.exit_status}: {tail}")
        if not document.get("ok"):
            kind, message = str(document.get("error")), str(document.get("message"))
            if kind == "restricted" and inline:  # a restricted deploy key runs only the installed agent
                return self.agent(*args, timeout=timeout)
            if kind in TRUST_REFUSALS:
                raise ReleaseNotTrusted(self.name, kind, message)
            raise AgentFailed(self.name, kind, message)
        return document

    @contextmanager
    def session(self) -> Iterator[Device]:
        """Run the agent commands of the block in one agent process over one channel (``serve``): the device's
        login shell and Python start once. Transports without sessions run each command on its own."""
        opener = getattr(self.transport, "open_session", None)
        if opener is None or self._session is not None:
            yield self
            return
        self.ensure_agent()
        self._session = opener([self.python, self.agent_path, "serve"])
        try:
            yield self
        finally:
            session, self._session = self._session, None
            if session is not None:
                session.close()

    def _common(self) -> list[str]:
        return ["--root", self.root, "--deployment", self.deployment]

    def _changing(self) -> list[str]:
        """The arguments of a command that changes the device: the common ones and the lock's fencing token."""
        return self._common() + (["--fence", str(self.fence)] if self.fence is not None else [])

    def ensure_agent(self) -> bool:
        """Ship the agent when the device lacks it or has another version; True if shipped. A device whose deploy
        key is restricted (read-only files) keeps the agent its administrator installed: a different one is
        refused here, before any session, never run."""
        installed = self.transport.read_bytes(self.agent_path)
        if installed == self._agent_bytes:
            return False
        installer = getattr(self.transport, "install", None)
        if installer is not None:  # over SFTP alone: no login shell, no Python start
            try:
                installer(self._agent_bytes, self.agent_path)
            except ReadOnlyFiles:
                found = f"sha256 {sha256_of(installed)[:12]}" if installed is not None else "none"
                raise AgentFailed(self.name, "agent-outdated", f"the device's agent ({found}) is not this "
                                  f"controller's (sha256 {self.agent_sha256[:12]}) and its restricted deploy key "
                                  "may not replace it", detail="restricted") from None
            return True
        staged = f"{self.root}/.staging/agent-{uuid.uuid4().hex[:8]}.py"
        self.transport.run(["mkdir", "-p", f"{self.root}/.staging", f"{self.root}/agent"])
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "edgeops_agent.py"
            local.write_bytes(self._agent_bytes)
            self.transport.put(local, staged)
        self.agent("install-agent", "--root", self.root, "--staged", staged, "--sha256", self.agent_sha256,
                   agent_path=staged)
        return True

    # ---------------------------------------------------------------- observe

    def observe(self, power_sensor: dict[str, Any] | None = None, verify: bool = False) -> DeviceState:
        """The deployment's state on the device and the device's facts: from its files alone when they can
        say it (``_observe_files``), else in one agent command.

        Changes nothing the controller asked for; the agent may finish a half-done step of its own
        first (an interrupted switch, an expired trial) and says so in ``repaired``. A device whose
        interpreter cannot run the agent still reports why (as its facts) and, when state.json is
        readable over SFTP, what it runs.
        """
        sensor = _sensor_argument(power_sensor)
        if not verify:
            found = self._observe_files(sensor)
            if found is not None:
                return found
        try:
            # the installed agent when it is this controller's (a restricted key runs nothing else), else this
            # controller's own source, inline: a read installs nothing
            inline = self.transport.read_bytes(self.agent_path) != self._agent_bytes
            doc = self.agent("state", *self._common(), "--facts", "--power", sensor, *(["--verify"] if verify else []),
                             inline=inline)
        except AgentFailed as exc:
            if exc.kind != "agent-broken":
                raise
            raw = self.transport.read_bytes(f"{self.root}/deployments/{self.deployment}/state.json")
            state = json.loads(raw) if raw else {}
            return DeviceState(current=state.get("current"), previous=state.get("previous"), blobs=None,
                               state=state, facts=DeviceFacts.unusable_python(exc.detail))
        return DeviceState.from_agent(doc)

    def _observe_files(self, sensor: str) -> DeviceState | None:
        """The state read from the device's files alone (SFTP: no login shell, no Python), or None when only
        the agent can say: no such transport, a trial running (it may have expired), the link and the state
        disagreeing (a switch to finish), no fresh facts for this power sensor, no free-space answer.

        The file check is the agent's cheap one (sizes and times, times to the second that SFTP gives: the
        agent dates the files it installs a second back, so a write even in the install's second shows);
        ``status --verify`` hashes through the agent.
        """
        look = getattr(self.transport, "look", None)
        if look is None:
            return None
        directory = f"{self.root}/deployments/{self.deployment}"
        state_file, facts_file = f"{directory}/state.json", f"{self.root}/agent/facts.json"
        trust_file = f"{self.root}/trust/allowed_signers"  # read every time: a changed trust root shows at once
        blobs, releases = f"{self.root}/blobs/sha256", f"{directory}/releases"
        view: FileView = look([state_file, facts_file, trust_file], [blobs, releases], [], [f"{directory}/current"],
                              self.root)
        try:
            state = json.loads(view.files[state_file] or b"null")
            kept = json.loads(view.files[facts_file] or b"null")
        except ValueError:
            return None
        link = view.links[f"{directory}/current"]
        current = state.get("current") if state else None
        fresh = isinstance(kept, dict) and kept.get("power") == sensor and \
            0 <= time.time() - float(kept.get("at") or 0) < FACTS_MAX_AGE_S
        if (state is None and link is not None) or (state or {}).get("trial") or not fresh or \
                (link and link.rsplit("/", 1)[-1]) != current or view.free_bytes is None:
            return None
        damaged: dict[str, list[str]] = {}
        if current is not None:
            files = (state["releases"].get(current) or {}).get("files") or {}
            if current not in (view.listings[releases] or []):
                damaged[current] = ["the release directory is missing"]
            else:
                paths = {name: f"{releases}/{current}/{name}" for name in files}
                stats = look([], [], list(paths.values()), [], self.root).stats
                if problems := _file_problems(files, {name: stats.get(path) for name, path in paths.items()}):
                    damaged[current] = problems
        signers = view.files[trust_file]
        facts = replace(DeviceFacts.from_agent(kept["facts"]), free_bytes=view.free_bytes, enrolled=signers is not None,
                        signers_sha256=sha256_of(signers) if signers is not None else None)
        return DeviceState(current=current, previous=(state or {}).get("previous"),
                           releases=tuple(view.listings[releases] or ()),
                           blobs=frozenset(view.listings[blobs] or ()), free_bytes=view.free_bytes,
                           state=state or {}, facts=facts, damaged=damaged)

    # ---------------------------------------------------------------- push

    def push(self, release: Release, progress: Callable[[int], None] | None = None,
             timeout: float | None = None, repair: bool = False) -> PushResult:
        """Make ``releases/<id>`` complete on the device (does not switch to it).

        ``repair``: the release is there but damaged: send what its damaged files need and restore them.
        A blob found damaged on the device is dropped there and sent again (once).
        """
        self.ensure_agent()
        with self.session():  # uploads go through the agent: SFTP may be read-only
            for attempt in (1, 2):
                try:
                    return self._push_once(release, progress, timeout, repair)
                except AgentFailed as exc:
                    if exc.kind != "blob-damaged" or attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def _push_once(self, release: Release, progress: Callable[[int], None] | None, timeout: float | None,
                   repair: bool) -> PushResult:
        observed = self.agent("prepare", *self._common(), timeout=timeout)  # also clears interrupted uploads
        if release.id in observed["releases"] and not repair:
            return PushResult(0, 0, len(release.files))
        needed = [f for f in release.files if f.sha256 not in set(observed["blobs"])]
        need_bytes = sum(f.size for f in needed) + sum(f.size for f in release.files)  # blobs + the release's copies
        if need_bytes + DISK_MARGIN_BYTES > observed["free_bytes"]:
            raise DeviceError(f"{self.name}: not enough free space under {self.root}: need "
                              f"{need_bytes + DISK_MARGIN_BYTES} bytes, {observed['free_bytes']} free; "
                              "the previous release is untouched",
                              hint="free space on the device or lower device.keep_releases")
        moved, staged = 0, {}
        parts = observed.get("parts") or {}
        bases: dict[str, tuple[str, int]] = patch_bases(observed)
        with tempfile.TemporaryDirectory() as tmp:
            for item in needed:
                local = self._local_copy(item, Path(tmp))
                base = bases.get(item.name)
                if base is not None and base[1] == item.size and item.size >= PATCH_MIN_BYTES:
                    found = self._send_patch(local, item.sha256, base[0], Path(tmp), timeout)
                    if found is not None:
                        staged[found[0]] = item.sha256
                        moved += found[1]
                        continue
                report = (lambda done, total: progress(done)) if progress else None
                if self._session is not None:  # through the agent: SFTP may be read-only
                    name = f"{item.sha256}.part"  # named by its content: a cut upload resumes from its part
                    have = int(parts.get(name, 0))
                    remote, sent = self._upload(local, name, item.sha256, timeout, report,
                                                have if 0 < have < item.size else 0)
                    moved += sent
                else:
                    name = f"{item.sha256}.{uuid.uuid4().hex[:8]}.part"
                    remote = f"{self.root}/.staging/{name}"
                    moved += self.transport.put(local, remote, progress=report)
                staged[remote] = item.sha256
        files = json.dumps({f.name: f.sha256 for f in release.files}, sort_keys=True)
        self.agent("assemble", *self._changing(), "--release", release.id, "--files", files,
                   "--staged", json.dumps(staged, sort_keys=True), *(["--repair"] if repair else []), timeout=timeout)
        return PushResult(moved, len(needed), len(release.files) - len(needed))

    def _send_patch(self, local: Path, sha256: str, base: str, tmp: Path,
                    timeout: float | None) -> tuple[str, int] | None:
        """Send only the blocks of ``local`` that differ from the device's blob ``base`` (same size); the agent
        rebuilds the file and refuses it unless it hashes to ``sha256``. (staged path, bytes sent), or None when
        a patch would not save much or the device refused it (the whole file is sent then)."""
        size = local.stat().st_size
        block = patch_block(size)
        theirs = self.agent("blocks", "--root", self.root, "--blob", base, "--block", str(block),
                            timeout=timeout)["hashes"]
        data = local.read_bytes()
        changed = [i for i, (mine, held) in enumerate(zip(block_hashes(data, block), theirs)) if mine != held]
        if len(theirs) != (size + block - 1) // block or len(changed) * block > size // 2:
            return None
        header = {"format": PATCH_FORMAT, "base": base, "target": sha256, "size": size, "block": block,
                  "blocks": changed}
        patch = tmp / f"{sha256}.patch"
        with patch.open("wb") as out:
            out.write(json.dumps(header).encode() + b"\n")
            for index in changed:
                out.write(data[index * block:(index + 1) * block])
        remote = self._stage(patch, f"{sha256[:16]}.patch", timeout)
        try:
            rebuilt = self.agent("patch", "--root", self.root, "--base", base, "--patch", remote, "--sha256", sha256,
                                 timeout=timeout)
        except AgentFailed as exc:
            if exc.kind != "patch-mismatch":
                raise
            return None
        return str(rebuilt["path"]), patch.stat().st_size

    def _stage(self, local: Path, name: str, timeout: float | None) -> str:
        """A small file into <root>/.staging for the next agent command: over the agent session when there is
        one (SFTP may be read-only), else over the transport; where it landed."""
        if self._session is not None:
            return self._receive(local, name, hashlib.sha256(local.read_bytes()).hexdigest(), timeout, None)
        stem, _, suffix = name.rpartition(".")
        remote = f"{self.root}/.staging/{stem}-{uuid.uuid4().hex[:8]}.{suffix}"
        self.transport.run(["mkdir", "-p", f"{self.root}/.staging"])
        self.transport.put(local, remote)
        return remote

    def _upload(self, local: Path, name: str, sha256: str, timeout: float | None,
                progress: Callable[[int, int], None] | None, offset: int) -> tuple[str, int]:
        """(where it landed, bytes sent): from ``offset`` when the device holds the part up to there (checked
        by the hash of that part, then of the whole), else whole."""
        if offset:
            with local.open("rb") as handle:
                prefix = hashlib.sha256(handle.read(offset)).hexdigest()
            try:
                return self._receive(local, name, sha256, timeout, progress, offset, prefix), \
                    local.stat().st_size - offset
            except AgentFailed as exc:
                if exc.kind != "resume-mismatch":
                    raise
        return self._receive(local, name, sha256, timeout, progress), local.stat().st_size

    def _receive(self, local: Path, name: str, sha256: str, timeout: float | None,
                 progress: Callable[[int, int], None] | None, offset: int = 0, prefix: str | None = None) -> str:
        """Upload one file over the agent session (``receive``); where it landed, its hash checked."""
        assert self._session is not None
        size = local.stat().st_size
        request = json.dumps(["receive", "--root", self.root, "--name", name, "--size", str(size - offset),
                              *(["--offset", str(offset), "--prefix-sha256", prefix or ""] if offset else [])])
        try:
            answer = self._session.call(request, timeout, what=f"upload of {local.name}", payload=local,
                                        progress=progress, payload_offset=offset)
        except TransportError:
            self._session = None
            raise
        document = json.loads(answer) if answer.strip().startswith("{") else {}
        if not document.get("ok"):
            raise AgentFailed(self.name, str(document.get("error") or "agent-broken"),
                              str(document.get("message") or f"upload of {local.name} failed"))
        if document.get("sha256") != sha256:
            raise AgentFailed(self.name, "checksum-mismatch", f"{local.name} arrived with sha256 "
                                                              f"{document.get('sha256')}, not {sha256}")
        sent = getattr(self.transport, "bytes_sent", None)
        if isinstance(sent, int):
            self.transport.bytes_sent = sent + int(document["received"])  # type: ignore[attr-defined]
        return str(document["path"])

    @staticmethod
    def _local_copy(item: ReleaseFile, tmp: Path) -> Path:
        if item.local is not None:
            return item.local
        path = tmp / item.name
        path.write_bytes(item.content or b"")
        return path

    # ---------------------------------------------------------------- switch, verify, record

    def activate(self, release_id: str, by: str = "edgeops", action: str = "activate",
                 allow_rejected: bool = False, trial_window_s: float = DEFAULT_TRIAL_WINDOW_S,
                 timeout: float | None = None, signed: SignedMetadata | None = None) -> dict[str, Any]:
        """Run ``release_id`` as a trial release (``action="activate"``); see the agent's ``switch``.

        The device reverts by itself unless ``record`` commits the release within ``trial_window_s`` (a
        release this device committed before, rolled back to, is not a trial).
        """
        extra = ["--allow-rejected"] if allow_rejected else []
        extra += ["--trial-window", f"{trial_window_s:g}"]
        extra += signed.as_args() if signed else []
        return self.agent("switch", *self._changing(), "--release", release_id, "--action", action, "--by", by, *extra,
                          timeout=timeout)

    def enroll(self, signers: bytes, signature: str | None = None, identity: str | None = None) -> dict[str, Any]:
        """Install the trust root of signed releases; replacing one needs ``signature`` by a key it trusts.
        ``identity`` (fleet/device): the name the device's signed orders must carry, kept from the first time."""
        self.ensure_agent()
        extra = ["--signature", base64.b64encode(signature.encode()).decode()] if signature else []
        extra += ["--identity", identity] if identity else []
        return self.agent("enroll", "--root", self.root, "--signers", base64.b64encode(signers).decode(), *extra)

    def revert(self, by: str = "edgeops", verdict: bool = True, reason: str = "") -> dict[str, Any]:
        """Leave the trial release for the last committed one (or none); moves no bytes.

        ``verdict``: it failed verification and is rejected; otherwise (an error) it is only aborted.
        """
        extra = ([] if verdict else ["--aborted"]) + (["--reason", reason] if reason else [])
        return self.agent("switch", *self._changing(), "--action", "revert", "--by", by, *extra)

    def rollback(self, to: str | None = None, by: str = "edgeops", allow_rejected: bool = False,
                 trial_window_s: float = DEFAULT_TRIAL_WINDOW_S,
                 order: Callable[[str, str | None], SignedOrder | None] = lambda action, release: None,
                 ) -> dict[str, Any]:
        """Back to an earlier committed release (default: the previous one); moves no bytes. A rejected release
        named with ``allow_rejected`` runs as a trial instead (its signature checked on an enrolled device).
        ``order(action, release)``: the signed order an enrolled device needs for the change."""
        target = to or self.observe().previous
        if not target:
            raise DeviceError(f"{self.name}: no earlier committed release to roll back to")
        if target == "none":
            return self.uninstall(by, order("uninstall", None))
        signed = order("rollback", target)
        extra = (["--allow-rejected"] if allow_rejected else []) + (signed.as_args() if signed else [])
        return self.agent("switch", *self._changing(), "--release", target, "--action", "rollback", "--by", by,
                          "--trial-window", f"{trial_window_s:g}", *extra)

    def uninstall(self, by: str = "edgeops", order: SignedOrder | None = None) -> dict[str, Any]:
        """No release runs any more (only when the user asks for it)."""
        return self.agent("switch", *self._changing(), "--action", "uninstall", "--by", by,
                          *(order.as_args() if order else []))

    def verify(self, release_id: str, baseline: str | None, runs: int, block: int, timeout: float | None,
               golden: bool = True) -> dict[str, Any]:
        """The agent's measurement of a release, interleaved with ``baseline`` when given."""
        releases = f"{self.root}/deployments/{self.deployment}/releases"
        args = ["bench", f"{releases}/{release_id}", "--runs", str(runs), "--block", str(block)]
        if baseline:
            args += ["--compare", f"{releases}/{baseline}"]
        if golden:
            args.append("--golden")
        return self.agent(*args, timeout=timeout)

    def bench_candidates(self, release_ids: list[str], runs: int, block: int,
                         timeout: float | None) -> dict[str, Any]:
        """The agent's interleaved measurement of several releases on the device (sides a, b, c, ... in the
        order given); what runs is not touched."""
        releases = f"{self.root}/deployments/{self.deployment}/releases"
        first, second, *more = [f"{releases}/{r}" for r in release_ids]
        args = ["bench", first, "--runs", str(runs), "--block", str(block), "--compare", second]
        for path in more:
            args += ["--also", path]
        return self.agent(*args, timeout=timeout)

    def record(self, update: dict[str, Any], by: str = "edgeops", release: str | None = None) -> None:
        """Store a verdict; with ``release``, only while that release still runs (else AgentFailed)."""
        named = ["--release", release] if release else []
        self.agent("record", *self._changing(), "--json", json.dumps(update, sort_keys=True), "--by", by, *named)

    def keep_facts(self, power_sensor: dict[str, Any] | None) -> None:
        """Have the agent gather its facts and keep them (``agent/facts.json``), so the next reads can be
        file reads; in a session this costs no new process."""
        self.agent("state", *self._common(), "--facts", "--keep", "--power", _sensor_argument(power_sensor))

    def heal(self, committed: str | None = None, by: str = "edgeops") -> dict[str, Any]:
        """Restore damaged files of the running, committed and previous releases from the device's blobs (the
        recorded bytes, never new ones) and rebuild a corrupt state.json (``committed``: the ledger's word)."""
        extra = ["--committed", committed] if committed else []
        return self.agent("heal", *self._changing(), "--by", by, *extra)

    def prune(self, keep: int) -> dict[str, Any]:
        return self.agent("prune", *self._changing(), "--keep", str(keep))

    # ---------------------------------------------------------------- federated adaptation

    def adapt_train(self, tensors: Path, spec: dict[str, Any], timeout: float | None = None,
                    order: SignedOrder | None = None) -> dict[str, Any]:
        """One local step of a federated round: send the round's starting tensors, have the agent train on the
        device's own samples, and return what it reports (the clipped update and counts, nothing else).
        Changes nothing the device runs. ``order``: the signed training order an enrolled device needs."""
        self.ensure_agent()
        digest = hashlib.sha256(tensors.read_bytes()).hexdigest()
        with self.session():
            remote = self._stage(tensors, f"adapt-{digest[:16]}.npz", timeout)
            return self.agent("adapt-train", *self._common(), "--tensors", remote, "--spec",
                              json.dumps(spec, sort_keys=True), *(order.as_args() if order else []), timeout=timeout)
