"""What git says about the repository: the commit and author a rollout came from."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def head_info(root: Path) -> dict[str, str | None]:
    """{commit, author, dirty} of HEAD; None values outside a git repository."""
    line = git(root, "log", "-1", "--format=%H%x1f%an <%ae>")
    commit, author = (line.split("\x1f") + [None])[:2] if line else (None, None)
    status = git(root, "status", "--porcelain", "--", "manifests", "device_profiles", "templates")
    return {"commit": commit, "author": author, "dirty": "yes" if status else ("no" if status is not None else None)}
