"""Rollout events over real HTTP: retried, Slack's payload on request, dead letters that keep no secret."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeops.webhooks import RETRIES, Webhook, deliver, redacted
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


@pytest.mark.parametrize("url", [
    "https://user:PW0SECRET@hooks.example.org/services/T0SECRET",
    "http://hooks.example.org?token=Q0SECRET",
    "https://hooks.example.org/ok#F0SECRET",
    "https://hooks.example.org:8443/hooks/P0SECRET/B0SECRET?x=1",
])
def test_redaction_keeps_only_scheme_host_and_port(url: str) -> None:
    shown = redacted(url)
    assert "SECRET" not in shown and "@" not in shown and "?" not in shown
    assert shown.startswith(url.split(":")[0] + "://") and "hooks.example.org" in shown


@pytest.mark.parametrize("url, problem", [
    ("http://hooks.example.org:notaport/T0SECRET", "is not a valid URL"),
    ("http://[::1/T0SECRET", "is not a valid URL"),
    ("http://hooks.example.org/T0 SECRET", "white space"),
    ("https:///T0SECRET", "names no host"),
])
def test_a_malformed_webhook_is_refused_when_read_and_the_message_is_redacted(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        Webhook.parse(url)
    assert "SECRET" not in str(caught.value)


def test_malformed_webhooks_exit_3_before_any_device_is_touched(repo_copy: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from edgeops.cli import main

    for value in ("http://host:notaport/T0SECRET", "http://[::1/T0SECRET", "http://h/a T0SECRET"):
        result = CliRunner(env={"EDGEOPS_WEBHOOKS": value}).invoke(
            main, ["apply", str(repo_copy / "manifests/wearable.yaml"), "--root", str(repo_copy)])
        assert result.exit_code == 3, result.output
        assert result.stderr.startswith("error: EDGEOPS_WEBHOOKS: webhook ") and "SECRET" not in result.output
        assert "Traceback" not in result.output
    assert not (repo_copy / ".edgeops").exists()  # nothing built, no ledger, no device dialled


def test_a_delivery_that_raises_is_a_dead_letter_only_the_owner_reads(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("something unexpected in http.client about http://h/T0SECRET")

    monkeypatch.setattr(urllib.request, "urlopen", broken)
    dead = tmp_path / "dead.jsonl"
    failed = deliver([Webhook.parse("http://h/T0SECRET")], EVENT, dead, sleep=lambda s: None)
    assert len(failed) == 1 and (dead.stat().st_mode & 0o777) == 0o600
    assert "SECRET" not in dead.read_text() and "ValueError" in dead.read_text()
