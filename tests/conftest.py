"""Shared fixtures: a scratch copy of the repository's declarative files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def copy_repo(dest: Path) -> Path:
    """Copy manifests, profiles, templates and example models/data into ``dest``."""
    for name in ("manifests", "device_profiles", "templates"):
        shutil.copytree(REPO / name, dest / name)
    for name in ("models", "data"):
        shutil.copytree(REPO / "examples" / name, dest / "examples" / name)
    return dest


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")
