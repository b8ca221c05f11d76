"""Open the fleet store a ``--db`` names: a SQLite file path (the default) or a ``postgresql://`` URL.

Every reader and writer of the store (ingest workers, the monitor's tracker, the query commands)
opens it here, so both engines take the same arguments and give the same interface
(:class:`.store.FleetStore`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from .store import PG_SCHEMES, FleetStore, describe, is_pg_url

__all__ = ["PG_SCHEMES", "describe", "is_pg_url", "open_store"]


def open_store(db: Union[str, Path], **kwargs: Any) -> FleetStore:
    """The store at ``db`` (``create``, ``readonly``, ``autocheckpoint`` as for :class:`FleetStore`)."""
    if is_pg_url(db):
        from .store_pg import PgFleetStore  # psycopg is imported only when a server is named

        return PgFleetStore(str(db), **kwargs)
    return FleetStore(db, **kwargs)
