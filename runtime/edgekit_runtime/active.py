"""The model the device agent made active, for a workload in its own process.

The agent (``edgekit-agent.service``) installs into A/B slots and switches a
pointer file; a workload (``edgekit-workload.service``) follows it::

    from edgekit_runtime.active import ActiveModel

    active = ActiveModel("/var/lib/edgekit-agent")
    while True:
        model = active.get()          # reloads after the agent switched slots (install or rollback)
        results = model.predict(frame)

The workload only reads the state directory. The bundle is verified again when
loaded; a slot that fails to load keeps the previous model serving and the error
is kept in :attr:`ActiveModel.last_error`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from .contract.errors import ErrorCode, RuntimeErrorBase

log = logging.getLogger("edgekit_runtime.active")


def read_pointer(pointer: Path) -> tuple[str | None, str]:
    """An agent's slot pointer file → ``(slot, its text)``; the text changes with every switch (it holds the
    switch's time), so a reader keyed on it reloads after a → b → a too. ``(None, ...)`` when nothing is active."""
    import json

    try:
        text = pointer.read_text().strip()
    except FileNotFoundError:
        return None, ""
    try:
        slot = json.loads(text).get("slot") if text.startswith("{") else text
    except (ValueError, AttributeError):
        return None, text
    return (slot if slot in ("a", "b") else None), text


class ActiveModel:
    """Loads ``slots/<active>/bundle.ekb`` of an agent's state directory and follows switches.

    ``check_every_s``: how often :meth:`get` reads the pointer (a few dozen bytes).
    Other keyword arguments go to :func:`edgekit_runtime.load` (keyring, threads, engine, ...).
    """

    def __init__(self, state_dir: str | os.PathLike, *, check_every_s: float = 1.0, **load_kwargs: Any):
        self.root = Path(state_dir)
        self.pointer = self.root / "active"
        self.check_every_s = check_every_s
        self.load_kwargs = load_kwargs
        self.model: Any | None = None
        self.slot: str | None = None
        self.last_error: RuntimeErrorBase | None = None
        self._loaded_pointer: str | None = None  # the pointer's text when the model in use was loaded
        self._next_check = 0.0

    def get(self) -> Any:
        """The current model; raises ``ENGINE_UNAVAILABLE`` while none could be loaded yet."""
        now = time.monotonic()
        if self.model is None or now >= self._next_check:
            self._next_check = now + self.check_every_s
            self.refresh()
        if self.model is None:
            raise RuntimeErrorBase(f"no model is active in {self.root}" +
                                   (f" ({self.last_error.message})" if self.last_error else ""),
                                   code=ErrorCode.ENGINE_UNAVAILABLE,
                                   hint="install one with `edgekit flash` or `edgekit-agent install`")
        return self.model

    def refresh(self) -> bool:
        """Reload if the pointer changed since the model in use was loaded; True when a new model was loaded.

        Keyed on the pointer's content, not the slot name: installs a → b → a between two
        checks still reload. A slot that fails to load is tried again at the next check.
        """
        from .api import load

        slot, text = read_pointer(self.pointer)
        if slot is None or (text == self._loaded_pointer and self.model is not None):
            return False
        try:
            # the slot's extracted folder belongs to the agent: load into a private temporary one
            model = load(self.root / "slots" / slot / "bundle.ekb", **self.load_kwargs)
        except RuntimeErrorBase as exc:
            self.last_error = exc
            log.error("slot %s does not load (%s); the previous model keeps serving", slot, exc)
            return False
        old, self.model, self.slot, self.last_error = self.model, model, slot, None
        self._loaded_pointer = text
        if old is not None:
            old.close()
        log.info("serving slot %s: %s %s", slot, model.manifest.model.name, model.manifest.model.version)
        return True

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
            self.model = None
