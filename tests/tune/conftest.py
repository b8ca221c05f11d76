"""Tune fixtures: a small digits set (trials train in seconds) and a throwaway PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def small_digits(tmp_path_factory) -> Path:
    """600 of scikit-learn's digits for training/validation and 150 held out: an epoch takes a second or two."""
    from edgekit.demo import write_digits_npz

    root = tmp_path_factory.mktemp("tune-data")
    full = np.load(write_digits_npz(root / "full.npz"))
    path = root / "digits.npz"
    np.savez_compressed(path, x=full["x"][:600], y=full["y"][:600], x_test=full["x_test"][:150],
                        y_test=full["y_test"][:150])
    return path


@pytest.fixture(scope="session")
def pg_server():
    """One throwaway PostgreSQL per session (Debian package `postgresql`); CI=true fails without it."""
    from edgekit.fleet.pgserver import PostgresNotFound, TempPostgres

    try:
        server = TempPostgres().start()
    except PostgresNotFound as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server, request):
    """A postgresql:// URL of an empty database of its own."""
    import re

    import psycopg

    name = "tune_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    admin = f"postgresql://{pg_server.user}@{pg_server.host}:{pg_server.port}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://{pg_server.user}@{pg_server.host}:{pg_server.port}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
