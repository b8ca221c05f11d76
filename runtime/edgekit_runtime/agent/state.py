"""The agent's states, and its state directory on disk.

Layout of ``state_dir``::

    state_dir/
      boot            persisted boot counter ("7\\n"), replaced atomically (fsync + rename)
      active          the slot pointer: {"slot": "b", "previous": "a", ...}, replaced atomically;
                      absent: nothing installed (agents before A/B installs wrote plain "a")
      install.json    the install transaction marker: present only while an install runs (or was
                      cut short: the next start finishes or undoes it, see install.py)
      shadow          {"slot": "b", "sha256", "model", ...}: the idle slot holds a shadow candidate
                      (`install --shadow`: verified and health-checked, never switched to); a workload
                      (`edgekit-runtime serve STATE_DIR`) runs it beside the active model
      slots/a/        bundle.ekb, slot.json {"state": "good"|"installing"|"bad"|"aborted", ...},
      slots/b/        model/ (the extracted bundle and engine caches)
      downloads/      <sha256>.part (resumed with HTTP Range) and <sha256>.ekb
      inbox/ outbox/  install/rollback requests from `edgekit-agent install` to the running agent
      installs.jsonl  one line per finished install/rollback (outcome by request id)
      commands.jsonl  signed commands seen, kept until they expire (no replay, no double execution)
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

from ..contract.errors import ErrorCode, RuntimeConfigError
from ..fileio import atomic_write, fsync_dir  # noqa: F401 - atomic_write: the agent's modules import it from here

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


class StateDir:
    """The agent's directory: boot counter, model slots, spool, status, lock."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.boot_file = self.root / "boot"
        self.active_file = self.root / "active"
        self.spool_path = self.root / "spool.db"
        self.status_file = self.root / "agent.json"
        self.lock_file = self.root / "agent.lock"
        self.marker_file = self.root / "install.json"
        self.shadow_file = self.root / "shadow"  # the idle slot holds a shadow candidate (install --shadow)
        self.downloads = self.root / "downloads"
        self.inbox = self.root / "inbox"
        self.outbox = self.root / "outbox"
        self.install_log = self.root / "installs.jsonl"
        self.command_log = self.root / "commands.jsonl"
        self._lock_fd: int | None = None

    def ensure(self) -> "StateDir":
        try:
            for slot in SLOTS:
                (self.root / "slots" / slot).mkdir(parents=True, exist_ok=True)
            for d in (self.downloads, self.inbox, self.outbox):
                d.mkdir(exist_ok=True)
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
                                  code=ErrorCode.AGENT_ALREADY_RUNNING,
                                  hint="stop it first (systemctl stop edgekit-agent), or give this agent its own "
                                  "state_dir") from None
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

    def read_pointer(self) -> dict[str, Any] | None:
        """The slot pointer ``{"slot", "previous", ...}``; None when nothing is installed."""
        try:
            text = self.active_file.read_text().strip()
        except FileNotFoundError:
            return None
        if text.startswith("{"):
            try:
                pointer = json.loads(text)
            except ValueError:
                pointer = {}
        else:  # written by an agent before A/B installs
            pointer = {"slot": text, "previous": None}
        if not isinstance(pointer, dict) or pointer.get("slot") not in SLOTS \
                or pointer.get("previous") not in (*SLOTS, None):
            raise AgentStateError(f"{self.active_file} does not name a slot ({text[:80]!r})",
                                  hint="reinstall the bundle with `edgekit-agent install`")
        return pointer

    def write_pointer(self, slot: str, previous: str | None, **extra: Any) -> None:
        """Make ``slot`` the active one: one atomic, durable replace of the pointer file."""
        if slot not in SLOTS or previous not in (*SLOTS, None):
            raise AgentStateError(f"cannot point at slot {slot!r} (previous {previous!r})")
        atomic_write(self.active_file, json.dumps({"slot": slot, "previous": previous, "switched_at": time.time(),
                                                   **extra}).encode())

    def active_slot(self) -> str | None:
        pointer = self.read_pointer()
        return pointer["slot"] if pointer else None

    def active_bundle(self) -> Path | None:
        slot = self.active_slot()
        if slot is None:
            return None
        path = self.slot_dir(slot) / "bundle.ekb"
        return path if path.is_file() else None

    def idle_slot(self) -> str:
        active = self.active_slot()
        return "b" if active == "a" else "a"

    # -- per-slot record -----------------------------------------------------------------
    def read_slot(self, slot: str) -> dict[str, Any]:
        """``slot.json`` of a slot; a slot with a bundle but no record (older agents) counts as good."""
        try:
            return json.loads((self.slot_dir(slot) / "slot.json").read_text())
        except FileNotFoundError:
            return {"state": "good" if (self.slot_dir(slot) / "bundle.ekb").is_file() else "empty"}
        except ValueError:
            return {"state": "bad", "note": "slot.json is unreadable"}

    def write_slot(self, slot: str, record: dict[str, Any]) -> None:
        atomic_write(self.slot_dir(slot) / "slot.json", json.dumps({**record, "updated_at": time.time()}).encode())

    # -- shadow candidate -----------------------------------------------------------------
    def read_shadow(self) -> dict[str, Any] | None:
        """``{"slot", "sha256", "model", "txn", ...}`` when the idle slot holds a shadow candidate, else None."""
        try:
            doc = json.loads(self.shadow_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return doc if isinstance(doc, dict) and doc.get("slot") in SLOTS else None

    def write_shadow(self, record: dict[str, Any]) -> None:
        atomic_write(self.shadow_file, json.dumps({**record, "written_at": time.time()}).encode())

    def clear_shadow(self) -> None:
        try:
            self.shadow_file.unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.root)

    # -- install transaction marker ------------------------------------------------------
    def read_marker(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.marker_file.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # cannot happen with atomic writes; treat it as an install to undo
            return {"step": "unknown"}

    def write_marker(self, marker: dict[str, Any]) -> None:
        atomic_write(self.marker_file, json.dumps(marker).encode())

    def clear_marker(self) -> None:
        try:
            self.marker_file.unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.root)

    def log_install(self, entry: dict[str, Any]) -> None:
        """Append one finished install/rollback to ``installs.jsonl`` (durably)."""
        with open(self.install_log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**entry, "ts": time.time()}, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def place_bundle(self, source: str | os.PathLike, slot: str = "a", *, link: bool = False) -> Path:
        """Put a bundle into ``slot`` durably (``slot/bundle.ekb``); the pointer is not touched.

        ``link``: the source is the agent's own file (``downloads/``): hard-link it instead of
        copying (no second copy on a small disk, and the download survives an install that is
        undone, for the retry). Across filesystems it is copied.
        """
        dest = self.slot_dir(slot) / "bundle.ekb"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(".bundle.ekb.tmp")
        tmp.unlink(missing_ok=True)
        linked = False
        if link:
            try:
                os.link(source, tmp)
                linked = True
            except OSError:  # EXDEV (another filesystem), EPERM (no hard links there): copy
                pass
        if not linked:
            shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        return dest

    def clean_leftovers(self, keep_sha256: str | None = None, max_age_s: float = 7 * 86400) -> list[str]:
        """Remove what crashes leave: temporary files of atomic writes, and stale downloads.

        ``downloads/<keep_sha256>.*`` stays (an interrupted install resumes from it).
        """
        removed = []
        now = time.time()
        for folder in (self.root, self.slot_dir("a"), self.slot_dir("b"), self.inbox, self.outbox, self.downloads):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                stale_tmp = path.name.startswith(".") and ".tmp" in path.name
                stale_download = (folder == self.downloads and not (keep_sha256 and path.name.startswith(keep_sha256))
                                  and now - path.stat().st_mtime > max_age_s)
                taken = folder == self.inbox and path.suffix == ".taken"
                if taken and path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(str(path.relative_to(self.root)))
                elif (stale_tmp or stale_download or taken) and (path.is_file() or path.is_symlink()):
                    path.unlink(missing_ok=True)
                    removed.append(str(path.relative_to(self.root)))
        return removed

    # -- status snapshot -----------------------------------------------------------
    def write_status(self, status: dict[str, Any]) -> None:
        atomic_write(self.status_file, json.dumps({**status, "updated_at": time.time()}, indent=2).encode(),
                     durable=False)

    def read_status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None


