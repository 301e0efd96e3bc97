"""Mistakes nobody listed: every manifest, fleet and profile line mutated (a wrong value, a swapped pair of
letters in its key, the line deleted), sampled with a fixed seed. validate either accepts the file or says
where it is wrong (exit 3, file:line), never a traceback, and quickly."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main

VALUES = ["-1", "0", "x", "[]", "{}", "''", "null", "1e400", "true", "[a, b]", "{a: 1}", "999999999999",
          "'../../etc/passwd'", "'Nu3_Pi'", "'  '", "0.5", "'\\0'"]
KEY_LINE = re.compile(r"^(\s*-?\s*)([A-Za-z_]+):\s*(\S.*)?$")
LOCATED = re.compile(r"^error: [^:]+:\d+: ")


def mutations(root: Path, seed: int, count: int) -> list[tuple[str, int, str | None]]:
    rng = random.Random(seed)
    found = []
    for path in sorted([*root.glob("manifests/**/*.yaml"), *root.glob("device_profiles/*.yaml")]):
        for number, line in enumerate(path.read_text().splitlines()):
            match = KEY_LINE.match(line)
            if not match:
                continue
            key = match.group(2)
            if match.group(3) and not match.group(3).startswith("#"):
                found.append((str(path.relative_to(root)), number, f"{match.group(1)}{key}: {rng.choice(VALUES)}"))
            if len(key) > 3:
                swap = rng.randrange(len(key) - 1)
                typo = key[:swap] + key[swap + 1] + key[swap] + key[swap + 2:]
                found.append((str(path.relative_to(root)), number, line.replace(key + ":", typo + ":", 1)))
            found.append((str(path.relative_to(root)), number, None))
    return rng.sample(found, min(count, len(found)))


def test_a_sample_of_mutated_lines_is_accepted_or_located(repo_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo_copy)
    failures = []
    for file, number, new in mutations(repo_copy, seed=28, count=150):
        path = repo_copy / file
        original = path.read_text()
        lines = original.splitlines()
        path.write_text("\n".join(lines[:number] + ([new] if new is not None else []) + lines[number + 1:]) + "\n")
        started = time.monotonic()
        result = CliRunner().invoke(main, ["validate"])
        took = time.monotonic() - started
        path.write_text(original)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            failures.append((file, number + 1, new, repr(result.exception)))
        elif result.exit_code not in (0, 3) or (result.exit_code == 3 and not any(map(LOCATED.match, errors))):
            failures.append((file, number + 1, new, result.exit_code, result.stderr[-300:]))
        elif took > 30:  # far beyond the 3 s a quiet host takes: a hang, not a loaded machine
            failures.append((file, number + 1, new, f"{took:.0f} s"))
    assert not failures, failures
