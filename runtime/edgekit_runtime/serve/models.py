"""The model behind a route: one bundle, or the active slot of an agent's state directory.

A request is admitted to the model that is current when it arrives (:meth:`Route.acquire`) and
finishes on it, however long it queues. When the agent switches slots (an OTA install or a
rollback), a watcher thread loads the new bundle, verifies it, warms it (its health-check sample,
then a batch of the server's size), and only then makes it current; the old model is closed once
the last request admitted to it has been answered. A bundle that does not load or warm keeps the
old model serving; the failure is logged and counted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..active import read_pointer
from ..api import Model, load
from ..contract.errors import ErrorCode, RuntimeErrorBase

log = logging.getLogger("edgekit_runtime.serve")


@dataclass(eq=False)
class Loaded:
    """A loaded model with the number of requests admitted to it and not yet answered."""

    model: Model
    slot: str | None
    generation: int
    batchable: bool  # requests may be joined into one batch
    row_by_row: bool = False  # the model says any batch, but its outputs hold one row: run a row at a time
    refs: int = 0
    retired: bool = False
    closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.model.manifest.model.name

    @property
    def version(self) -> str:
        return self.model.manifest.model.version

    def info(self) -> dict[str, Any]:
        m = self.model.manifest
        out = {"version": m.model.version, "release": m.model.release, "precision": m.backend.precision,
               "engine": self.model.engine.name}
        if self.slot is not None:
            out["slot"] = self.slot
        return out


def warm_up(model: Model, max_batch: int) -> tuple[bool, bool]:
    """Run the health check, then a batch of one and of ``max_batch`` rows. Returns ``(batchable,
    row_by_row)``: whether requests may be joined into one batch, and whether a request of several rows
    must run one row at a time (an export whose input says "any batch" but whose graph fixes batch 1).

    Raises the health check's failure as an ``ENGINE_HEALTH_CHECK_FAILED`` error.
    """
    health = model.health_check()
    if not health["ok"]:
        raise RuntimeErrorBase(f"the health check failed (max |diff| {health.get('max_abs_diff')})",
                               code=ErrorCode.ENGINE_HEALTH_CHECK_FAILED, hint="rebuild the bundle")
    one = sample_feeds(model)
    if one is None:
        return False, False
    model.run(one)
    first = model.inputs[0].shape[0] if model.inputs[0].shape else None
    if isinstance(first, int):
        return False, first == 1  # a fixed batch: Model.run steps through it; requests are not joined
    outs = model.run({k: np.concatenate([v] * 2) for k, v in one.items()})
    if not all(o.ndim >= 1 and o.shape[0] == 2 for o in outs.values()):
        log.warning("%s: its input takes any batch but its outputs hold %s rows for 2; requests run a row at a "
                    "time, unbatched", model.manifest.model.name, {k: v.shape[0] for k, v in outs.items()})
        return False, True
    if max_batch > 1:
        model.run({k: np.concatenate([v] * max_batch) for k, v in one.items()})
    return max_batch > 1, False


def sample_feeds(model: Model) -> dict[str, np.ndarray] | None:
    """One row per input: the bundle's health-check sample, else zeros where every dimension is fixed."""
    hc = model.manifest.health_check
    if hc is not None:
        from ..api import _health_array

        x = _health_array(model.bundle.members[hc.input], hc.input)
        feeds = ({n: np.ascontiguousarray(x[n]) for n in x.dtype.names} if x.dtype.names
                 else {model.inputs[0].name: x})
        return {k: v[:1] for k, v in feeds.items()}
    feeds = {}
    for spec in model.inputs:
        dims = [1] + list(spec.shape[1:])
        if not all(isinstance(d, int) for d in dims):
            return None
        feeds[spec.name] = np.zeros(dims, dtype=spec.dtype)
    return feeds


