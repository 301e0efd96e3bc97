"""Fleet health for Prometheus over real sshd: `status -o prometheus` and the /metrics endpoint."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from edgeops.cli import main
from labkit.http import webhook_receiver
from labkit.repo import edited, free_ports, running_lab
from labkit.slow_model import make_slower

pytestmark = pytest.mark.ssh
MANIFEST = "manifests/wearable.yaml"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, hostile_home: Path):
    with running_lab(tmp_path_factory.mktemp("metrics"), 2, hostile_home) as root:
        assert CliRunner().invoke(main, ["apply", MANIFEST, "--root", str(root)]).exit_code == 0
        yield root


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def device(name: str, **more: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"deployment": "wearable-activity", "fleet": "lab", "device": name, **more}.items()))


def check(text: str) -> None:
    found = samples(text)
    for name in ("lab-01", "lab-02"):
        assert found[("edgeops_device_health", device(name, health="Healthy"))] == 1
        assert found[("edgeops_device_health", device(name, health="Damaged"))] == 0
        assert found[("edgeops_device_sync", device(name, sync="Synced"))] == 1
        assert found[("edgeops_device_latency_p95_milliseconds", device(name))] > 0
        assert found[("edgeops_device_latency_p95_slo_milliseconds", device(name))] == 25
        assert found[("edgeops_device_energy_per_inference_millijoules",
                      device(name, source="hwmon", boundary="board"))] > 0
        kept = [found.get(("edgeops_device_last_rollout_decision", device(name, decision=d)), 0) for d in ("Passed", "Inconclusive")]
        assert sorted(kept) == [0, 1], kept  # a busy host may leave the speed undecided, which keeps it too
        info = [labels for (metric, labels), value in found.items()
                if metric == "edgeops_device_release_info" and dict(labels)["device"] == name and value == 1]
        assert len(info) == 1 and dict(info[0])["release"].startswith("rel-")
        assert dict(info[0])["materialisation"].startswith("r-")


def test_status_prints_openmetrics_that_a_prometheus_parser_reads(lab: Path) -> None:
    result = CliRunner().invoke(main, ["status", MANIFEST, "-o", "prometheus", "--root", str(lab)])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith("# EOF")
    check(result.stdout)


def test_serve_metrics_answers_scrapes_over_http(lab: Path) -> None:
    port = free_ports(1)[0]
    server = subprocess.Popen([sys.executable, "-m", "edgeops", "serve-metrics", MANIFEST, "--port", str(port),
                               "--interval", "2s", "--root", str(lab)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline, body = time.monotonic() + 60, None
        while time.monotonic() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
                    body = response.read().decode()
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                time.sleep(0.3)
        assert body is not None, "no answer on /metrics"
        check(body)
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        assert missing.value.code == 404
    finally:
        server.terminate()
        server.wait(10)


def test_a_rollout_is_announced_to_the_webhooks(lab: Path) -> None:
    profile = lab / "device_profiles" / "lab-cpu.yaml"
    with webhook_receiver() as (url, state), edited((profile, "inter_op_num_threads: 1", "inter_op_num_threads: 2")):
        result = CliRunner(env={"EDGEOPS_WEBHOOKS": url}).invoke(main, ["apply", MANIFEST, "--root", str(lab)])
    received = state["bodies"]
    assert result.exit_code == 0, result.output
    assert [(e["kind"], e["deployment"], e["outcome"]) for e in received] == [("apply", "wearable-activity",
                                                                                "succeeded")]
    assert received[0]["decisions"]["Passed"] + received[0]["decisions"]["Inconclusive"] == 2
    assert {d["device"] for d in received[0]["devices"]} == {"lab/lab-01", "lab/lab-02"}


def test_the_pr_comment_replays_the_misleading_case_against_what_the_fleet_runs(lab: Path) -> None:
    """A PR swaps the int8 model the fleet runs for a float one that is larger and slower, and edits the profile."""
    manifest, profile = lab / MANIFEST, lab / "device_profiles" / "lab-cpu.yaml"
    quantized = ("  recipe:\n    - quantize:\n        mode: static\n        per_channel: true\n"
                 "        calibration_method: minmax\n")
    make_slower(lab / "examples/models/wearable_cnn.onnx", lab / "examples/models/float-slow.onnx", 1024, 4)
    with edited((manifest, quantized, "  recipe: []\n"), (manifest, "    sha256: ", "    # sha256: "),
                (manifest, "path: ../examples/models/wearable_cnn.onnx", "path: ../examples/models/float-slow.onnx"),
                (profile, "intra_op_num_threads: 1", "intra_op_num_threads: 2")):
        result = CliRunner().invoke(main, ["plan", MANIFEST, "-o", "markdown", "--root", str(lab)])
    assert result.exit_code == 2, result.output
    comment = result.stdout.splitlines()
    line = next(x for x in comment if "against what runs" in x)
    assert line.startswith("- cpu: against what runs (artifact `") and "rollout #" in line
    sizes = line.split("size ")[1].split(" kB")[0].split(" → ")
    assert float(sizes[0]) * 3 < float(sizes[1])  # the float model with its extra layers against the int8 one
    assert "accuracy" in line and " → " in line.split("accuracy")[1]  # quality: what runs → what would run
    speed = float(line.split("x the speed")[0].rsplit("(", 1)[1])
    assert speed < 0.5 and "95% CI" in line
    assert any(x.startswith("- :warning: cpu artifact is ") and "slower on the host" in x for x in comment)
    config = [x for x in comment if x.startswith("- runtime config (")]
    assert any("session_options.intra_op_num_threads: 1 → 2" in x for x in config), config


def test_a_broken_manifest_beside_the_wearable_one_is_a_warning_for_apply_history_rollback_and_lab_up(
        lab: Path) -> None:
    broken = lab / "manifests" / "broken.yaml"
    broken.write_text("apiVersion: edgeops/v1\nkind: Deployment\nmetadata: {name: broken-one}\nspec:\n"
                      "  targets: [{fleet: lab}]\n")
    try:
        for args in (["lab", "up", "lab"], ["apply", MANIFEST], ["status", MANIFEST], ["history", "wearable-activity"],
                     ["rollback", "wearable-activity"], ["apply", MANIFEST]):
            result = CliRunner().invoke(main, [*args, "--root", str(lab)])
            assert result.exit_code == 0, (args, result.output)
            assert result.stderr.startswith("warning: ") and "manifests/broken.yaml:4: spec.model: required field " \
                   "is missing (and 2 more); not used here, so skipped" in result.stderr, (args, result.stderr)
        whole = CliRunner().invoke(main, ["validate", "--root", str(lab)])
        assert whole.exit_code == 3 and "manifests/broken.yaml:4: spec.model: required field" in whole.stderr
    finally:
        broken.unlink()


HOSTILE = '<img src=x onerror="window.__errors.push(1)">&amp;'


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _serving(lab: Path, port: int) -> subprocess.Popen[str]:
    server = subprocess.Popen([sys.executable, "-m", "edgeops", "serve", MANIFEST, "--port", str(port),
                               "--interval", "2s", "--root", str(lab)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if _get(f"http://127.0.0.1:{port}/healthz")[0] == 200:
                return server
        except (urllib.error.URLError, ConnectionError):
            pass
        assert server.poll() is None, server.stderr.read() if server.stderr else ""
        time.sleep(0.3)
    raise AssertionError("edgeops serve did not answer")


def test_the_fleet_page_renders_in_chromium_escapes_labels_and_prometheus_alerts_on_a_damaged_device(
        lab: Path) -> None:
    """`edgeops serve` on the lab fleet: every page renders in headless Chromium without a script error, every
    link resolves, a hostile label is shown as text; a real Prometheus scrapes it with the alert rules, and a
    flipped byte on a device turns EdgeopsDeviceUnhealthy pending for that device; every dashboard query runs."""
    from edgeops.manifest.workspace import load_workspace
    from edgeops.targets import target_devices
    from labkit.faults import flip_byte
    from labkit.prometheus import dashboard_expressions, query, running_prometheus, wait_for
    from tests.e2e.test_report_browser import SCREENSHOTS, chromium

    fleet = lab / "manifests/fleets/lab.yaml"
    port = free_ports(1)[0]
    with edited((fleet, "labels: {ring: canary", f"labels: {{note: '{HOSTILE}', ring: canary")):
        server = _serving(lab, port)
        try:
            base = f"http://127.0.0.1:{port}"
            status, kind, index = _get(base + "/")
            assert status == 200 and kind.startswith("text/html") and "wearable-activity" in index
            status, _, page = _get(base + "/deployments/wearable-activity")
            assert status == 200 and "lab-01" in page and "lab-02" in page and "fleet lab" in page
            assert HOSTILE not in page and "&lt;img src=x onerror=&quot;window.__errors.push(1)&quot;&gt;&amp;amp;" \
                in page
            links = set(re.findall(r'href="(/[^"]*)"', index + page))
            assert "/deployments/wearable-activity/rollouts/1" in links
            for link in links:
                assert _get(base + link)[0] == 200, link
            assert _get(base + "/deployments/nope")[0] == 404
            assert _get(base + "/deployments/wearable-activity/rollouts/99")[0] == 404
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            for name, path in (("fleet-index", "/"), ("fleet-wearable-activity", "/deployments/wearable-activity"),
                               ("fleet-rollout-1", "/deployments/wearable-activity/rollouts/1")):
                body = re.search(r"<body[^>]*>", chromium("--dump-dom", base + path).stdout)
                assert body is not None and 'data-errors="0"' in body.group(0), (path, body)
                shot = SCREENSHOTS / f"{name}.png"
                chromium("--window-size=1300,900", f"--screenshot={shot}", base + path)
                assert shot.stat().st_size > 5_000

            with running_prometheus(f"127.0.0.1:{port}") as prometheus:
                assert wait_for(prometheus, 'up{job="edgeops"} == 1'), "Prometheus never scraped edgeops serve"
                assert wait_for(prometheus, 'edgeops_device_health{health="Healthy"} == 1')
                assert not query(prometheus, 'ALERTS{alertname="EdgeopsDeviceUnhealthy"}')
                ws = load_workspace(lab)
                target = next(t for t in target_devices(ws, "wearable-activity") if t.name == "lab-02")
                flip_byte(target, "wearable-activity")
                pending = wait_for(prometheus, 'ALERTS{alertname="EdgeopsDeviceUnhealthy", device="lab-02"}')
                assert pending and pending[0]["metric"]["alertstate"] == "pending" \
                    and pending[0]["metric"]["health"] == "Damaged", pending
                assert not query(prometheus, 'ALERTS{alertname="EdgeopsDeviceUnhealthy", device="lab-01"}')
                answered = 0
                for title, expression in dashboard_expressions():
                    answered += bool(query(prometheus, expression))   # raises on a query Prometheus rejects
                assert answered >= 8, answered   # device, rollout and alert panels have data now
        finally:
            server.terminate()
            server.wait(10)
    repaired = CliRunner().invoke(main, ["apply", MANIFEST, "--root", str(lab)])
    assert repaired.exit_code == 0, repaired.output
