"""The Python API a device application uses: ``load(bundle).predict(images)``."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import processing
from .bundle import VerifiedBundle, open_bundle
from .contract.errors import EngineError, ErrorCode, InputError
from .contract.manifest import DENSE_POSTPROCESS, Manifest, Postprocess
from .engines import Engine, EngineOptions, check_input, create_engine
from .keyring import Keyring


class Model:
    """A verified bundle loaded into an inference engine.

    ``manifest`` is the typed :class:`~.contract.manifest.Manifest`;
    :attr:`manifest_json` is the signed JSON object, for JSON output.
    """

    def __init__(self, bundle: VerifiedBundle, engine: Engine, workdir: Path, owns_workdir: bool):
        self.bundle = bundle
        self.manifest: Manifest = bundle.manifest
        self.engine = engine
        self.workdir = workdir
        self._owns_workdir = owns_workdir
        labels_name = self.manifest.labels
        self.labels = bundle.members[labels_name].decode().splitlines() if labels_name else None
        self.inputs = engine.inputs
        self.outputs = engine.outputs

    @property
    def manifest_json(self) -> dict[str, Any]:
        """The manifest as signed (a JSON object, with any fields of a newer 1.x this runtime does not know)."""
        return self.bundle.manifest_json

    # -- raw tensors -------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """Run on already-preprocessed tensors (checked against the signature).

        ``feeds``: one array (a single-input model) or a dict of arrays by input name;
        anything else is an :class:`InputError` (``INPUT_MISSING`` for ``None``,
        ``INPUT_BAD_DTYPE`` for another type).
        """
        if feeds is None:
            raise InputError("no input given: pass a numpy array, or a dict of them by input name",
                             code=ErrorCode.INPUT_MISSING)
        if not isinstance(feeds, (np.ndarray, dict)):
            raise InputError(f"the input is {_type_name(feeds)}, not a numpy array or a dict of them by input name",
                             code=ErrorCode.INPUT_BAD_DTYPE, hint="convert it with numpy.asarray(x, dtype=...)")
        if isinstance(feeds, np.ndarray) and feeds.dtype.names:
            # several inputs in one structured array, a field per input name (a multi-input bundle's health sample)
            feeds = {name: np.ascontiguousarray(feeds[name]) for name in feeds.dtype.names}
        if isinstance(feeds, np.ndarray):
            if len(self.inputs) != 1:
                raise InputError(
                    f"the model has {len(self.inputs)} inputs; pass a dict by name",
                    code=ErrorCode.INPUT_MISSING,
                )
            feeds = {self.inputs[0].name: feeds}
        for spec in self.inputs:
            if spec.name not in feeds or feeds[spec.name] is None:
                raise InputError(f"input {spec.name!r} is missing", code=ErrorCode.INPUT_MISSING)
            if not isinstance(feeds[spec.name], np.ndarray):
                raise InputError(f"input {spec.name!r} is {_type_name(feeds[spec.name])}, not a numpy array",
                                 code=ErrorCode.INPUT_BAD_DTYPE, hint="convert it with numpy.asarray(x, dtype=...)")
        chunks = self._split_batch(feeds)
        if chunks is not None:
            outs = [self.run(chunk) for chunk in chunks]
            return {name: np.concatenate([o[name] for o in outs]) for name in outs[0]}
        for spec in self.inputs:
            check_input(spec, feeds[spec.name])
        return self.engine.run(feeds)

    def _split_batch(self, feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]] | None:
        """A batch of N for a model with a fixed batch B (N a multiple of B): N/B runs.

        Fixed-batch models (TFLite, many ONNX exports) can still be given a
        list of images; anything else falls through to the shape check.
        """
        first = self.inputs[0]
        fixed = first.shape[0] if first.shape else None
        x = feeds[first.name]
        if not isinstance(fixed, int) or x.ndim != len(first.shape) or len(x) == fixed or len(x) % fixed:
            return None
        if any(len(feeds[s.name]) != len(x) for s in self.inputs):
            return None
        return [{s.name: feeds[s.name][i : i + fixed] for s in self.inputs} for i in range(0, len(x), fixed)]

    # -- images in, results out -------------------------------------------
    def preprocess(self, items: Iterable[str | os.PathLike | np.ndarray] | np.ndarray,
                   meta: list[processing.ImageMeta] | None = None) -> np.ndarray:
        """Inputs → the model's input batch, as the manifest says: image paths and/or decoded uint8
        images, or for ``tensor`` preprocessing raw arrays (one sample each, or one batch) and ``.npy`` paths.
        ``meta``: a list that gets each image's :class:`~.processing.ImageMeta` (size, scale, padding, crop)."""
        return processing.preprocess_batch(items, self.manifest.preprocess, self.inputs[0].shape, meta=meta)

    def postprocess(self, outputs: dict[str, np.ndarray], *, top_k: int | None = None,
                    meta: list[processing.ImageMeta] | None = None) -> list[dict]:
        """The first output → one result per item; ``top_k`` overrides the manifest's (and asks for
        classification results even where the manifest has no postprocessing).

        Detection and segmentation map boxes and masks onto the original images with ``meta``
        (one :class:`~.processing.ImageMeta` per item, from :meth:`preprocess`); without it
        results stay in network-input pixels.
        """
        first = outputs[self.outputs[0].name]
        spec = self.manifest.postprocess
        if top_k is not None:
            spec = replace(spec or Postprocess(), top_k=top_k)
        if spec is not None and spec.type in DENSE_POSTPROCESS and meta is None:
            meta = [self._network_meta()] * len(first)
        return processing.postprocess(first, spec, self.labels, meta)

    def _network_meta(self) -> processing.ImageMeta:
        """The identity mapping for inputs that were already the network input (raw tensors)."""
        pre = self.manifest.preprocess
        if pre is not None and pre.size is not None:
            return processing.ImageMeta.identity(*pre.size)
        shape = self.inputs[0].shape
        layout = self.inputs[0].layout or (pre.layout if pre is not None else "NCHW")
        h, w = ((shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])) if len(shape) == 4 else (None, None)
        if not isinstance(h, int) or not isinstance(w, int):
            raise InputError(f"{self.manifest.postprocess.type} post-processing needs the network input size, "
                             f"which neither preprocess.size nor inputs[0].shape {shape} fixes",
                             code=ErrorCode.INPUT_MISSING, hint="pass meta= from Model.preprocess")
        return processing.ImageMeta.identity(h, w)

    def predict(self, items: Iterable[str | os.PathLike | np.ndarray] | str | os.PathLike | np.ndarray, *,
                top_k: int | None = None) -> list[dict]:
        """Images (paths or decoded uint8) or, for ``tensor`` preprocessing, raw arrays → one result per
        item (``top_k``: see :meth:`postprocess`). A single array is one sample or a batch by its rank.

        Detection results hold boxes in the original image's pixels; segmentation results a mask
        of the original image's size (see ``docs/bundle-format.md``, ``postprocess``)."""
        pre = self.manifest.preprocess
        tensor = pre is not None and pre.type == "tensor"
        if isinstance(items, (str, os.PathLike)) or (
                not tensor and isinstance(items, np.ndarray) and items.dtype == np.uint8 and items.ndim <= 3):
            items = [items]
        meta: list[processing.ImageMeta] = []
        outputs = self.run(self.preprocess(items, meta=meta))
        return self.postprocess(outputs, top_k=top_k, meta=meta or None)

    def health_check(self) -> dict[str, Any]:
        """Run the sample input stored in the bundle and compare with its expected output.

        Passes when the output is finite and ``allclose(got, expected, atol, rtol)``
        with the manifest's tolerances; ``{"ok": True, "checked": False}`` when the bundle has none.
        Raises :class:`EngineError` (``ENGINE_HEALTH_CHECK_FAILED``) when the sample members
        are not plain ``.npy`` arrays (pickled objects are never loaded).
        """
        hc = self.manifest.health_check
        if hc is None:
            return {"ok": True, "checked": False}
        x = _health_array(self.bundle.members[hc.input], hc.input)
        expected = _health_array(self.bundle.members[hc.expected_output], hc.expected_output)
        got = self.run(x)[self.outputs[0].name]
        return compare_health(got, expected, hc.atol, hc.rtol)

    def describe(self) -> dict[str, Any]:
        """Model identity, target, backend, signer and the engine that runs it (JSON-ready)."""
        m = self.manifest
        return {
            "model": m.model.to_dict(),
            "target": m.target.name,
            "backend": m.backend.name,
            "precision": m.backend.precision,
            "key_id": self.bundle.key_id,
            **self.engine.describe(),
        }

    def close(self) -> None:
        """Drop the engine and remove the extracted bundle (when this model extracted it)."""
        self.engine = None  # type: ignore[assignment]
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def compare_health(got: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """The health check's verdict on an output: finite, and within ``atol + rtol·|expected|`` everywhere."""
    finite = bool(np.isfinite(got).all())
    close = bool(np.allclose(got, expected, atol=atol, rtol=rtol))
    return {
        "ok": finite and close,
        "checked": True,
        "finite": finite,
        "max_abs_diff": float(np.max(np.abs(got.astype(np.float64) - expected))),
        "atol": atol,
        "rtol": rtol,
    }


def _load_npy(data: bytes) -> np.ndarray:
    import io

    return np.load(io.BytesIO(data), allow_pickle=False)


def _health_array(data: bytes, name: str) -> np.ndarray:
    """A health-check member as a numeric array, or ENGINE_HEALTH_CHECK_FAILED naming the member."""
    try:
        a = _load_npy(data)
    except (ValueError, OSError, EOFError) as exc:  # pickled, not .npy, or cut short
        raise EngineError(f"the health check's {name!r} is not a .npy array readable without pickle ({exc})",
                          code=ErrorCode.ENGINE_HEALTH_CHECK_FAILED,
                          hint="rebuild the bundle with `edgekit build`") from None
    numeric = isinstance(a, np.ndarray) and not a.dtype.hasobject and (
        a.dtype.kind in "biuf" or (a.dtype.names is not None  # several inputs: a field per input name
                                   and all(a.dtype.fields[n][0].base.kind in "biuf" for n in a.dtype.names)))
    if not numeric:
        raise EngineError(f"the health check's {name!r} holds {getattr(a, 'dtype', type(a))}, not numbers",
                          code=ErrorCode.ENGINE_HEALTH_CHECK_FAILED, hint="rebuild the bundle with `edgekit build`")
    return a


def _type_name(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def load(
    path: str | os.PathLike,
    *,
    keyring: Keyring | str | os.PathLike | None = None,
    threads: int | None = None,
    engine: str | None = None,
    inference_precision: str | None = None,
    spin_wait: bool | None = None,
    workdir: str | os.PathLike | None = None,
) -> Model:
    """Verify the bundle at ``path`` and load it into its engine.

    ``keyring``: a :class:`Keyring`, a path to a ``.pub`` file or a directory of
    them; default ``$EDGEKIT_KEYRING`` or ``/etc/edgekit/keys``. ``engine``
    forces one engine instead of the manifest's order. ``spin_wait=False``
    stops ONNX Runtime's idle threads from spinning (for several models in one
    process). Nothing is extracted before the bundle has been verified.
    """
    if keyring is not None and not isinstance(keyring, Keyring):
        keyring = Keyring.from_paths(keyring)
    bundle = open_bundle(path, keyring)
    owns = workdir is None
    target = Path(tempfile.mkdtemp(prefix="edgekit-model-")) if owns else Path(workdir)
    try:
        bundle.extract(target)
        options = EngineOptions.from_backend(bundle.manifest.backend.options, threads=threads,
                                             inference_precision=inference_precision, spin_wait=spin_wait)
        eng = create_engine(target, bundle.manifest, options, order=[engine] if engine else None)
    except Exception:
        if owns:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return Model(bundle, eng, target, owns)
