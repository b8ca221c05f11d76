"""Regenerate calibration/digits/ from scikit-learn's digits (training split only).

    python calibration/make_digits.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgekit.data import digits
from edgekit.data.sources import tensor_sha256

COUNT = 300


def main() -> None:
    out = Path(__file__).resolve().parent / "digits"
    out.mkdir(exist_ok=True)
    train = digits.splits(seed=0)["train"]
    x = digits.to_tensor(train.images[:COUNT])
    np.savez(out / "calib.npz", x=x)
    import hashlib

    manifest = {
        "name": "digits",
        "source": "sklearn.datasets.load_digits, stratified split seed 0 (edgekit.data.digits.splits), "
                  "first %d images of the training split" % COUNT,
        "count": COUNT,
        "preprocessing": digits.preprocess_spec(),
        "shape": list(x.shape),
        "dtype": str(x.dtype),
        "tensor_sha256": tensor_sha256(x),
        "file_sha256": hashlib.sha256((out / "calib.npz").read_bytes()).hexdigest(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
