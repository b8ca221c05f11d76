"""Tune fixtures: a small digits set (trials train in seconds); pg_url (a throwaway PostgreSQL database) is
the root conftest's."""

from __future__ import annotations

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
