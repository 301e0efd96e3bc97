"""The lab of a pull-mode fleet: Debian's mosquitto and docker-registry on 127.0.0.1, one agent daemon per device.

``edgeops lab up`` starts, for a fleet with a ``pull:`` section, the broker (authenticated: the
controller and each device have their own user; each device may read only its own desired state
and write only its own status), the registry, and per device the agent daemon exactly as the
systemd unit ``edgeops/agent/edgeops-pulld.service`` runs it on a real device, from the device's
own runtime (numpy, onnxruntime, paho-mqtt). ``lab down`` stops exactly these processes.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from edgeops.lab import LabDevice, LabError, enroll_lab, lab_dir, process_alive, provision_runtime, write_sensor
from edgeops.manifest.models import Fleet, PullSettings
from edgeops.manifest.secrets import secret_path
from edgeops.manifest.workspace import Document, Workspace
from edgeops.targets import TargetDevice

MOSQUITTO, REGISTRY = "/usr/sbin/mosquitto", "/usr/bin/docker-registry"
PULL_RUNTIME_PACKAGES = ("numpy", "onnxruntime", "paho-mqtt")
AGENT_DIR = Path(__file__).parent / "agent"
AGENT_FILES = ("edgeops_agent.py", "edgeops_gate.py", "edgeops_pulld.py")


def pull_dir(ws: Workspace, fleet: Document[Fleet]) -> Path:
    return lab_dir(ws) / fleet.name


def device_user(fleet: str, device: str) -> str:
    return f"{fleet}.{device}"


def password_line(user: str, password: str, salt: bytes | None = None) -> str:
    """A mosquitto 2 password-file line (PBKDF2-SHA512, 101 rounds: what mosquitto_passwd writes)."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"{user}:$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def lab_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost (ECDSA P-256, a year), made once: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_file, cert_file, key_file = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    if ca_file.is_file() and cert_file.is_file() and key_file.is_file():
        return ca_file, cert_file, key_file
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeops lab CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                          x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ca_file, cert_file, key_file


def _port(url: str, default: int) -> int:
    return urlparse(url).port or default


def _pid(pid_file: Path, marker: str) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if marker.encode() in cmdline and process_alive(pid) else None


def _spawn(argv: list[str], log: Path, pid_file: Path, env: dict[str, str] | None = None) -> int:
    with log.open("a") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=env)
    pid_file.write_text(f"{process.pid}\n")
    return process.pid


def _wait_port(port: int, name: str, log: Path, pid: int) -> None:
    import socket

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not process_alive(pid):
            break
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    tail = log.read_text()[-400:] if log.exists() else ""
    raise LabError(f"{name} did not come up on 127.0.0.1:{port} (port in use?) {tail}")


def _broker(state: Path, settings: PullSettings, users: dict[str, str], acl: list[str],
            tls: tuple[Path, Path, Path] | None) -> int:
    if not Path(MOSQUITTO).exists():
        raise LabError(f"{MOSQUITTO} not found", hint="install Debian's mosquitto (scripts/install.sh does)")
    broker = state / "broker"
    (broker / "data").mkdir(parents=True, exist_ok=True)
    (broker / "passwd").write_text("".join(password_line(u, p) + "\n" for u, p in sorted(users.items())))
    (broker / "acl").write_text("\n".join(acl) + "\n")
    for name in ("passwd", "acl"):
        (broker / name).chmod(0o600)
    port = _port(settings.broker, 1883)
    config = broker / "mosquitto.conf"
    config.write_text("\n".join([
        "# edgeops lab broker: generated by `edgeops lab up`", "user root", "per_listener_settings false",
        f"listener {port} 127.0.0.1", "allow_anonymous false", f"password_file {broker / 'passwd'}",
        f"acl_file {broker / 'acl'}", "persistence true", f"persistence_location {broker / 'data'}/",
        "log_dest stderr", "log_type error", "log_type warning", "max_queued_messages 10000",
        "max_inflight_messages 100",
        *([f"cafile {tls[0]}", f"certfile {tls[1]}", f"keyfile {tls[2]}", "tls_version tlsv1.2"] if tls else []), "",
    ]))
    pid = _pid(broker / "pid", str(config))
    if pid is not None:  # running: it rereads passwords and ACLs on SIGHUP
        os.kill(pid, signal.SIGHUP)
        return pid
    pid = _spawn([MOSQUITTO, "-c", str(config)], broker / "mosquitto.log", broker / "pid")
    _wait_port(port, "mosquitto", broker / "mosquitto.log", pid)
    return pid