class Route:
    """What one model name serves: a fixed bundle, or an agent's active slot followed as it switches."""

    def __init__(self, source: Path, *, name: str | None = None, max_batch: int = 8, check_every_s: float = 0.5,
                 on_switch: Callable[["Route", Loaded, Loaded | None], None] | None = None,
                 on_failure: Callable[["Route", Exception], None] | None = None, **load_kwargs: Any):
        self.source = Path(source)
        self.follows = self.source.is_dir()
        self.max_batch = max_batch
        self.check_every_s = check_every_s
        self.load_kwargs = load_kwargs
        self.on_switch = on_switch
        self.on_failure = on_failure
        # a followed state directory's shadow candidate changed: (route, its bundle or None)
        self.on_shadow: Callable[["Route", Path | None], None] | None = None
        self._shadow_text: str | None = None
        self._lock = threading.Lock()
        self._current: Loaded | None = None
        self._pointer: str | None = None
        self._generation = 0
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.last_error: RuntimeErrorBase | None = None
        self._load_initial()
        self.name = name or (self._current.name if self._current else self.source.name)

    # -- loading -----------------------------------------------------------
    def _load(self, path: Path, slot: str | None) -> Loaded:
        model = load(path, **self.load_kwargs)
        try:
            batchable, row_by_row = warm_up(model, self.max_batch)
        except Exception:
            model.close()
            raise
        self._generation += 1
        return Loaded(model, slot, self._generation, batchable, row_by_row)

    def _load_initial(self) -> None:
        if not self.follows:
            self._current = self._load(self.source, None)
            return
        self._check_pointer()  # a state directory with nothing installed yet: not ready until an install

    def _check_pointer(self) -> bool:
        slot, text = read_pointer(self.source / "active")
        if slot is None or text == self._pointer:
            return False
        try:
            new = self._load(self.source / "slots" / slot / "bundle.ekb", slot)
        except Exception as exc:  # noqa: BLE001 - a bad slot must never take the server down
            self._pointer = text  # tried; the next switch is a new pointer text
            self.last_error = exc if isinstance(exc, RuntimeErrorBase) else RuntimeErrorBase(
                f"{type(exc).__name__}: {exc}", code=ErrorCode.ENGINE_LOAD_FAILED)
            log.error("slot %s of %s does not load (%s); the previous model keeps serving", slot, self.source, exc)
            if self.on_failure:
                self.on_failure(self, exc)
            return False
        self._pointer = text
        self._swap(new)
        return True

    def _swap(self, new: Loaded) -> None:
        with self._lock:
            old, self._current = self._current, new
            self.last_error = None
            if old is not None:
                old.retired = True
                idle = old.refs == 0
        log.info("serving %s %s (slot %s)", new.name, new.version, new.slot)
        if self.on_switch:
            self.on_switch(self, new, old)
        if old is not None and idle:
            self._close(old)

    def start(self) -> None:
        """Follow the state directory's pointer in a thread (nothing to do for a fixed bundle)."""
        if self.follows and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name=f"edgekit-serve-watch-{self.name}",
                                             daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        first = True
        while first or not self._stop.wait(self.check_every_s):
            try:
                if not first:
                    self._check_pointer()
                self._check_shadow()
            except Exception:  # noqa: BLE001 - keep watching whatever one check did
                log.exception("checking %s for a switch failed", self.source)
            first = False

    def _check_shadow(self) -> None:
        """The agent's ``shadow`` file (``edgekit-agent install --shadow``) names the idle slot's candidate."""
        if self.on_shadow is None:
            return
        try:
            text = (self.source / "shadow").read_text()
        except FileNotFoundError:
            text = ""
        key = f"{text}|{self._current.slot if self._current else None}"
        if key == self._shadow_text:
            return
        self._shadow_text = key
        bundle = None
        try:
            doc = json.loads(text) if text else {}
        except ValueError:
            doc = {}
        slot = doc.get("slot") if isinstance(doc, dict) else None
        if slot in ("a", "b") and self._current is not None and slot != self._current.slot:
            try:
                state = json.loads((self.source / "slots" / slot / "slot.json").read_text()).get("state")
            except (OSError, ValueError):
                state = None
            if state == "shadow":
                bundle = self.source / "slots" / slot / "bundle.ekb"
        self.on_shadow(self, bundle)

    # -- requests ----------------------------------------------------------
    def acquire(self) -> Loaded:
        """The current model, held until :meth:`release`; ``SERVE_NOT_READY`` while none is loaded."""
        with self._lock:
            cur = self._current
            if cur is None:
                why = f" ({self.last_error.message})" if self.last_error else ""
                raise RuntimeErrorBase(f"no model is loaded for {self.name!r} yet{why}",
                                       code=ErrorCode.SERVE_NOT_READY,
                                       hint="install one with `edgekit flash` or `edgekit-agent install`")
            cur.refs += 1
            return cur

    def release(self, loaded: Loaded) -> None:
        with self._lock:
            loaded.refs -= 1
            done = loaded.retired and loaded.refs == 0
        if done:
            self._close(loaded)

    def _close(self, loaded: Loaded) -> None:
        with loaded._lock:
            if loaded.closed:
                return
            loaded.closed = True
        log.info("closed %s %s (slot %s) after its last request", loaded.name, loaded.version, loaded.slot)
        loaded.model.close()

    @property
    def current(self) -> Loaded | None:
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with self._lock:
            cur, self._current = self._current, None
            idle = cur is not None and cur.refs == 0
            if cur is not None:
                cur.retired = True  # a request still on it (a drain that timed out) closes it on its release
        if idle:
            self._close(cur)

    def wait_ready(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while not self.ready and time.monotonic() < end:
            time.sleep(0.05)
        return self.ready
