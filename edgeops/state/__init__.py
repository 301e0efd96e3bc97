"""Where edgeops keeps its history and locks: one interface (``Ledger``), two engines.

``EDGEOPS_STATE`` picks one by URL: ``sqlite:///path/ledger.sqlite`` (the default, a file in the
repository's ``.edgeops/``) or ``postgresql://user@host:port/db`` for teams and CI runners that must
share history and locks.
"""

from __future__ import annotations

from pathlib import Path

from edgeops.errors import InputError
from edgeops.state.ledger import Ledger, LedgerError, LockHeld

__all__ = ["Ledger", "LedgerError", "LockHeld", "open_ledger"]


def open_ledger(url: str | None, default: Path, variable: str = "EDGEOPS_STATE") -> Ledger:
    """The ledger ``url`` names (``default``, a SQLite file, without one). A URL that names no ledger is an
    input error naming ``variable`` (where the URL came from)."""
    import urllib.parse

    from edgeops.state.sqlite import SqliteLedger

    if not url:
        return SqliteLedger(default)
    if url.startswith("sqlite:///"):  # sqlite:///var/lib/edgeops.sqlite and sqlite:////var/...: absolute paths
        return SqliteLedger(Path("/" + url.removeprefix("sqlite://").lstrip("/")), variable)
    if url.startswith(("postgresql://", "postgres://")):
        from edgeops.state.postgres import PostgresLedger

        try:
            urllib.parse.urlsplit(url).port
        except ValueError:
            raise InputError.at(variable, None, "", f"{_redacted(url)}: the port is not a number from 1 to "
                                "65535") from None
        return PostgresLedger(url)
    raise InputError.at(variable, None, "", f"{url.split('://')[0]}://...: not a state backend edgeops knows; use "
                        "sqlite:///path/to/ledger.sqlite or postgresql://user@host:port/database")


def _redacted(url: str) -> str:
    """The URL without a password."""
    scheme, _, rest = url.partition("://")
    credentials, at, place = rest.rpartition("@")
    return f"{scheme}://{credentials.split(':')[0]}{at}{place}" if at else url
