"""Pull mode's small parts: the systemd unit, broker password lines, topics, and the desired state's shape."""

from __future__ import annotations

import base64
import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from edgeops.labpull import AGENT_DIR, password_line


def test_the_systemd_unit_runs_the_daemon_like_the_lab_and_keeps_trial_timers_across_restarts() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(AGENT_DIR / "edgeops-pulld.service")
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[1]).name == "edgeops_pulld.py" and argv[2] == "--config"
    assert Path(argv[1]).parent == Path(argv[3]).parent  # pull.json beside the agent, as `lab up` writes it
    assert service["Restart"] == "always"
    assert service["KillMode"] == "process"  # the default would kill the dead-man timers with the daemon


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs Debian's mosquitto")
def test_password_lines_are_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    file = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(file), "device-7", "s3cret word"], check=True)
    written = file.read_text().strip()
    salt = base64.b64decode(written.split("$")[3])
    assert password_line("device-7", "s3cret word", salt) == written
    assert password_line("device-7", "another", salt) != written
