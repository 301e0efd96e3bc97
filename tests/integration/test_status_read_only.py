"""Read paths never build, and one broken document does not hide the others' devices."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from edgeops.cli import main
from edgeops.errors import ExitCode


def test_status_over_the_repository_reports_a_broken_manifest_and_still_shows_the_rest(repo_copy: Path) -> None:
    broken = (repo_copy / "manifests" / "camera.yaml").read_text()
    broken = broken.replace("name: meter-digits", "name: broken-one").replace("metric: accuracy", "metric: f1")
    assert "metric: f1" in broken
    (repo_copy / "manifests" / "broken.yaml").write_text(broken)
    result = CliRunner().invoke(main, ["status", "-o", "json", "--root", str(repo_copy)])
    assert result.exit_code == ExitCode.FAILED, result.output
    report = json.loads(result.stdout)
    errors = {entry["deployment"]: entry["error"] for entry in report if "error" in entry}
    file = next(name for name in errors if name.endswith("manifests/broken.yaml"))  # named as edgeops runs
    assert any(line.startswith(f"{file}:") and "spec.quality.metric" in line for line in errors[file])
    shown = {entry["deployment"]: entry["devices"] for entry in report if "devices" in entry}
    assert "meter-digits" in shown and shown["meter-digits"], report
    assert {row["sync"] for row in shown["meter-digits"]} == {"Unknown"}  # nothing built: status never builds
    assert all("not built" in row["message"] for row in shown["meter-digits"])
    assert not (repo_copy / ".edgeops" / "cache").exists() or not any((repo_copy / ".edgeops" / "cache").iterdir())


def test_status_of_a_named_broken_manifest_is_invalid_input(repo_copy: Path) -> None:
    manifest = repo_copy / "manifests" / "camera.yaml"
    manifest.write_text(manifest.read_text().replace("metric: accuracy", "metric: f1"))
    result = CliRunner().invoke(main, ["status", str(manifest), "--root", str(repo_copy)])
    assert result.exit_code == ExitCode.INVALID and "spec.quality.metric" in result.output
