"""SSH transport over paramiko.

Secure by default: host keys are checked against the fleet's known_hosts and
unknown keys are refused unless the fleet opts into trust-on-first-use (which
records the key and says so). Every remote argument is quoted with
``shlex.join``. Failures are named: unreachable, connect timeout, auth refused,
host key unknown/changed, command timeout, remote command failed.
"""

from __future__ import annotations

import errno
import os
import shlex
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import paramiko

from edgeops.errors import (
    AuthRefused,
    CommandTimeout,
    ConnectTimeout,
    HostKeyChanged,
    HostKeyUnknown,
    HostUnreachable,
    IdentityFileMissing,
    ReadOnlyFiles,
    RemoteCommandFailed,
    TransportError,
)
from edgeops.manifest.models import SSHSettings
from edgeops.transport.base import CommandResult, FileView, Progress

# Printed before each command: what a device's shell startup files print before it is not the command's output.
OUTPUT_MARKER = "--edgeops-output-begins--"


@dataclass(frozen=True)
class SSHTarget:
    """Where and how to connect to one device (paths already resolved)."""

    device: str
    host: str
    port: int = 22
    user: str = "root"
    identity_file: str | None = None
    use_agent: bool = False
    known_hosts: str | None = None
    trust_on_first_use: bool = False
    jump_host: str | None = None           # user@host:port
    use_ssh_config: bool = True
    connect_timeout_s: float = 10
    command_timeout_s: float = 300
    keepalive_s: float = 15
    stall_timeout_s: float = 60
    connect_retries: int = 2


class _Policy(paramiko.MissingHostKeyPolicy):
    """Refuse unknown keys, or record them when the fleet opted into trust-on-first-use."""

    def __init__(self, target: SSHTarget, known_hosts: Path) -> None:
        self.target, self.known_hosts = target, known_hosts
        self.recorded: list[str] = []

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        fingerprint = f"{key.get_name()} SHA256:{_fingerprint(key)}"
        if not self.target.trust_on_first_use:
            raise HostKeyUnknown(self.target.device, f"host key of {hostname} ({fingerprint}) is not in "
                                 f"{self.known_hosts}; refusing to connect",
                                 hint="add the key to known_hosts (ssh-keyscan, checked out of band) or set "
                                      "ssh.trust_on_first_use: true for this fleet")
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with self.known_hosts.open("a") as handle:
            handle.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        self.recorded.append(f"{hostname} {fingerprint}")


