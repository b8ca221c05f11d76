"""Fixtures shared by every test directory: keys and a trained digits CNN (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("host")


@pytest.fixture(scope="session")
def keys(workdir) -> dict[str, Path]:
    from edgekit.signing import generate_keypair

    priv, pub, key_id = generate_keypair(workdir / "keys")
    return {"private": priv, "public": pub, "key_id": key_id}


@pytest.fixture(scope="session")
def signing_key(keys):
    from edgekit.signing import load_private_key

    return load_private_key(keys["private"])


@pytest.fixture(scope="session")
def digits_checkpoint(workdir) -> Path:
    """The digits CNN trained briefly (seeded); ~97–99 % top-1."""
    import torch

    from edgekit.data import digits
    from edgekit.models.digits_cnn import build
    from edgekit.train_minimal import train_classifier

    torch.manual_seed(0)
    s = digits.splits()
    model, acc = train_classifier(build(width=16), digits.to_tensor(s["train"].images), s["train"].labels,
                                  digits.to_tensor(s["val"].images), s["val"].labels, epochs=8)
    assert acc > 93, f"training the test model failed ({acc:.1f} %)"
    path = workdir / "digits_cnn.pt"
    torch.save(model.state_dict(), path)
    return path
