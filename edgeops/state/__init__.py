"""Where edgeops keeps its history and locks: one interface (``Ledger``), two engines.

``EDGEOPS_STATE`` picks one by URL: ``sqlite:///path/ledger.sqlite`` (the default, a file in the
repository's ``.edgeops/``) or ``postgresql://user@host:port/db`` for teams and CI runners that must
share history and locks.
"""

from __future__ import annotations

from pathlib import Path

from edgeops.state.ledger import Ledger, LedgerError, LockHeld

__all__ = ["Ledger", "LedgerError", "LockHeld", "open_ledger"]


def open_ledger(url: str | None, default: Path) -> Ledger:
    """The ledger ``url`` names (``default``, a SQLite file, without one)."""
    from edgeops.state.sqlite import SqliteLedger

    if not url:
        return SqliteLedger(default)
    if url.startswith("sqlite:///"):
        return SqliteLedger(Path(url.removeprefix("sqlite://")))  # sqlite:///var/lib/edgeops.sqlite: an absolute path
    if url.startswith(("postgresql://", "postgres://")):
        from edgeops.state.postgres import PostgresLedger

        return PostgresLedger(url)
    raise LedgerError(f"EDGEOPS_STATE={url.split('://')[0]}://...: not a state backend edgeops knows",
                      hint="use sqlite:///path/to/ledger.sqlite or postgresql://user@host:port/database")
