"""Shared fixtures: a scratch copy of the repository's declarative files, a lab fleet of real sshd devices."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from labkit.postgres import fresh_database, running_postgres
from labkit.repo import copy_repo, make_hostile_home, running_lab


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A run stopped by SIGTERM (a CI timeout, ``kill``) ends as Ctrl-C does: fixtures tear down, so the lab's
    sshd devices, brokers and databases a test started are stopped, not left running."""
    import signal

    signal.signal(signal.SIGTERM, _interrupted)


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")


@pytest.fixture(scope="session")
def hostile_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hostile_home(tmp_path_factory.mktemp("hostile-home"))


@pytest.fixture(scope="module")
def lab_repo(tmp_path_factory: pytest.TempPathFactory, hostile_home: Path):
    """A repo copy whose lab fleet (4 devices) runs as real sshd processes, under a hostile login HOME."""
    if not Path("/usr/sbin/sshd").exists():
        pytest.fail("openssh-server is not installed: run scripts/install.sh (CI must not skip these tests)")
    with running_lab(tmp_path_factory.mktemp("lab"), 4, hostile_home) as root:
        yield root


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throw-away PostgreSQL cluster (Debian's package) on 127.0.0.1 for the whole run."""
    with running_postgres() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server: str, request: pytest.FixtureRequest) -> str:
    """An empty database of its own for one test."""
    return fresh_database(postgres_server, "t_" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16])


@pytest.fixture(autouse=True)
def nothing_leaves_this_machine(request: pytest.FixtureRequest) -> Iterator[None]:
    """The boundary fuzzer's audit hook over every end-to-end test: no connection, and no name lookup, that would
    leave this machine (loopback and unix sockets only); one is refused when tried and fails the test."""
    if "e2e" not in request.node.nodeid.split("::")[0]:
        yield
        return
    from labkit.audit import watching

    with watching(block_off_machine=True) as seen:
        yield
    assert not seen.left, seen.connected


@pytest.fixture(scope="session", autouse=True)
def no_trial_timer_outlives_the_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every switch arms a device's trial timer (a process that waits out the window); a test that ends with a
    trial running leaves one behind: stop those of this run's device roots when the run ends."""
    yield
    import os
    import signal

    base = str(tmp_path_factory.getbasetemp())
    for entry in Path("/proc").iterdir():
        try:
            words = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "watchdog" in words and "--root" in words and words[words.index("--root") + 1].startswith(base):
            try:
                os.kill(int(entry.name), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
