"""Rollout events to webhooks: generic JSON or a Slack-compatible payload, retried, never lost silently.

A delivery that still fails after its retries is appended to a dead-letter log (JSON lines) with the
event and the last error, so nothing an operator should have heard about disappears.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
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
        """``https://...`` (generic JSON) or ``slack+https://...`` (Slack-compatible)."""
        slack = text.startswith("slack+")
        url = text.removeprefix("slack+")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook {text!r} is not an http(s) URL (prefix slack+ for Slack's payload)")
        return cls(url, slack)


def redacted(url: str) -> str:
    """A webhook URL as logs may show it: its host, and a digest instead of the path (which is often the secret)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/')[0]}/…#{hashlib.sha256(url.encode()).hexdigest()[:12]}"


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
            except (urllib.error.URLError, OSError) as exc:
                error = str(getattr(exc, "reason", exc))
            if attempt < RETRIES:
                sleep(delay)
                delay *= 2
        if error:
            failed.append(redacted(hook.url))
            dead_letter.parent.mkdir(parents=True, exist_ok=True)
            with dead_letter.open("a") as log:
                log.write(json.dumps({"url": redacted(hook.url), "error": error, "attempts": RETRIES + 1,
                                      "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event},
                                     sort_keys=True, default=str) + "\n")
    return failed
