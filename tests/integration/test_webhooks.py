"""Rollout events over real HTTP: retried, Slack's payload on request, dead letters that keep no secret."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeops.webhooks import RETRIES, Webhook, deliver
from labkit.http import webhook_receiver
from labkit.repo import free_ports

EVENT = {"event": "rollout.finished", "kind": "apply", "deployment": "wearable-activity", "outcome": "halted",
         "message": "1 failed device(s) in wave 1 exceed max_failed_devices 0", "decisions": {"Failed": 1, "Passed": 0}}


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    """An HTTP server that fails the first ``fail`` posts with 500, then records them."""
    with webhook_receiver("/hooks/T0SECRET") as found:
        yield found


def test_a_failing_receiver_is_retried_until_it_takes_the_event(receiver,  # type: ignore[no-untyped-def]
                                                                 tmp_path: Path) -> None:
    url, state = receiver
    state["fail"] = 2
    waits: list[float] = []
    assert deliver([Webhook.parse(url)], EVENT, tmp_path / "dead.jsonl", sleep=waits.append) == []
    assert state["seen"] == 3 and state["bodies"] == [EVENT] and waits == [0.5, 1.0]
    assert not (tmp_path / "dead.jsonl").exists()


def test_slack_gets_its_own_payload(receiver, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, state = receiver
    deliver([Webhook.parse("slack+" + url)], EVENT, tmp_path / "dead.jsonl", sleep=lambda s: None)
    assert state["bodies"] == [{"text": "edgeops apply of *wearable-activity*: *halted* — 1 failed device(s) in wave "
                                        "1 exceed max_failed_devices 0 (1 Failed)"}]


def test_an_event_nobody_takes_is_a_dead_letter_without_the_secret_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_ports(1)[0]}/services/T0SECRET/B0SECRET"  # nothing listens there
    dead = tmp_path / "dead.jsonl"
    failed = deliver([Webhook.parse(url)], EVENT, dead, sleep=lambda s: None)
    assert len(failed) == 1 and "SECRET" not in failed[0]
    letter = json.loads(dead.read_text())
    assert letter["event"] == EVENT and letter["attempts"] == RETRIES + 1 and "SECRET" not in dead.read_text()


def test_a_webhook_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="is not an http"):
        Webhook.parse("ftp://example.org/hook")
