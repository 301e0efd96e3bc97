"""Rollout events to webhooks: generic JSON or a Slack-compatible payload, retried, never lost silently.

A delivery that still fails after its retries is appended to a dead-letter log (JSON lines) with the
event and the last error, so nothing an operator should have heard about disappears.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RETRIES = 3            # attempts after the first
BACKOFF_S = 0.5        # doubled after each failed attempt
TIMEOUT_S = 10


@dataclass(frozen=True)
class Webhook:
    url: str
    slack: bool = False   # Slack's incoming-webhook payload ({"text": ...}) instead of the event itself

    @classmethod
    def parse(cls, text: str) -> Webhook:
        """``https://...`` (generic JSON) or ``slack+https://...`` (Slack-compatible); checked whole, so a URL
        that cannot be posted to is refused when it is read, never after a rollout. Messages are redacted."""
        slack = text.startswith("slack+")
        url = text.removeprefix("slack+")
        shown = redacted(url)
        if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
            raise ValueError(f"webhook {shown} has white space or a control character (percent-encode it)")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port  # raises on a port that is not a number from 0 to 65535
        except ValueError as exc:
            raise ValueError(f"webhook {shown} is not a valid URL ({_without(str(exc), url)})") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"webhook {shown} is not an http(s) URL (prefix slack+ for Slack's payload)")
        if not parts.hostname or port == 0:
            raise ValueError(f"webhook {shown} names no host (or port 0)")
        return cls(url, slack)


def _without(message: str, url: str) -> str:
    return message.replace(url, "…")


def redacted(url: str) -> str:
    """A webhook URL as logs may show it: scheme, host and port only, and a digest of the whole. User names,
    passwords, paths, queries and fragments (where tokens live) never appear."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return f"(malformed URL)#{digest}"
    scheme = parts.scheme if parts.scheme.isalnum() else "?"
    host = host if all(c.isalnum() or c in ".-:" for c in host) else "?"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}{port}/…#{digest}"


def _append_private(path: Path, line: str) -> None:
    """Append to a file only its owner can read (dead letters carry device names and reasons)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "a") as log:
        log.write(line)


def slack_text(event: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {d}" for d, n in sorted(event.get("decisions", {}).items()) if n)
    return (f"edgeops {event['kind']} of *{event['deployment']}*: *{event['outcome']}* — {event['message']}"
            + (f" ({counts})" if counts else ""))


def deliver(hooks: list[Webhook], event: dict[str, Any], dead_letter: Path,
            sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Post ``event`` to every hook; return the (redacted) URLs that failed after their retries, each logged
    with the event as a dead letter."""
    failed = []
    for hook in hooks:
        payload = {"text": slack_text(event)} if hook.slack else event
        body = json.dumps(payload, sort_keys=True, default=str).encode()
        error, delay = "", BACKOFF_S
        for attempt in range(RETRIES + 1):
            request = urllib.request.Request(hook.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json",
                                                      "User-Agent": "edgeops-webhook"})
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                    if 200 <= response.status < 300:
                        error = ""
                        break
                    error = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}"
            except Exception as exc:  # noqa: BLE001 - a delivery never ends the command that announced
                error = _without(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}", hook.url)
            if attempt < RETRIES:
                sleep(delay)
                delay *= 2
        if error:
            failed.append(redacted(hook.url))
            try:
                _append_private(dead_letter, json.dumps({
                    "url": redacted(hook.url), "error": error, "attempts": RETRIES + 1,
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event},
                    sort_keys=True, default=str) + "\n")
            except OSError as exc:
                failed[-1] += f" (its dead letter could not be written either: {exc.strerror})"
    return failed
