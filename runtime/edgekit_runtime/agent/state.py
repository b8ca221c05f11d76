"""The agent's states, and its state directory on disk.

Layout of ``state_dir`` (A/B slots are laid out now; installs use slot ``a``
until the transactional A/B install lands)::

    state_dir/
      boot            persisted boot counter ("7\\n"), replaced atomically (fsync + rename)
      active          names the slot that serves ("a" or "b"); absent: nothing installed
      slots/a/bundle.ekb
      slots/b/
      spool.db        on-disk telemetry/event spool (SQLite, WAL), see spool.py
      agent.json      what the running agent last reported about itself (for `edgekit-agent status`)
      agent.lock      held (flock) by the running agent, so two agents never share a directory
"""

from __future__ import annotations

import enum
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import ErrorCode, RuntimeConfigError

SLOTS = ("a", "b")


class AgentState(str, enum.Enum):
    """What the agent is doing; every change goes through :func:`check_transition`."""

    STARTING = "starting"  # reading config, boot counter, spool, loading the model
    CONNECTING = "connecting"  # first connection of this boot not made yet (telemetry is spooled)
    ONLINE = "online"  # connected and serving a model
    DEGRADED = "degraded"  # connected, but no model serves (none installed, or it failed to load)
    OFFLINE_SPOOLING = "offline_spooling"  # lost the broker; telemetry waits in the spool
    STOPPING = "stopping"  # flushing the spool, publishing "offline"
    STOPPED = "stopped"


TRANSITIONS: dict[AgentState, frozenset[AgentState]] = {
    AgentState.STARTING: frozenset({AgentState.CONNECTING, AgentState.STOPPING}),
    AgentState.CONNECTING: frozenset({AgentState.ONLINE, AgentState.DEGRADED, AgentState.STOPPING}),
    AgentState.ONLINE: frozenset({AgentState.DEGRADED, AgentState.OFFLINE_SPOOLING, AgentState.STOPPING}),
    AgentState.DEGRADED: frozenset({AgentState.ONLINE, AgentState.OFFLINE_SPOOLING, AgentState.STOPPING}),
    AgentState.OFFLINE_SPOOLING: frozenset({AgentState.ONLINE, AgentState.DEGRADED, AgentState.STOPPING}),
    AgentState.STOPPING: frozenset({AgentState.STOPPED}),
    AgentState.STOPPED: frozenset(),
}


class AgentStateError(RuntimeConfigError):
    """The state directory cannot be used (locked by another agent, unwritable, ...)."""

    code = ErrorCode.CONFIG_INVALID


def check_transition(old: AgentState, new: AgentState) -> None:
    if new != old and new not in TRANSITIONS[old]:
        raise AgentStateError(f"agent state cannot go from {old.value} to {new.value}")


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateDir:
    """The agent's directory: boot counter, model slots, spool, status, lock."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.boot_file = self.root / "boot"
        self.active_file = self.root / "active"
        self.spool_path = self.root / "spool.db"
        self.status_file = self.root / "agent.json"
        self.lock_file = self.root / "agent.lock"
        self._lock_fd: int | None = None

    def ensure(self) -> "StateDir":
        try:
            for slot in SLOTS:
                (self.root / "slots" / slot).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AgentStateError(f"cannot create the state directory {self.root} ({exc.strerror})",
                                  hint="set state_dir to a writable folder, e.g. /var/lib/edgekit-agent") from None
        return self

    # -- the lock -------------------------------------------------------------
    def lock(self) -> None:
        """Take the directory for this process; refuses if another agent holds it."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AgentStateError(f"another agent is running on {self.root} (it holds {self.lock_file})",
                                  hint="stop it first, or give this agent its own state_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def is_locked(self) -> bool:
        """True when a running agent holds the directory."""
        if self._lock_fd is not None:
            return True
        if not self.lock_file.exists():
            return False
        fd = os.open(self.lock_file, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    # -- boot counter ------------------------------------------------------------
    def read_boot(self) -> int | None:
        """The last boot number, or None if it was never written (or cannot be read)."""
        try:
            return int(self.boot_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def next_boot(self, floor: int = 0) -> int:
        """Increment and persist the boot counter (durably, before any message uses it).

        ``floor``: the highest boot seen elsewhere (the spool), so a lost or
        damaged counter file never makes a boot number go backwards.
        """
        boot = max(self.read_boot() or 0, floor) + 1
        atomic_write(self.boot_file, f"{boot}\n".encode())
        return boot

    # -- slots ----------------------------------------------------------------------
    def slot_dir(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise AgentStateError(f"slot {slot!r} is not one of {SLOTS}")
        return self.root / "slots" / slot

    def active_slot(self) -> str | None:
        try:
            slot = self.active_file.read_text().strip()
        except FileNotFoundError:
            return None
        if slot not in SLOTS:
            raise AgentStateError(f"{self.active_file} names slot {slot!r}, not one of {SLOTS}",
                                  hint="reinstall the bundle with `edgekit-agent install`")
        return slot

    def active_bundle(self) -> Path | None:
        slot = self.active_slot()
        if slot is None:
            return None
        path = self.slot_dir(slot) / "bundle.ekb"
        return path if path.is_file() else None

    def place_bundle(self, source: str | os.PathLike, slot: str = "a") -> Path:
        """Copy an already verified bundle into ``slot`` durably and make it the active one."""
        dest = self.slot_dir(slot) / "bundle.ekb"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(".bundle.ekb.tmp")
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        atomic_write(self.active_file, f"{slot}\n".encode())
        return dest

    # -- status snapshot -----------------------------------------------------------
    def write_status(self, status: dict[str, Any]) -> None:
        atomic_write(self.status_file, json.dumps({**status, "updated_at": time.time()}, indent=2).encode(),
                     durable=False)

    def read_status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None