class CommandLog:
    """Signed commands this device has seen, kept (on disk) until they expire.

    A command whose request id is here is never executed twice: a finished one is
    answered again from its recorded ack (a QoS 1 redelivery, a resumed rollout, or
    a replay by someone who captured it), a started one (the agent died during it)
    runs again. Entries are dropped once their ``expires_ts`` has passed, which is
    why signed commands must carry one.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        now = time.time()
        dropped = 0
        for line in lines:
            try:
                entry = json.loads(line)
                rid = entry["request_id"]
            except (ValueError, KeyError, TypeError):  # a line cut by a crash
                dropped += 1
                continue
            merged = {**self.entries.get(rid, {}), **entry}
            self.entries[rid] = merged
        for rid in [r for r, e in self.entries.items() if (e.get("expires_ts") or 0) < now]:
            del self.entries[rid]
            dropped += 1
        if dropped:
            atomic_write(self.path, "".join(json.dumps(e) + "\n" for e in self.entries.values()).encode())

    def get(self, request_id: str) -> dict[str, Any] | None:
        return self.entries.get(request_id)

    def _append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(line)
                while view:  # unbuffered: what failed to reach the file is known exactly
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                try:  # a disk that filled up mid-line: drop the half line, or the next entry is glued to it
                    os.ftruncate(fd, end)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)
        self.entries[entry["request_id"]] = {**self.entries.get(entry["request_id"], {}), **entry}

    def started(self, request_id: str, command: str, expires_ts: float) -> None:
        self._append({"request_id": request_id, "command": command, "expires_ts": expires_ts,
                      "started_at": time.time()})

    def finished(self, request_id: str, ack: dict[str, Any]) -> None:
        self._append({"request_id": request_id, "ack": ack, "finished_at": time.time()})