def _fingerprint(key: paramiko.PKey) -> str:
    import base64
    import hashlib

    return base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def _host_entry(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _after_marker(output: bytearray) -> str:
    text = output.decode(errors="replace")
    _, marked, after = text.partition(OUTPUT_MARKER + "\n")
    return after if marked else text


class SSHTransport:
    """One reusable SSH connection (commands + SFTP) to one device."""

    def __init__(self, target: SSHTarget) -> None:
        self.target = target
        self.device = target.device
        self.bytes_sent = 0
        self.notices: list[str] = []
        self._jump: paramiko.SSHClient | None = None
        self._client = self._connect_with_retries()
        self._sftp: paramiko.SFTPClient | None = None

    # ---------------------------------------------------------------- connecting

    def _resolved(self) -> SSHTarget:
        t = self.target
        if not t.use_ssh_config:
            return t
        path = Path("~/.ssh/config").expanduser()
        if not path.is_file():
            return t
        entry = paramiko.SSHConfig.from_path(str(path)).lookup(t.host)
        identity = t.identity_file or (entry.get("identityfile") or [None])[0]
        return SSHTarget(**{**t.__dict__, "host": entry.get("hostname", t.host),
                            "port": int(entry.get("port", t.port)) if t.port == 22 else t.port,
                            "user": entry.get("user", t.user) if t.user == "root" else t.user,
                            "identity_file": identity, "jump_host": t.jump_host or entry.get("proxyjump")})

    def _connect_with_retries(self) -> paramiko.SSHClient:
        attempts = self.target.connect_retries + 1
        for attempt in range(attempts):
            try:
                return self._connect()
            except (HostUnreachable, ConnectTimeout):
                if attempt == attempts - 1:
                    raise
                time.sleep(min(0.5 * 2 ** attempt, 4))  # transient: back off and try again
        raise AssertionError("unreachable")

    def _client_for(self, target: SSHTarget) -> tuple[paramiko.SSHClient, _Policy]:
        client = paramiko.SSHClient()
        known = Path(target.known_hosts).expanduser() if target.known_hosts else Path("~/.ssh/known_hosts").expanduser()
        if known.is_file():
            client.load_host_keys(str(known))
        policy = _Policy(target, known)
        client.set_missing_host_key_policy(policy)
        return client, policy

    def _connect(self) -> paramiko.SSHClient:
        t = self._resolved()
        if t.identity_file and not Path(t.identity_file).expanduser().is_file():
            raise IdentityFileMissing(self.device, f"identity file {t.identity_file} does not exist; nothing was "
                                      f"sent to {t.host}:{t.port}",
                                      hint="fix ssh.identity_file in the fleet (a name in the secrets directory), or run "
                                           "`edgeops lab up` for a lab fleet")
        sock = None
        if t.jump_host:
            sock = self._open_jump(t)
        client, policy = self._client_for(t)
        started = time.monotonic()
        try:
            client.connect(t.host, port=t.port, username=t.user, key_filename=t.identity_file,
                           allow_agent=t.use_agent, look_for_keys=False, timeout=t.connect_timeout_s,
                           banner_timeout=t.connect_timeout_s, auth_timeout=t.connect_timeout_s, sock=sock)
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyChanged(self.device, f"host key of {_host_entry(t.host, t.port)} changed: got "
                                 f"{exc.key.get_name()} SHA256:{_fingerprint(exc.key)}, known_hosts has "
                                 f"SHA256:{_fingerprint(exc.expected_key)}; refusing to connect",
                                 hint="if the device was re-imaged, remove the old line from known_hosts; "
                                      "otherwise treat this as a possible attack") from None
        except (HostKeyUnknown, HostKeyChanged):
            client.close()
            raise
        except paramiko.AuthenticationException as exc:
            client.close()
            raise AuthRefused(self.device, f"{t.user}@{t.host}:{t.port} refused our key(s) ({exc})",
                              hint="check ssh.identity_file / ssh-agent and the device's authorized_keys") from None
        except (socket.timeout, TimeoutError):
            client.close()
            raise ConnectTimeout(self.device, f"no answer from {t.host}:{t.port} within {t.connect_timeout_s:g} s") from None
        except paramiko.ssh_exception.NoValidConnectionsError as exc:
            client.close()
            raise HostUnreachable(self.device, f"cannot connect to {t.host}:{t.port}: connection refused "
                                  f"({len(exc.errors)} address(es) tried)") from None
        except socket.gaierror as exc:
            client.close()
            raise HostUnreachable(self.device, f"cannot resolve {t.host}: {exc.strerror}") from None
        except EOFError:
            client.close()
            raise HostUnreachable(self.device, f"{t.host}:{t.port} closed the connection during the SSH handshake "
                                               "(sshd stopped, a full MaxStartups, or a cut)") from None
        except paramiko.SSHException as exc:
            client.close()
            # a server that accepts TCP but never speaks SSH ends in a banner error after the timeout
            if "timeout" in str(exc).lower() or time.monotonic() - started >= t.connect_timeout_s * 0.9:
                raise ConnectTimeout(self.device, f"SSH handshake with {t.host}:{t.port} timed out") from None
            raise HostUnreachable(self.device, f"SSH handshake with {t.host}:{t.port} failed: {exc}") from None
        except OSError as exc:
            client.close()
            if exc.errno in (errno.ETIMEDOUT,):
                raise ConnectTimeout(self.device, f"connecting to {t.host}:{t.port} timed out") from None
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):  # TCP was up: the peer cut the key exchange short
                raise HostUnreachable(self.device, f"{t.host}:{t.port} reset the connection during the SSH handshake "
                                                   "(sshd stopped, a full MaxStartups, or a cut)") from None
            raise HostUnreachable(self.device, f"cannot connect to {t.host}:{t.port}: {exc.strerror or exc}") from None
        if policy.recorded:
            self.notices.append(f"trust on first use: recorded {', '.join(policy.recorded)} in {policy.known_hosts}")
        transport = client.get_transport()
        if transport and t.keepalive_s:
            transport.set_keepalive(int(t.keepalive_s))
        if transport and isinstance(transport.sock, socket.socket) and hasattr(socket, "TCP_USER_TIMEOUT"):
            # a lost link leaves sent data unacknowledged: the kernel gives up after stall_timeout_s instead of
            # retrying for a quarter of an hour, so the device is Unreachable and the next apply resumes
            transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(t.stall_timeout_s * 1000))
        return client

    def _open_jump(self, t: SSHTarget) -> paramiko.Channel:
        spec = t.jump_host or ""
        user, _, hostport = spec.rpartition("@")
        host, _, port = hostport.partition(":")
        jump_target = SSHTarget(**{**t.__dict__, "device": f"{self.device} (via jump host {host})", "host": host,
                                   "port": int(port or 22), "user": user or t.user, "jump_host": None})
        jump = SSHTransport(jump_target)
        self._jump = jump._client
        transport = self._jump.get_transport()
        assert transport is not None
        try:
            return transport.open_channel("direct-tcpip", (t.host, t.port), ("127.0.0.1", 0),
                                          timeout=t.connect_timeout_s)
        except (paramiko.ChannelException, paramiko.SSHException, OSError) as exc:
            raise HostUnreachable(self.device, f"jump host {host} cannot reach {t.host}:{t.port}: {exc}") from None

    # ---------------------------------------------------------------- commands

    def run(self, argv: list[str], timeout: float | None = None, check: bool = True) -> CommandResult:
        limit = timeout or self.target.command_timeout_s
        command = f"echo {OUTPUT_MARKER}; echo {OUTPUT_MARKER} >&2; exec {shlex.join(argv)}"
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise HostUnreachable(self.device, "the SSH connection dropped")
        try:
            channel = transport.open_session(timeout=self.target.connect_timeout_s)
            channel.settimeout(0.2)
            channel.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise HostUnreachable(self.device, f"cannot start `{argv[0]}`: the connection failed "
                                  f"({type(exc).__name__}: {exc or 'closed'})") from None
        stdout, stderr = bytearray(), bytearray()
        deadline = time.monotonic() + limit
        try:
            while True:
                progressed = False
                while channel.recv_ready():
                    stdout += channel.recv(65536)
                    progressed = True
                while channel.recv_stderr_ready():
                    stderr += channel.recv_stderr(65536)
                    progressed = True
                if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
                    break
                if time.monotonic() > deadline:
                    raise CommandTimeout(self.device, f"`{argv[0]}` did not finish in {limit:g} s")
                if channel.closed and not progressed:
                    break
                if not progressed:
                    time.sleep(0.002)
            status = channel.recv_exit_status()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise HostUnreachable(self.device, f"the connection failed while `{argv[0]}` ran "
                                  f"({type(exc).__name__}: {exc or 'closed'})") from None
        finally:
            channel.close()
        result = CommandResult(argv, status, _after_marker(stdout), _after_marker(stderr))
        if status == -1:
            raise HostUnreachable(self.device, f"the connection dropped while `{argv[0]}` ran")
        if check and status != 0:
            raise RemoteCommandFailed(self.device, argv, status, result.stderr)
        return result

    def open_session(self, argv: list[str]) -> SSHSession:
        """Start ``argv`` (a line-oriented server, the agent's ``serve``) on one channel and keep it open."""
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise HostUnreachable(self.device, "the SSH connection dropped")
        try:
            channel = transport.open_session(timeout=self.target.connect_timeout_s)
            channel.exec_command(f"echo {OUTPUT_MARKER}; exec {shlex.join(argv)}")
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise HostUnreachable(self.device, f"cannot start `{argv[0]}`: the connection failed "
                                  f"({type(exc).__name__}: {exc or 'closed'})") from None
        return SSHSession(self.device, channel, argv, self.target.command_timeout_s, self.target.stall_timeout_s)

    # ---------------------------------------------------------------- files

    def _connected(self) -> bool:
        transport = self._client.get_transport()
        return transport is not None and transport.is_active()

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = self._client.open_sftp()
                channel = self._sftp.get_channel()
                if channel is not None:
                    channel.settimeout(self.target.command_timeout_s)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise HostUnreachable(self.device, f"cannot open SFTP: {exc}") from None
        return self._sftp

    def put(self, local: Path, remote: str, progress: Progress | None = None) -> int:
        try:
            attrs = self._sftp_client().put(str(local), remote, callback=progress, confirm=True)
        except (socket.timeout, TimeoutError):
            raise CommandTimeout(self.device, f"upload of {local.name} stalled") from None
        except OSError as exc:
            if isinstance(exc, IOError) and exc.errno == errno.ENOSPC or "No space" in str(exc):
                raise TransportError(self.device, f"device disk full while writing {remote}") from None
            if not self._connected():
                raise HostUnreachable(self.device, f"connection lost during upload of {local.name}: {exc}") from None
            raise TransportError(self.device, f"upload to {remote} failed: {exc}") from None
        except (paramiko.SSHException, EOFError) as exc:
            raise HostUnreachable(self.device, f"connection lost during upload of {local.name}: {exc}") from None
        size = int(attrs.st_size or 0)
        self.bytes_sent += size
        return size

    def get(self, remote: str, local: Path) -> int:
        try:
            self._sftp_client().get(remote, str(local))
        except (paramiko.SSHException, EOFError) as exc:
            raise HostUnreachable(self.device, f"connection lost during download of {remote}: {exc}") from None
        except OSError as exc:
            raise TransportError(self.device, f"download of {remote} failed: {exc}") from None
        return local.stat().st_size

    def install(self, data: bytes, remote: str) -> None:
        """Put a small file at ``remote`` atomically over SFTP alone (no shell, no process on the device):
        the directories made, a temporary name beside it written and read back, then renamed over it."""
        sftp = self._sftp_client()
        parent, _, name = remote.rpartition("/")
        temporary = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}"
        try:
            built = ""
            for part in parent.strip("/").split("/"):
                built += "/" + part
                try:
                    sftp.stat(built)
                except FileNotFoundError:
                    sftp.mkdir(built)
            with sftp.open(temporary, "wb") as handle:
                handle.write(data)
            with sftp.open(temporary, "rb") as handle:
                if handle.read() != data:
                    raise TransportError(self.device, f"{remote} did not read back as written")
            sftp.posix_rename(temporary, remote)
        except (paramiko.SSHException, EOFError) as exc:
            raise HostUnreachable(self.device, f"connection lost while installing {remote}: {exc}") from None
        except PermissionError:
            raise ReadOnlyFiles(self.device, f"cannot install {remote}: the device's SFTP is read-only for this "
                                             "key") from None
        except OSError as exc:
            raise TransportError(self.device, f"cannot install {remote}: {exc}") from None
        self.bytes_sent += len(data)

    def look(self, reads: list[str], lists: list[str], stats: list[str], links: list[str],
             free_at: str) -> FileView:
        """Files, directory listings, sizes and times, link targets and free space, over SFTP alone (no shell,
        no process on the device). What is missing is None."""
        sftp = self._sftp_client()
        view = FileView()
        try:
            for path in reads:
                try:
                    with sftp.open(path, "rb") as handle:
                        view.files[path] = handle.read()
                except FileNotFoundError:
                    view.files[path] = None
            for path in lists:
                try:
                    view.listings[path] = sorted(sftp.listdir(path))
                except FileNotFoundError:
                    view.listings[path] = None
            for path in stats:
                try:
                    found = sftp.stat(path)
                    view.stats[path] = (int(found.st_size or 0), int(found.st_mtime or 0))
                except FileNotFoundError:
                    view.stats[path] = None
            for path in links:
                try:
                    view.links[path] = sftp.readlink(path)
                except (FileNotFoundError, OSError):
                    view.links[path] = None
            view.free_bytes = _statvfs_free(sftp, free_at)
        except (paramiko.SSHException, EOFError, socket.timeout) as exc:
            raise HostUnreachable(self.device, f"connection lost while reading files: {exc}") from None
        except OSError as exc:
            raise TransportError(self.device, f"cannot read files: {exc}") from None
        return view

    def read_bytes(self, remote: str) -> bytes | None:
        try:
            with self._sftp_client().open(remote, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None
        except (paramiko.SSHException, EOFError) as exc:
            raise HostUnreachable(self.device, f"connection lost while reading {remote}: {exc}") from None
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise TransportError(self.device, f"cannot read {remote}: {exc}") from None

    def close(self) -> None:
        for item in (self._sftp, self._client, self._jump):
            try:
                if item is not None:
                    item.close()
            except Exception:  # noqa: BLE001 - closing a broken connection must not raise
                pass
        self._sftp = None


def target_for(device_name: str, host: str, port: int, ssh: SSHSettings, base_dir: Path,
               identity_file: str | None = None) -> SSHTarget:
    """An SSHTarget from a fleet's SSH settings; known_hosts resolves against the fleet file's directory, the
    identity file is the one the secrets directory holds (resolved by the caller)."""
    def resolve(path: str | None) -> str | None:
        if path is None:
            return None
        expanded = Path(os.path.expanduser(path))
        return str(expanded if expanded.is_absolute() else (base_dir / expanded).resolve())

    return SSHTarget(device=device_name, host=host, port=port, user=ssh.user,
                     identity_file=identity_file, use_agent=ssh.use_agent,
                     known_hosts=resolve(ssh.known_hosts), trust_on_first_use=ssh.trust_on_first_use,
                     jump_host=ssh.jump_host, use_ssh_config=ssh.use_ssh_config,
                     connect_timeout_s=ssh.connect_timeout_s, command_timeout_s=ssh.command_timeout_s,
                     keepalive_s=ssh.keepalive_s, stall_timeout_s=ssh.stall_timeout_s,
                     connect_retries=ssh.connect_retries)


class SSHSession:
    """One long-running command on the device spoken to in lines: a request line in, an answer line out."""

    def __init__(self, device: str, channel: paramiko.Channel, argv: list[str], default_timeout_s: float,
                 stall_timeout_s: float = 60) -> None:
        self.device, self.channel, self.argv, self.default_timeout_s = device, channel, argv, default_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self._buffer = bytearray()
        self._started = False  # the login shell's own output ends at the marker line

    def _line(self, deadline: float, what: str, limit: float) -> bytes:
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise CommandTimeout(self.device, f"`{what}` did not finish in {limit:g} s")
            self.channel.settimeout(min(left, 1.0))
            try:
                chunk = self.channel.recv(65536)
            except socket.timeout:
                continue
            except (paramiko.SSHException, EOFError, OSError) as exc:
                self.close()
                raise HostUnreachable(self.device, f"the connection failed during `{what}` "
                                      f"({type(exc).__name__}: {exc or 'closed'})") from None
            if not chunk:
                stderr = self.channel.recv_stderr(4096).decode(errors="replace").strip().splitlines()
                self.close()
                raise HostUnreachable(self.device, f"`{self.argv[0]}` ended during `{what}`"
                                      + (f": {stderr[-1][:300]}" if stderr else ""))
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line

    def call(self, request: str, timeout: float | None = None, what: str = "", payload: Path | None = None,
             progress: Progress | None = None, payload_offset: int = 0) -> str:
        """Send one request line (followed by the raw bytes of ``payload``, for the agent's ``receive``); the
        answer line."""
        limit = timeout or self.default_timeout_s
        deadline = time.monotonic() + limit
        what = what or request[:60]
        try:
            self.channel.settimeout(min(limit, self.stall_timeout_s))  # a lost link stalls; it does not fail
            self.channel.sendall(request.encode() + b"\n")
            if payload is not None:
                total, sent = payload.stat().st_size, payload_offset
                with payload.open("rb") as handle:
                    handle.seek(payload_offset)
                    for block in iter(lambda: handle.read(1 << 16), b""):
                        if time.monotonic() > deadline:
                            raise TimeoutError
                        self.channel.sendall(block)
                        sent += len(block)
                        if progress:
                            progress(sent, total)
        except (socket.timeout, TimeoutError):
            self.close()
            raise CommandTimeout(self.device, f"`{what}` stalled: nothing moved for {self.stall_timeout_s:g} s "
                                              "(or it ran past its time)") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self.close()
            raise HostUnreachable(self.device, f"the connection failed during `{what}` "
                                  f"({type(exc).__name__}: {exc or 'closed'})") from None
        while not self._started:
            self._started = self._line(deadline, what, limit).decode(errors="replace").strip() == OUTPUT_MARKER
        return self._line(deadline, what, limit).decode(errors="replace")

    def close(self) -> None:
        try:
            self.channel.close()
        except (paramiko.SSHException, EOFError, OSError):
            pass  # a dead connection has nothing left to close


def _statvfs_free(sftp: paramiko.SFTPClient, path: str) -> int | None:
    """Bytes free for an unprivileged writer at ``path`` (OpenSSH's statvfs@openssh.com), None if unsupported."""
    try:
        kind, message = getattr(sftp, "_request")(paramiko.sftp.CMD_EXTENDED, "statvfs@openssh.com", path)
    except (IOError, paramiko.SSHException):
        return None
    if kind != paramiko.sftp.CMD_EXTENDED_REPLY or message is None:
        return None
    _bsize, frsize, _blocks, _bfree, bavail = (message.get_int64() for _ in range(5))
    return int(frsize * bavail)
