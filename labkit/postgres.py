"""A throw-away PostgreSQL cluster on 127.0.0.1 from Debian's `postgresql` package, for tests and benchmarks.

initdb refuses to run as root, so as root the cluster belongs to the package's `postgres` user; its
data directory lives outside pytest's private temporary tree so that user can reach it. Trust
authentication on 127.0.0.1 only: nothing else can connect, and the cluster is deleted afterwards.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from labkit.repo import free_ports


def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: scripts/test.sh installs Debian's postgresql package")
    return found[-1].parent


def _as_owner(args: list[str], owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *args] if owner else args


@contextmanager
def running_postgres() -> Iterator[str]:
    """Start a cluster; yield the URL of its `postgres` database for the superuser `edgeops`; remove it all."""
    binaries = postgres_bin()
    owner = "postgres" if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="edgeops-pg-"))
    base.chmod(0o755)
    data, sockets = base / "data", base / "run"
    sockets.mkdir()
    if owner:
        user = pwd.getpwnam(owner)
        os.chown(base, user.pw_uid, user.pw_gid)
        os.chown(sockets, user.pw_uid, user.pw_gid)
    port = free_ports(1)[0]
    log = base / "postgres.log"
    try:
        subprocess.run(_as_owner([str(binaries / "initdb"), "-D", str(data), "-U", "edgeops", "--auth=trust",
                                  "-E", "UTF8", "--no-sync", "--no-instructions"], owner),
                       check=True, capture_output=True, text=True, timeout=120)
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        subprocess.run(_as_owner([str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w",
                                  "-t", "60", "start"], owner), check=True, capture_output=True, text=True, timeout=90)
        yield f"postgresql://edgeops@127.0.0.1:{port}/postgres"
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr or exc.stdout}\n"
                           f"{log.read_text() if log.exists() else ''}") from None
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_as_owner([str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], owner),
                           capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def fresh_database(server_url: str, name: str) -> str:
    """An empty database on the cluster, and its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as db:
        db.execute(f'DROP DATABASE IF EXISTS "{name}"')
        db.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"
