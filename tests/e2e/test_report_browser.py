"""`edgeops report -o html` opened in a real headless Chromium: every plot draws, no script error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from edgeops.cli import main
from labkit.repo import REPO, running_lab

pytestmark = pytest.mark.ssh
MANIFEST = "manifests/wearable.yaml"
SCREENSHOTS = Path(os.environ.get("EDGEOPS_TEST_OUTPUT", REPO / "test-output"))


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium")
    assert browser, "chromium is not installed: scripts/test.sh installs it (EDGEOPS_TEST_TOOLS=1 scripts/install.sh)"
    # a profile of its own: a chromium started on another's profile hands its page over to that one and exits
    with tempfile.TemporaryDirectory(prefix="edgeops-chromium-") as profile:
        return subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               "--no-first-run", "--disable-extensions", "--virtual-time-budget=5000",
                               f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, hostile_home: Path) -> tuple[Path, Path]:
    """(the repository, its report page) after two rollouts; the report needs the ledger and cache only."""
    base = tmp_path_factory.mktemp("report")
    with running_lab(base, 2, hostile_home) as root:
        assert CliRunner().invoke(main, ["apply", MANIFEST, "--root", str(root)]).exit_code == 0
        profile = root / "device_profiles" / "lab-cpu.yaml"  # a second release: verified against the first (A/B)
        profile.write_text(profile.read_text().replace("inter_op_num_threads: 1", "inter_op_num_threads: 2"))
        assert CliRunner().invoke(main, ["apply", MANIFEST, "--root", str(root)]).exit_code == 0
        out = base / "report.html"
        result = CliRunner().invoke(main, ["report", "wearable-activity", "--out", str(out), "--root", str(root)])
        assert result.exit_code == 0, result.output
        return root, out


@pytest.fixture(scope="module")
def page(lab: tuple[Path, Path]) -> Path:
    return lab[1]


def test_report_names_a_rollout_by_its_number_and_says_when_there_is_none(lab: tuple[Path, Path]) -> None:
    root = lab[0]
    data = CliRunner().invoke(main, ["report", "wearable-activity", "--rollout", "1", "-o", "json", "--root", str(root)])
    assert data.exit_code == 0, data.output
    rollout = json.loads(data.stdout)["rollout"]
    assert rollout["number"] == 1 and rollout["release"].startswith("rel-")
    assert all("previous" not in e["measurements"]["samples_ms"] for e in rollout["devices"])  # a first install
    missing = CliRunner().invoke(main, ["report", "wearable-activity", "--rollout", "9", "--root", str(root)])
    assert missing.exit_code != 0 and "no rollout #9 of wearable-activity" in missing.output


def test_the_report_is_self_contained(page: Path) -> None:
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)  # loads nothing from anywhere
    assert text.count('<figure class="plot">') == 3  # the build stages, and one per device
    assert "lab/lab-01" in text and "lab/lab-02" in text and "p50 latency-regression" in text
    assert "source hwmon, boundary board" in text


def test_chromium_renders_every_plot_without_errors(page: Path) -> None:
    body = re.search(r"<body[^>]*>", chromium("--dump-dom", page.as_uri()).stdout)
    assert body is not None
    attributes = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(0)))
    assert attributes == {"plots-expected": "3", "plots-drawn": "3", "errors": "0"}, attributes
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / "report-wearable-activity.png"
    chromium("--window-size=1200,2600", f"--screenshot={shot}", page.as_uri())
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000) or []
    assert image.size == (1200, 2600) and len(colours) > 50  # drawn plots, not a blank page


def test_the_page_check_catches_a_plot_that_did_not_draw_and_a_script_error(tmp_path: Path) -> None:
    from edgeops.report import render_html

    rollout = {"id": 1, "number": 1, "kind": "apply", "started_at": "t", "artifacts": {}, "devices": []}
    broken = render_html("dep", rollout, {}).replace(
        "</body>", '<figure class="plot"><p>no svg</p></figure><script>undefined_call()</script></body>')
    path = tmp_path / "broken.html"
    path.write_text(broken)
    body = re.search(r"<body[^>]*>", chromium("--dump-dom", path.as_uri()).stdout)
    assert body is not None
    attributes = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(0)))
    assert attributes == {"plots-expected": "1", "plots-drawn": "0", "errors": "1"}, attributes
