"""Things that turn a raw batch into model outputs: a torch module, or a signed bundle run by the device runtime.

Both take the same *raw* data (images uint8 (N, C, H, W); sequences (N, C, L); tabular (N, F)) and
apply their own preprocessing, so a report compares them on exactly the same inputs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import CalibrationError, ConfigError

log = logging.getLogger(__name__)


@runtime_checkable
class Predictor(Protocol):
    """A named model: raw batch → outputs (N, out) (logits for classification, real units otherwise)."""

    name: str

    def predict(self, raw: np.ndarray) -> np.ndarray: ...


class TorchPredictor:
    """A torch module with the fitted normalization in front (``norm.apply(raw)`` → float32).

    The module runs in eval mode without gradients, in batches of ``batch_size``, on the device
    its parameters live on.
    """

    def __init__(self, model: Any, norm: Any, name: str = "fp32 (torch)", batch_size: int = 256):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, not {batch_size}")
        self.model = model
        self.norm = norm
        self.name = name
        self.batch_size = batch_size

    def predict(self, raw: np.ndarray) -> np.ndarray:
        import torch

        raw = np.asarray(raw)
        if len(raw) == 0:
            raise CalibrationError("no samples to predict", hint="pass at least one sample")
        param = next(iter(self.model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        was_training = self.model.training
        self.model.eval()
        outs = []
        try:
            with torch.no_grad():
                for start in range(0, len(raw), self.batch_size):
                    x = np.ascontiguousarray(self.norm.apply(raw[start : start + self.batch_size]), dtype=np.float32)
                    out = self.model(torch.from_numpy(x).to(device))
                    outs.append(out.float().cpu().numpy())
        finally:
            self.model.train(was_training)
        return _as_2d(np.concatenate(outs))


class BundlePredictor:
    """A signed bundle (``.ekb``) verified and run by ``edgekit_runtime``, with the bundle's own preprocessing
    (``image``: raw (N, C, H, W) images become decoded HxW / HxWxC RGB images; ``tensor``: the raw batch).

    ``keyring``: a ``Keyring``, a ``.pub`` file or a folder of them; None is the host keyring the CLI
    uses (``$EDGEKIT_KEYRING`` or ``/etc/edgekit/keys``). ``name`` defaults to "<precision> (<backend>)".
    Close it (or use ``with``) to drop the engine and the extracted files.
    """

    def __init__(self, bundle_path: str | os.PathLike, keyring: Any = None, name: str | None = None,
                 batch_size: int = 256):
        import edgekit_runtime
        from edgekit_runtime.keyring import Keyring

        ring = keyring if isinstance(keyring, Keyring) else (
            Keyring.from_paths(keyring) if keyring is not None else Keyring.default())
        self.path = Path(bundle_path)
        self.model = edgekit_runtime.load(self.path, keyring=ring)
        backend = self.model.manifest.backend
        self.name = name or f"{backend.precision} ({backend.name})"
        self.batch_size = max(1, batch_size)
        self.preprocess_spec: dict[str, Any] = dict(self.model.manifest_json.get("preprocess") or {})

    def predict(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw)
        if len(raw) == 0:
            raise CalibrationError("no samples to predict", hint="pass at least one sample")
        first = self.model.inputs[0]
        fixed = first.shape[0] if first.shape and isinstance(first.shape[0], int) else None
        step = fixed or self.batch_size
        outs = []
        for start in range(0, len(raw), step):
            chunk = raw[start : start + step]
            # several inputs come as a structured array of tensors (one field per input name), run as they are
            x = chunk if chunk.dtype.names else self._preprocess(chunk)
            n = len(x)
            if fixed and n < fixed:  # a fixed-batch model: pad the last chunk, keep the real rows
                x = np.concatenate([x, np.repeat(x[-1:], fixed - n, axis=0)])
            outs.append(np.asarray(self.model.run(x)[self.model.outputs[0].name])[:n])
        return _as_2d(np.concatenate(outs).astype(np.float32, copy=False))

    def _preprocess(self, raw: np.ndarray) -> np.ndarray:
        if self.preprocess_spec.get("type", "image") == "image":
            return self.model.preprocess(image_items(raw))
        return self.model.preprocess(np.ascontiguousarray(raw))  # "tensor": the raw batch, normalized on axis 1

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> "BundlePredictor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def image_items(raw: np.ndarray) -> list[np.ndarray]:
    """(N, C, H, W) raw images → the runtime's decoded-image form: HxW (one channel) or HxWxC, taken as RGB.

    uint8 stays uint8; anything else becomes float32 (the bundle's ``scale`` says what range it expects).
    """
    if raw.ndim != 4:
        raise CalibrationError(f"images must be (N, C, H, W), got shape {raw.shape}",
                               hint="pass the raw test images as loaded (before normalization)")
    if raw.dtype != np.uint8:
        raw = raw.astype(np.float32, copy=False)
    if raw.shape[1] == 1:
        return [np.ascontiguousarray(img[0]) for img in raw]
    return [np.ascontiguousarray(img.transpose(1, 2, 0)) for img in raw]


def _as_2d(out: np.ndarray) -> np.ndarray:
    """Outputs as (N, out): a flat (N,) output becomes one column."""
    out = np.asarray(out, dtype=np.float32)
    return out.reshape(len(out), -1)
