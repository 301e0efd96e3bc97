"""The alert rules and the dashboard: promtool checks the rules and runs their unit tests; the dashboard plots
every rule's expression (a real Prometheus runs each query in tests/e2e/test_metrics_ssh.py)."""

from __future__ import annotations

import json
import subprocess

import yaml

from labkit.prometheus import DASHBOARD, RULES, dashboard_expressions, tool


def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    checked = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([tool("promtool"), "test", "rules", "edgeops-rules.test.yml"], cwd=RULES.parent,
                            capture_output=True, text=True)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_promtool_test_fails_when_a_rule_stops_firing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The unit tests can fail: a rule whose condition never holds fails them."""
    rules = yaml.safe_load(RULES.read_text())
    rules["groups"][0]["rules"][0]["expr"] = "vector(0) > 1"
    (tmp_path / "edgeops-rules.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "edgeops-rules.test.yml").write_text((RULES.parent / "edgeops-rules.test.yml").read_text())
    tested = subprocess.run([tool("promtool"), "test", "rules", "edgeops-rules.test.yml"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert tested.returncode != 0 and "EdgeopsDeviceUnhealthy" in tested.stdout + tested.stderr


def test_the_dashboard_plots_every_alert_condition_and_names_only_exported_metrics() -> None:
    board = json.loads(DASHBOARD.read_text())
    expressions = [e for _, e in dashboard_expressions()]
    rules = [r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]]
    for rule in rules:
        assert rule["expr"] in expressions, f"the dashboard lacks the condition of {rule['alert']}"
    import re

    from edgeops.exporter import openmetrics, registry_of

    exported = {line.split()[2] for line in openmetrics(registry_of({}, {}, [], {}, 0.0)).decode().splitlines()
                if line.startswith("# TYPE")}
    named = {m for e in expressions for m in re.findall(r"\b(edgeops_[a-z0-9_]+)", e)}
    assert named <= exported, named - exported
    assert board["uid"] == "edgeops-fleets" and len({p["id"] for p in board["panels"]}) == len(board["panels"])
