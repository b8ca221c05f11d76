"""Open the fleet store a ``--db`` names: a SQLite file path (the default) or a ``postgresql://`` URL.

Every reader and writer of the store (ingest workers, the monitor's tracker, the query commands)
opens it here, so both engines take the same arguments and give the same interface
(:class:`.store.FleetStore`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from .store import FleetStore

PG_SCHEMES = ("postgresql://", "postgres://")


def is_pg_url(db: Union[str, Path]) -> bool:
    """True when ``db`` names a PostgreSQL server rather than a SQLite file."""
    return isinstance(db, str) and db.startswith(PG_SCHEMES)


def open_store(db: Union[str, Path], **kwargs: Any) -> FleetStore:
    """The store at ``db`` (``create``, ``readonly``, ``autocheckpoint`` as for :class:`FleetStore`)."""
    if is_pg_url(db):
        from .store_pg import PgFleetStore  # psycopg is imported only when a server is named

        return PgFleetStore(str(db), **kwargs)
    return FleetStore(db, **kwargs)


def describe(db: Union[str, Path]) -> str:
    """``db`` for messages and JSON output, without a password."""
    if not is_pg_url(db):
        return str(db)
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(str(db))
    if parts.password is None:
        return str(db)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