def _registry(state: Path, settings: PullSettings, tls: tuple[Path, Path, Path] | None) -> int:
    if not Path(REGISTRY).exists():
        raise LabError(f"{REGISTRY} not found", hint="install Debian's docker-registry (scripts/install.sh does)")
    registry = state / "registry"
    (registry / "storage").mkdir(parents=True, exist_ok=True)
    port = _port(settings.registry, 5000)
    config = registry / "config.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(registry / "storage")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16),
                 **({"tls": {"certificate": str(tls[1]), "key": str(tls[2])}} if tls else {})},
    }, indent=1))
    pid = _pid(registry / "pid", str(config))
    if pid is None:
        pid = _spawn([REGISTRY, "serve", str(config)], registry / "registry.log", registry / "pid")
        _wait_port(port, "docker-registry", registry / "registry.log", pid)
    return pid


def install_agent(root: Path) -> None:
    """The daemon's three files in ``<root>/agent`` (what a device image or package would hold)."""
    (root / "agent").mkdir(parents=True, exist_ok=True)
    for name in AGENT_FILES:
        target = root / "agent" / name
        data = (AGENT_DIR / name).read_bytes()
        if not target.exists() or target.read_bytes() != data:
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)


def daemon_config(target: TargetDevice, password: str) -> dict[str, object]:
    settings = target.fleet.obj.spec.pull
    assert settings is not None
    return {"root": target.root, "fleet": target.fleet.name, "device": target.name, "broker": settings.broker,
            "username": device_user(target.fleet.name, target.name), "password": password,
            "topic_prefix": settings.topic_prefix, "heartbeat_s": settings.heartbeat_s,
            "power_sensor": target.power_sensor}


def start_daemon(target: TargetDevice, state: Path) -> int:
    """The device's agent daemon (again, if it is not running): ``python3 edgeops_pulld.py --config ...``."""
    config = Path(target.root) / "agent" / "pull.json"
    pid = _pid(state / "pulld.pid", str(config))
    if pid is not None:
        return pid
    argv = [target.python, str(Path(target.root) / "agent" / "edgeops_pulld.py"), "--config", str(config)]
    return _spawn(argv, state / "pulld.log", state / "pulld.pid", env={"PATH": "/usr/bin:/bin"})


def stop_daemon(state: Path, target: TargetDevice) -> bool:
    pid = _pid(state / "pulld.pid", str(Path(target.root) / "agent" / "pull.json"))
    return pid is not None and _stop(pid)


