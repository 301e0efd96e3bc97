"""The controller's side of the MQTT broker: publish desired states (retained), read devices' retained status.

One connection per command. Messages are kept per topic (the newest wins, as retained messages do),
and callers wait on a condition for the message they need.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeops.errors import EdgeopsError

PASSWORD_ENV = "EDGEOPS_BROKER_PASSWORD"


class BrokerError(EdgeopsError):
    """The MQTT broker could not be reached, or refused this controller."""


class Broker:
    """A connected MQTT client that remembers the newest message of every topic it subscribed to."""

    def __init__(self, url: str, username: str, password: str | None, ca_file: Path | None = None,
                 connect_timeout_s: float = 10) -> None:
        parsed = urlparse(url)
        self.url = url
        self.messages: dict[str, dict[str, Any]] = {}
        self.arrived = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgeops-ctl-{uuid.uuid4().hex[:12]}")
        self.client.username_pw_set(username, password)
        if parsed.scheme == "mqtts":
            if ca_file is not None and not ca_file.is_file():
                raise BrokerError(f"pull.ca_file {ca_file} does not exist", hint="`edgeops lab up` writes the lab's")
            self.client.tls_set(ca_certs=str(ca_file) if ca_file else None, cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_message = self._on_message
        self.patterns: list[str] = []
        self.up = threading.Event()           # the link to the broker is up now
        self.down_since: float | None = None  # monotonic time the link went down (None: up)
        connected = threading.Event()
        refused: list[str] = []

        def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
            if reason.is_failure:
                refused.append(str(reason))
            else:
                for pattern in self.patterns:  # a clean session: after a reconnect the broker knows none of them
                    client.subscribe(pattern, qos=1)
                self.down_since = None
                self.up.set()
            connected.set()

        def on_disconnect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
            self.up.clear()
            self.down_since = self.down_since or time.monotonic()
            with self.arrived:
                self.arrived.notify_all()

        self.client.on_connect = on_connect
        self.client.on_disconnect = on_disconnect
        try:
            self.client.connect(parsed.hostname or "127.0.0.1", parsed.port or (8883 if parsed.scheme == "mqtts"
                                                                                 else 1883), keepalive=30)
        except ssl.SSLError as exc:
            raise BrokerError(f"broker {url}: TLS failed ({getattr(exc, 'verify_message', None) or exc.reason or exc})",
                              hint="pull.ca_file must hold the CA that signed the broker's certificate") from None
        except OSError as exc:
            raise BrokerError(f"broker {url} unreachable: {exc.strerror or exc}",
                              hint="is the broker running and pull.broker right? (`edgeops lab up` starts the "
                                   "lab's)") from None
        self.client.loop_start()
        if not connected.wait(connect_timeout_s):
            self.close()
            raise BrokerError(f"broker {url} did not answer within {connect_timeout_s:g} s")
        if refused:
            self.close()
            raise BrokerError(f"broker {url} refused user {username}: {refused[0]}",
                              hint=f"check pull.username and the password (pull.password_file or {PASSWORD_ENV})")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            document = json.loads(message.payload.decode()) if message.payload else None
        except ValueError:
            return
        with self.arrived:
            if isinstance(document, dict):
                self.messages[message.topic] = {**document, "_received": time.time()}
            else:
                self.messages.pop(message.topic, None)
            self.arrived.notify_all()

    def down_for(self) -> float:
        """Seconds the link to the broker has been down (0 while it is up)."""
        since = self.down_since
        return 0.0 if since is None else time.monotonic() - since

    def subscribe(self, patterns: list[str]) -> None:
        for pattern in patterns:
            if pattern not in self.patterns:
                self.patterns.append(pattern)
            result, _ = self.client.subscribe(pattern, qos=1)
            if result not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: subscribed on reconnect
                raise BrokerError(f"could not subscribe to {pattern} on {self.url} ({mqtt.error_string(result)})")

    def publish(self, topic: str, document: dict[str, Any] | None, timeout_s: float = 10) -> None:
        """Publish retained at QoS 1 and wait for the broker's acknowledgement (None clears the topic); while the
        link is down, publish again each time it comes back, until ``timeout_s``."""
        payload = json.dumps(document, sort_keys=True) if document is not None else b""
        deadline = time.monotonic() + timeout_s
        failure = "no acknowledgement"
        while True:
            info = self.client.publish(topic, payload, qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.1, min(5.0, deadline - time.monotonic())))
                if info.is_published():
                    return
            except (ValueError, RuntimeError) as exc:
                failure = str(exc)
            if time.monotonic() >= deadline:
                raise BrokerError(f"publishing to {topic} on {self.url} failed within {timeout_s:g} s: {failure}")
            self.up.wait(max(0.1, min(1.0, deadline - time.monotonic())))

    def wait_for(self, topic: str, accept: Callable[[dict[str, Any]], bool], deadline: float,
                 stop: threading.Event | None = None) -> dict[str, Any] | None:
        """The newest message on ``topic`` that ``accept`` takes, waiting until ``deadline`` (monotonic)."""
        with self.arrived:
            while True:
                found = self.messages.get(topic)
                if found is not None and accept(found):
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop.is_set()):
                    return None
                self.arrived.wait(min(left, 0.5))

    def settle(self, topics: set[str], quiet_s: float = 0.3, limit_s: float = 3.0) -> None:
        """Wait until every topic has a message, or nothing new arrived for ``quiet_s`` (retained delivery ends)."""
        end = time.monotonic() + limit_s
        with self.arrived:
            while time.monotonic() < end and not topics <= self.messages.keys():
                if not self.arrived.wait(quiet_s):
                    return

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def controller_password(password_file: Path | None) -> str | None:
    """The controller's broker password from the fleet's pull.password_file (EDGEOPS_BROKER_PASSWORD overrides it)."""
    if password_file is None:
        return None
    try:
        return password_file.read_text().strip()
    except OSError as exc:
        raise BrokerError(f"cannot read the broker password file {password_file}: {exc.strerror}",
                          hint=f"create it, or set {PASSWORD_ENV}") from None
