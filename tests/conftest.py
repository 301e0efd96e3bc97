"""Shared fixtures: a scratch copy of the repository's declarative files, a lab fleet of real sshd devices."""

from __future__ import annotations

from pathlib import Path

import pytest

from labkit.repo import copy_repo, make_hostile_home, write_lab_fleet


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")


@pytest.fixture(scope="session")
def hostile_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hostile_home(tmp_path_factory.mktemp("hostile-home"))


@pytest.fixture(scope="module")
def lab_repo(tmp_path_factory: pytest.TempPathFactory, hostile_home: Path):
    """A repo copy whose lab fleet (4 devices) runs as real sshd processes, under a hostile login HOME."""
    from edgeops.lab import lab_down, lab_up
    from edgeops.manifest.workspace import load_workspace
    from edgeops.targets import target_devices

    if not Path("/usr/sbin/sshd").exists():
        pytest.fail("openssh-server is not installed: run scripts/install.sh (CI must not skip these tests)")
    base = tmp_path_factory.mktemp("lab")
    root = copy_repo(base / "repo")
    write_lab_fleet(root, 4, base / "devices")
    ws = load_workspace(root)
    fleet = ws.fleets["lab"]
    lab_up(ws, fleet, target_devices(ws, "wearable-activity"), login_home=hostile_home)
    yield root
    lab_down(ws, fleet)