def _stop(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and process_alive(pid):
        time.sleep(0.05)
    if process_alive(pid):
        os.kill(pid, signal.SIGKILL)
    return True


def pull_lab_up(ws: Workspace, fleet: Document[Fleet], targets: list[TargetDevice],
                report: Callable[[str], None] = lambda message: None,
                simulate: frozenset[str] = frozenset()) -> list[LabDevice]:
    """Broker, registry and one daemon per device for a pull fleet; idempotent (running parts are kept).

    Devices named in ``simulate`` get their broker user and password (``<lab>/<device>/broker.password``)
    but no agent or daemon: a benchmark speaks the protocol for them.
    """
    settings = fleet.obj.spec.pull
    assert settings is not None
    if fleet.obj.spec.lab.link_mbit is not None or any(t.device.lab.link_mbit is not None for t in targets):
        raise LabError(f"{fleet.display}: lab.link_mbit shapes SSH lab devices only; a pull fleet's daemons share "
                       "the host's loopback with their broker and registry")
    state = pull_dir(ws, fleet)
    state.mkdir(parents=True, exist_ok=True)
    real = [t for t in targets if t.name not in simulate]
    for python in sorted({t.python for t in real if os.path.isabs(t.python)}):
        provision_runtime(Path(python), lab_dir(ws) / "runtime-install.log", report, PULL_RUNTIME_PACKAGES)
    controller_file = secret_path(ws.secrets_dir, settings.password_file) if settings.password_file else \
        state / "controller.password"
    if not controller_file.is_file():
        controller_file.parent.mkdir(parents=True, exist_ok=True)
        controller_file.write_text(secrets.token_urlsafe(24) + "\n")
        controller_file.chmod(0o600)
    users = {settings.username: controller_file.read_text().strip()}
    fresh_devices: set[str] = set()
    acl = [f"user {settings.username}", f"topic readwrite {settings.topic_prefix}/#", ""]
    passwords: dict[str, str] = {}
    for target in targets:
        secret_file = state / target.name / "broker.password"
        secret_file.parent.mkdir(parents=True, exist_ok=True)
        if not secret_file.is_file():
            secret_file.write_text(secrets.token_urlsafe(24) + "\n")
            secret_file.chmod(0o600)
        passwords[target.key] = secret_file.read_text().strip()
        user = device_user(fleet.name, target.name)
        users[user] = passwords[target.key]
        own = f"{settings.topic_prefix}/{fleet.name}/{target.name}"
        acl += [f"user {user}", f"topic read {own}/+/desired", f"topic write {own}/+/status",
                f"topic read {own}/+/train", f"topic write {own}/+/update", f"topic write {own}/online", ""]
    tls = None
    if settings.broker.startswith("mqtts://") or settings.registry.startswith("https://"):
        if settings.ca_file is None:
            raise LabError(f"fleet {fleet.name} uses TLS: set pull.ca_file (where `lab up` writes the lab's CA)")
        tls = lab_certificates(state / "tls")
        ca_copy = fleet.resolve(settings.ca_file)
        if not ca_copy.is_file():
            ca_copy.parent.mkdir(parents=True, exist_ok=True)
            ca_copy.write_bytes(tls[0].read_bytes())
    started_at = time.time()
    running = _pid(state / "broker" / "pid", str(state / "broker" / "mosquitto.conf"))
    fresh = _broker(state, settings, users, acl, tls if settings.broker.startswith("mqtts://") else None) != running
    _registry(state, settings, tls if settings.registry.startswith("https://") else None)
    devices = []
    for target in real:
        if _pid(state / target.name / "pulld.pid", str(Path(target.root) / "agent" / "pull.json")) is None:
            fresh_devices.add(target.name)
        root = Path(target.root)
        install_agent(root)
        config = root / "agent" / "pull.json"
        device_config = daemon_config(target, passwords[target.key])
        if tls:  # the device trusts the lab's CA, as a real one trusts its broker's and registry's
            (root / "agent" / "ca.pem").write_bytes(tls[0].read_bytes())
            device_config["ca_file"] = str(root / "agent" / "ca.pem")
        config.write_text(json.dumps(device_config, indent=1))
        config.chmod(0o600)
        write_sensor(target)
        devices.append(LabDevice(target.name, 0, state / target.name, start_daemon(target, state / target.name)))
    if fleet.obj.spec.trust:
        enroll_lab(ws, fleet, real, report)
    waiting = {t.name for t in real} if fresh else fresh_devices
    late = _wait_online(fleet, users[settings.username], state, real, waiting, started_at)
    if late:
        report(f"{fleet.name}: not online within {ONLINE_WAIT_S:g} s: {', '.join(sorted(late))} (see their "
               "pulld.log); they catch up when they connect")
    return _services(fleet, state) + devices


def _services(fleet: Document[Fleet], state: Path) -> list[LabDevice]:
    """The broker and the registry the lab started for a pull fleet, as `lab up` and `lab status` list them."""
    settings = fleet.obj.spec.pull
    assert settings is not None
    return [LabDevice(name, 0, state / name, _pid(state / name / "pid", str(state / name / marker)), service=url)
            for name, marker, url in (("broker", "mosquitto.conf", settings.broker),
                                      ("registry", "config.yml", settings.registry))]


ONLINE_WAIT_S = 30.0


def _wait_online(fleet: Document[Fleet], password: str, state: Path, targets: list[TargetDevice],
                 fresh: set[str], since: float) -> set[str]:
    """The devices that did not say they are online (a daemon or broker started now: since ``since``)."""
    from edgeops.pull.broker import Broker
    from edgeops.pull.fleet import online_topic

    settings = fleet.obj.spec.pull
    assert settings is not None
    ca = fleet.resolve(settings.ca_file) if settings.ca_file else None
    broker = Broker(settings.broker, settings.username, password, ca)
    try:
        topics = {t.name: online_topic(t) for t in targets}
        broker.subscribe(list(topics.values()))
        deadline = time.monotonic() + ONLINE_WAIT_S

        def late() -> set[str]:
            return {name for name, topic in topics.items()
                    if not (message := broker.messages.get(topic) or {}).get("online")
                    or (name in fresh and float(message.get("at") or 0) < since)}

        while (missing := late()) and time.monotonic() < deadline:
            with broker.arrived:
                broker.arrived.wait(0.5)
        return missing
    finally:
        broker.close()


def pull_lab_status(ws: Workspace, fleet: Document[Fleet], targets: list[TargetDevice]) -> list[LabDevice]:
    state = pull_dir(ws, fleet)
    return _services(fleet, state) + [LabDevice(t.name, 0, state / t.name, _pid(
        state / t.name / "pulld.pid", str(Path(t.root) / "agent" / "pull.json"))) for t in targets]


def pull_lab_down(ws: Workspace, fleet: Document[Fleet], targets: list[TargetDevice],
                  wipe: bool = False) -> list[LabDevice]:
    """Stop the daemons, the registry and the broker this fleet's ``lab up`` started."""
    state = pull_dir(ws, fleet)
    stopped = [d for d in pull_lab_status(ws, fleet, targets) if not d.service and d.pid and _stop(d.pid)]
    for name, marker in (("registry", "config.yml"), ("broker", "mosquitto.conf")):
        pid = _pid(state / name / "pid", str(state / name / marker))
        if pid is not None:
            _stop(pid)
    if wipe:
        shutil.rmtree(state, ignore_errors=True)
    return stopped
