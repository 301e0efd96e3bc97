"""Shared fixtures: a scratch copy of the repository's declarative files, a lab fleet of real sshd devices."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labkit.postgres import fresh_database, running_postgres
from labkit.repo import copy_repo, make_hostile_home, running_lab

_RUN: dict[str, Any] = {}  # this process's config and session, and whether a signal was passed on


def _workers() -> list[int]:
    """The pids of this process's pytest-xdist workers, when it is the run's controller (else none)."""
    import os

    config = _RUN.get("config")
    if config is None or not config.pluginmanager.has_plugin("dsession"):
        return []
    children = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                children.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return children


def _interrupted(signum: int, frame: object) -> None:
    """SIGTERM ends the run as Ctrl-C does, and no test starts after it (even if the one running catches the
    interrupt: apply does, to stop its rollout cleanly). The controller of a parallel run passes it on to its
    workers instead, once: each stops, tears its own fixtures down and reports, and the run ends interrupted (had
    the controller stopped at once, xdist would have cut the workers' teardown short)."""
    import os

    if (session := _RUN.get("session")) is not None:
        session.shouldstop = f"stopped by signal {signum}"
    workers = [] if _RUN.get("forwarded") else _workers()
    if not workers:
        raise KeyboardInterrupt(f"signal {signum}")
    _RUN["forwarded"] = True
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def pytest_configure(config: pytest.Config) -> None:
    """A run stopped by SIGTERM (a CI timeout, ``kill``) ends as Ctrl-C does: fixtures tear down, so the lab's
    sshd devices, brokers and databases a test started are stopped, not left running."""
    import signal

    _RUN["config"] = config
    signal.signal(signal.SIGTERM, _interrupted)


def pytest_sessionstart(session: pytest.Session) -> None:
    _RUN["session"] = session


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _RUN.get("forwarded"):  # the workers stopped on a signal: not a pass, however many tests passed
        session.exitstatus = pytest.ExitCode.INTERRUPTED


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
