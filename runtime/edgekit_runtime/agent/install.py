"""Installs as transactions over two model slots (A/B), as Mender and RAUC do them.

An install walks these steps; each one is written to the marker file
``state_dir/install.json`` (atomically, fsync'd) before it starts::

    download      fetch the bundle (HTTP Range resume; sha256 pinned) or take a local file
    verify        signature, every member's sha256, format version, anti-rollback (release)
    unpack        copy the bundle into the idle slot (marked "installing" first)
    prepare       verify the slot's copy again and load it into its engine (OpenVINO compile,
                  TensorRT engine build, ... — caches live in the slot)
    health_check  run the bundle's sample input: finite, equal to the expected output within
                  the manifest's tolerance, and latency under the profile's budget
    switch        mark the slot "good", then replace the slot pointer (write-new + fsync + rename)

The active slot is never written during an install, so a failure at any step
(or a ``kill -9``) leaves the old model serving. :meth:`Installer.recover`, run
at every start before the model is loaded, reads a leftover marker: if the
pointer already names the new slot the install is finished (the marker is
cleared), otherwise it is undone (the half-written slot is emptied and marked
"aborted"). ``rollback`` points back at the previous slot if it is still "good"
and passes its health check.

Faults for tests: ``EDGEKIT_AGENT_FAULT="pause:<step>"`` stops the process at a
step (after writing the step name to ``$EDGEKIT_AGENT_FAULT_FILE``) until it is
killed; ``"fail:<step>"`` makes that step fail as if the device had failed it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..contract.errors import ErrorCode, RuntimeErrorBase
from .state import SLOTS, StateDir

log = logging.getLogger("edgekit_runtime.agent.install")

STEPS = ("download", "verify", "unpack", "prepare", "health_check", "switch")
FAULT_ENV = "EDGEKIT_AGENT_FAULT"
FAULT_FILE_ENV = "EDGEKIT_AGENT_FAULT_FILE"
HEALTH_WARMUP = 2


class InstallError(RuntimeErrorBase):
    """An install or rollback that did not happen; the active slot is unchanged.

    ``reason`` is a short word for dashboards (``download_failed``, ``health_check_failed``, ...),
    ``step`` the step that failed.
    """

    def __init__(self, reason: str, message: str, *, step: str | None = None, code: ErrorCode | None = None,
                 hint: str | None = None):
        super().__init__(message, code=code or ErrorCode.CONFIG_INVALID, hint=hint)
        self.reason = reason
        self.step = step

    def to_error(self, active_slot: str | None) -> dict[str, Any]:
        return {"reason": self.reason, "step": self.step, **self.to_event(), "active_slot": active_slot}


def _reason_for(code: ErrorCode) -> str:
    return {ErrorCode.BUNDLE_DOWNLOAD_FAILED: "download_failed",
            ErrorCode.BUNDLE_CHECKSUM_MISMATCH: "checksum_mismatch",
            ErrorCode.BUNDLE_DOWNGRADE: "downgrade",
            ErrorCode.ENGINE_HEALTH_CHECK_FAILED: "health_check_failed"}.get(code, "verify_failed"
                                                                              if int(code) < 200 else "prepare_failed")


@dataclass
class InstallRequest:
    """What to install: ``source`` is an http(s)/file URL or a local path; ``sha256`` pins its content."""

    source: str
    sha256: str | None = None
    size: int | None = None
    allow_downgrade: bool = False
    request_id: str | None = None
    rollout: str | None = None
    shadow: bool = False  # install into the idle slot, health-check, and do not switch (a shadow candidate)

    @classmethod
    def from_args(cls, args: dict[str, Any], request_id: str | None) -> "InstallRequest":
        """The ``install`` command's args (see docs/flash.md); raises ValueError with the problem."""
        unknown = set(args) - {"url", "sha256", "size", "allow_downgrade", "rollout", "shadow"}
        if unknown:
            raise ValueError(f"install does not take {sorted(unknown)}")
        url, sha, size = args.get("url"), args.get("sha256"), args.get("size")
        if not isinstance(url, str) or not url:
            raise ValueError("install needs args.url (http(s):// or file:// of the bundle)")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError("install needs args.sha256: the bundle's sha256 (64 lowercase hex digits)")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ValueError("args.size must be a positive integer (bytes)")
        allow = args.get("allow_downgrade", False)
        if not isinstance(allow, bool):
            raise ValueError("args.allow_downgrade must be true or false")
        rollout = args.get("rollout")
        if rollout is not None and not isinstance(rollout, str):
            raise ValueError("args.rollout must be a string")
        shadow = args.get("shadow", False)
        if not isinstance(shadow, bool):
            raise ValueError("args.shadow must be true or false")
        return cls(url, sha, size, allow, request_id, rollout, shadow)


class Installer:
    """Installs into the idle slot, switches, rolls back, and recovers after a crash.

    One install at a time (``busy`` otherwise). The caller holds the state
    directory's lock. ``on_progress(step, info)`` is called as steps start.
    ``load_model(bundle_path, workdir)`` loads a verified bundle (the daemon
    passes :func:`edgekit_runtime.load` with its keyring and threads).
    """

    def __init__(self, state_dir: StateDir, keyring: Any, *, threads: int | None = None,
                 latency_budget_ms: float | None = None, latency_runs: int = 20,
                 download_timeout_s: float = 30.0, download_retries: int = 5, ca_file: Path | None = None,
                 download_max_s: float = 3600.0, on_progress: Callable[[str, dict[str, Any]], None] | None = None,
                 should_stop: Callable[[], bool] | None = None):
        self.sd = state_dir
        self.keyring = keyring
        self.threads = threads
        self.latency_budget_ms = latency_budget_ms
        self.latency_runs = latency_runs
        self.download_timeout_s = download_timeout_s
        self.download_retries = download_retries
        self.download_max_s = download_max_s
        self.ca_file = ca_file
        self.on_progress = on_progress
        self.should_stop = should_stop
        self._busy = threading.Lock()
        self.current: dict[str, Any] | None = None  # the install in progress (request id, step)
        fault = os.environ.get(FAULT_ENV, "")
        self.fault = tuple(fault.split(":", 1)) if ":" in fault else None

    # -- faults for tests ----------------------------------------------------------------
    def _fault(self, step: str) -> None:
        if self.fault is None or self.fault[1] != step:
            return
        action = self.fault[0]
        if action == "pause":
            log.warning("fault injection: pausing at %s until killed", step)
            path = os.environ.get(FAULT_FILE_ENV)
            if path:  # atomically: a test polling the file never reads it empty
                tmp = Path(f"{path}.tmp")
                tmp.write_text(step)
                os.replace(tmp, path)
            while True:
                time.sleep(3600)
        if action == "fail":
            raise InstallError(f"{step}_failed" if step != "health_check" else "health_check_failed",
                               f"fault injected at {step} ({FAULT_ENV})", step=step,
                               code=ErrorCode.ENGINE_HEALTH_CHECK_FAILED if step == "health_check"
                               else ErrorCode.ENGINE_LOAD_FAILED)

    def _step(self, marker: dict[str, Any], step: str, **info: Any) -> None:
        marker["step"] = step
        marker.setdefault("steps", {})[step] = time.time()
        self.sd.write_marker(marker)
        if self.current is not None:
            self.current["step"] = step
        if self.on_progress is not None:
            try:
                self.on_progress(step, {"slot": marker.get("slot"), **info})
            except Exception:  # reporting must never break an install
                log.exception("progress report failed")
        self._fault(step)

    # -- install ---------------------------------------------------------------------------
    def install(self, req: InstallRequest) -> tuple[dict[str, Any], Any]:
        """Run the transaction; ``(result, loaded_model)`` on success, :class:`InstallError` otherwise.

        The returned model is loaded from the new slot and health-checked; the
        caller serves it and closes the old one. ``already_active`` results
        return ``model=None`` (nothing changed).
        """
        if not self._busy.acquire(blocking=False):
            busy_with = (self.current or {}).get("request_id")
            raise InstallError("busy", f"an install is already running (request {busy_with})", step=None,
                               code=ErrorCode.CONFIG_INVALID, hint="wait for it to finish")
        self.current = {"request_id": req.request_id, "step": None, "started": time.time()}
        try:
            return self._install(req)
        finally:
            self.current = None
            self._busy.release()

    def _install(self, req: InstallRequest) -> tuple[dict[str, Any], Any]:
        from ..bundle import open_bundle, read_manifest_unverified
        from .fetch import fetch_bundle

        sd = self.sd
        pointer = sd.read_pointer()
        active = pointer["slot"] if pointer else None
        target = sd.idle_slot()
        marker = {"txn": uuid.uuid4().hex, "request_id": req.request_id, "rollout": req.rollout,
                  "slot": target, "from_slot": active, "source": req.source, "sha256": req.sha256,
                  "started_at": time.time()}
        timings: dict[str, float] = {}
        t = time.perf_counter()
        deadline = time.monotonic() + self.download_max_s

        def done(step: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timings[step] = round(now - t, 4)
            t = now

        def stopping() -> bool:
            return bool(self.should_stop is not None and self.should_stop())

        model = None
        path: Path | None = None
        if req.shadow and active is None:
            raise InstallError("no_active", "nothing is active to shadow: a shadow candidate runs beside the "
                               "active model", step=None, code=ErrorCode.CONFIG_INVALID,
                               hint="install a model first (without --shadow)")
        if req.shadow and req.sha256 is not None:
            # a shadow install never moves the pointer, so it never takes the damaged-active repair path below
            if sd.read_slot(active).get("sha256") == req.sha256:
                raise InstallError("already_active", "this bundle is the active model: there is nothing to "
                                   "shadow it against", step="verify", code=ErrorCode.CONFIG_INVALID,
                                   hint="send the candidate's bundle with --shadow")
            done_before = self._already_shadow(req.sha256, active, pointer)
            if done_before is not None:
                return done_before, None
        if active is not None and req.sha256 is not None and not req.shadow:
            rec = sd.read_slot(active)
            if rec.get("sha256") == req.sha256 and rec.get("model"):
                if self._intact(active, req.sha256):
                    # already serving it (a re-sent command, or one redelivered after the switch): nothing to fetch
                    return {"slot": active, "previous_slot": pointer.get("previous"), "model": rec["model"],
                            "sha256": req.sha256, "already_active": True, "health": rec.get("health"),
                            "timings_s": {}}, None
                if pointer.get("previous") is not None:
                    # The active slot's copy is damaged. Installing into the idle slot would overwrite the
                    # only fallback, and the active slot is never written: first switch to the previous
                    # model (health-checked), then install into the damaged slot, now the idle one.
                    try:
                        fell_back, old_model = self._switch_back(pointer, "the active bundle is damaged", None)
                    except InstallError as exc:
                        log.warning("cannot fall back before repairing slot %s: %s", active, exc)
                    else:
                        old_model.close()
                        log.warning("slot %s is damaged: serving slot %s while it is installed again", active,
                                    fell_back["slot"])
                        pointer = sd.read_pointer()
                        active = pointer["slot"]
                        target = sd.idle_slot()
                        marker.update(slot=target, from_slot=active)
        previous_after = active
        try:
            # download: into the agent's own downloads/ (a local file is copied there first, so what is
            # checked below is what gets installed: nobody else can change it in between)
            self._step(marker, "download", source=req.source)
            try:
                if "://" in req.source:
                    path = fetch_bundle(req.source, sd.downloads, req.sha256, req.size,
                                        timeout=self.download_timeout_s, retries=self.download_retries,
                                        ca_file=self.ca_file,
                                        should_stop=lambda: stopping() or time.monotonic() > deadline)
                else:
                    path = self._copy_local(Path(req.source), req.sha256)
            except InstallError:
                raise
            except RuntimeErrorBase as exc:
                if not stopping() and time.monotonic() > deadline:
                    raise InstallError("download_failed", f"the download of {req.source} did not finish within "
                                       f"{self.download_max_s:.0f} s", step="download",
                                       code=ErrorCode.BUNDLE_DOWNLOAD_FAILED,
                                       hint="check the device's link, or raise download_max_s") from None
                raise InstallError(_reason_for(exc.code), exc.message, step="download", code=exc.code,
                                   hint=exc.hint) from None
            sha = path.name[: -len(".ekb")]  # downloads/<sha256>.ekb, checked against the pin
            done("download")

            # verify: signature, members, format, anti-rollback; still nothing written to a slot
            self._step(marker, "verify")
            try:
                verified = open_bundle(path, self.keyring)
            except RuntimeErrorBase as exc:
                raise InstallError("verify_failed", exc.message, step="verify", code=exc.code,
                                   hint=exc.hint) from None
            new = verified.manifest.model
            if active is not None:
                rec = sd.read_slot(active)
                # (a pinned sha256 was already compared with the active slot before the download)
                if req.shadow and req.sha256 is None:
                    done_before = self._already_shadow(sha, active, pointer)
                    if done_before is not None:
                        sd.clear_marker()
                        self._discard_download(sha)
                        return done_before, None
                if req.shadow and rec.get("sha256") == sha:
                    raise InstallError("already_active", "this bundle is the active model: there is nothing to "
                                       "shadow it against", step="verify", code=ErrorCode.CONFIG_INVALID,
                                       hint="send the candidate's bundle with --shadow")
                if req.sha256 is None and rec.get("sha256") == sha and self._intact(active, sha):
                    sd.clear_marker()
                    self._discard_download(sha)
                    result = {"slot": active, "previous_slot": pointer.get("previous"), "model": _model(verified),
                              "sha256": sha, "already_active": True, "health": rec.get("health"),
                              "timings_s": timings}
                    return result, None
                old = rec.get("model") or _model_of_file(sd.active_bundle(), read_manifest_unverified)
                if old and new.release < (old.get("release") or 0) and not req.allow_downgrade:
                    raise InstallError(
                        "downgrade", f"release {new.release} of {new.name} is older than the installed "
                        f"release {old.get('release')} ({old.get('name')} {old.get('version')})", step="verify",
                        code=ErrorCode.BUNDLE_DOWNGRADE, hint="send it with allow_downgrade (--allow-downgrade) "
                        "to install it anyway")
            done("verify")

            # unpack: the idle slot is marked "installing" (with this transaction) before it is emptied; a shadow
            # candidate it held is gone from here on
            self._step(marker, "unpack")
            sd.write_slot(target, {"state": "installing", "sha256": sha, "txn": marker["txn"]})
            sd.clear_shadow()  # (after the record: a crash between the two is undone by the marker, shadow and all)
            _empty_slot(sd.slot_dir(target))
            bundle_path = sd.place_bundle(path, target, link=True)  # downloads/ is ours: no third copy
            done("unpack")

            # prepare: the slot's own copy is verified again while it is loaded into its engine
            self._step(marker, "prepare")
            try:
                model = self._load(bundle_path, sd.slot_dir(target) / "model")
            except OSError as exc:
                if exc.errno in (errno.ENAMETOOLONG, errno.EILSEQ):
                    # verified names within the format's limits that this filesystem still cannot hold
                    # (eCryptfs: 143 bytes; a non-UTF-8 filesystem): the bundle's problem, not free space
                    raise InstallError("prepare_failed", f"a member name of the bundle cannot be written on this "
                                       f"device's filesystem ({exc.strerror}: {exc.filename})", step="prepare",
                                       code=ErrorCode.BUNDLE_UNSAFE_MEMBER,
                                       hint="rebuild the bundle with shorter ASCII member names") from None
                raise  # the device's storage (extracting the bundle): reported as storage_error
            except RuntimeErrorBase as exc:
                raise InstallError(_reason_for(exc.code) if int(exc.code) < 200 else "prepare_failed",
                                   exc.message, step="prepare", code=exc.code, hint=exc.hint) from None
            except Exception as exc:  # an engine library's own error
                raise InstallError("prepare_failed", f"{type(exc).__name__}: {exc}", step="prepare",
                                   code=ErrorCode.ENGINE_LOAD_FAILED) from None
            if model.bundle.manifest != verified.manifest:  # the same signed bundle that was checked above
                raise InstallError("verify_failed", "the bundle in the slot is not the one that was verified",
                                   step="prepare", code=ErrorCode.BUNDLE_TAMPERED)
            done("prepare")

            self._step(marker, "health_check")
            health = self.health_check(model)
            if not health["ok"]:
                raise InstallError("health_check_failed", f"the new model fails its health check: "
                                   f"{health['problem']}", step="health_check",
                                   code=ErrorCode.ENGINE_HEALTH_CHECK_FAILED)
            done("health_check")

            # switch: mark good, then one atomic pointer replace; the marker goes last. A shadow install marks
            # the slot "shadow" and names it in the shadow file instead: the pointer is never touched.
            self._step(marker, "switch")
            info = _model(verified)
            sd.write_slot(target, {"state": "shadow" if req.shadow else "good", "sha256": sha, "model": info,
                                   "key_id": verified.key_id, "health": health, "installed_at": time.time(),
                                   "request_id": req.request_id, "rollout": req.rollout, "txn": marker["txn"]})
            if req.shadow:
                sd.write_shadow({"slot": target, "sha256": sha, "model": info, "txn": marker["txn"],
                                 "request_id": req.request_id, "active_slot": active})
                model.close()  # the agent serves the active model; the workload runs the candidate beside it
                model = None
            else:
                try:
                    sd.write_pointer(target, previous_after, txn=marker["txn"], request_id=req.request_id)
                except OSError:
                    if (sd.read_pointer() or {}).get("txn") != marker["txn"]:
                        raise
                    log.exception("after the pointer switch to slot %s", target)  # (the rename happened: switched)
        except InstallError as exc:
            if model is not None:
                model.close()
            self._undo(marker, target)
            exc.step = exc.step or marker.get("step")
            if not stopping():
                # (cut short by the agent stopping: not an outcome; a redelivered command tries again)
                sd.log_install({"request_id": req.request_id, "command": "install", "ok": False,
                                "error": exc.to_error(active)})
                self._discard_download(req.sha256 or (path.name[:-4] if path is not None else None))
            raise
        except OSError as exc:  # the device's own storage: a full disk, an I/O error
            log.exception("storage failed during the install (step %s)", marker.get("step"))
            if model is not None:
                model.close()
            try:
                self._undo(marker, target)
            except OSError:
                log.exception("undoing the install")  # the next start finishes the undo from the marker
            self._discard_download(req.sha256 or (path.name[:-4] if path is not None else None))
            err = InstallError("storage_error", f"the device's storage failed at {marker.get('step')}: "
                               f"{exc.strerror or exc}", step=marker.get("step"), code=ErrorCode.DEVICE_STORAGE,
                               hint="free space in the agent's state directory (df -h) and send the install again")
            try:
                sd.log_install({"request_id": req.request_id, "command": "install", "ok": False,
                                "error": err.to_error(active)})
            except OSError:
                pass
            raise err from None
        except BaseException:
            if model is not None:
                model.close()
            self._undo(marker, target)
            raise

        # The new slot is active (or, for a shadow, installed) from here on: nothing below may turn this into a failure.
        result = {"slot": target, "previous_slot": previous_after, "model": info, "sha256": sha,
                  "already_active": False, "health": health, "timings_s": timings}
        if req.shadow:
            # the idle slot held the previous model: it holds the candidate now, so there is no rollback target
            result.update(shadow=True, slot=active, previous_slot=None, shadow_slot=target,
                          note=f"slot {target} now holds the shadow candidate: there is no previous model to roll "
                               "back to until a model is installed again")
        try:
            self._fault("switched")  # tests: a crash between the pointer switch and the marker removal
            sd.clear_marker()
            done("switch")
            sd.log_install({"request_id": req.request_id, "command": "install", "ok": True, "result": result})
            self._discard_download(sha)
        except Exception:  # e.g. a full disk for the log: the install stands; the next start clears the marker
            log.exception("after switching to slot %s", target)
        return result, model

    def _copy_local(self, source: Path, sha256: str | None) -> Path:
        """Copy a local bundle into ``downloads/<sha256>.ekb`` (hashing it on the way)."""
        import hashlib

        if not source.is_file():
            raise InstallError("download_failed", f"{source} does not exist", step="download",
                               code=ErrorCode.BUNDLE_DOWNLOAD_FAILED)
        tmp = self.sd.downloads / f".local-{os.getpid()}.tmp"
        h = hashlib.sha256()
        try:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise InstallError("download_failed", f"cannot copy {source} ({exc.strerror})", step="download",
                               code=ErrorCode.BUNDLE_DOWNLOAD_FAILED) from None
        got = h.hexdigest()
        if sha256 is not None and got != sha256:
            tmp.unlink(missing_ok=True)
            raise InstallError("checksum_mismatch", f"{source} has sha256 {got}, expected {sha256}",
                               step="download", code=ErrorCode.BUNDLE_CHECKSUM_MISMATCH,
                               hint="copy the bundle again; it changed on the way")
        dest = self.sd.downloads / f"{got}.ekb"
        os.replace(tmp, dest)
        return dest

    def _already_shadow(self, sha: str, active: str | None, pointer: dict[str, Any] | None) -> dict[str, Any] | None:
        """The answer to a shadow install of the candidate already in the idle slot (a re-sent command): no second
        install under the workload that runs it."""
        shadow = self.sd.read_shadow()
        if shadow is None or shadow.get("sha256") != sha or shadow.get("slot") == active:
            return None
        rec = self.sd.read_slot(shadow["slot"])
        if rec.get("state") != "shadow" or not self._intact(shadow["slot"], sha):
            return None
        return {"slot": active, "previous_slot": None, "model": rec.get("model"), "sha256": sha,
                "already_active": False, "already_shadow": True, "shadow": True, "shadow_slot": shadow["slot"],
                "health": rec.get("health"), "timings_s": {}}

    def _intact(self, slot: str, sha: str) -> bool:
        """The slot's bundle is still the file that was installed, and still verifies (not damaged since)."""
        from ..bundle import open_bundle
        from .fetch import sha256_file

        bundle = self.sd.slot_dir(slot) / "bundle.ekb"
        try:
            if not bundle.is_file() or sha256_file(bundle) != sha:
                return False
            open_bundle(bundle, self.keyring)
            return True
        except (OSError, RuntimeErrorBase) as exc:
            log.warning("the bundle in slot %s is damaged (%s): installing it again", slot, exc)
            return False

    def _undo(self, marker: dict[str, Any], target: str) -> None:
        """Leave things as before the install: the active slot serves; the idle one is emptied if touched."""
        sd = self.sd
        if sd.read_marker() is None:
            return
        if sd.read_slot(target).get("txn") == marker["txn"]:  # this install marked (and so began to write) it
            shadow = sd.read_shadow()
            if shadow is not None and shadow.get("slot") == target:
                sd.clear_shadow()  # its slot is emptied now
            _empty_slot(sd.slot_dir(target))
            sd.write_slot(target, {"state": "aborted", "txn": marker["txn"], "failed_step": marker.get("step")})
        sd.clear_marker()

    def _discard_download(self, sha: str | None) -> None:
        """The bundle is in the slot now, or was refused: drop the copy in downloads/."""
        if not sha:
            return
        for p in (self.sd.downloads / f"{sha}.ekb", self.sd.downloads / f"{sha}.part"):
            p.unlink(missing_ok=True)

    def _load(self, bundle: Path, workdir: Path) -> Any:
        from ..api import load

        shutil.rmtree(workdir, ignore_errors=True)
        return load(bundle, keyring=self.keyring, threads=self.threads, workdir=workdir)

    def health_check(self, model: Any, *, latency_gate: bool = True) -> dict[str, Any]:
        """The bundle's self-test plus latency: ``{"ok", "problem", ..., "latency": {...}}``.

        ``latency_gate``: a p90 over the budget fails the check (installs and rollbacks:
        deciding whether to switch). At start-up it only warns (``latency.over_budget``):
        a verified model whose outputs are right is not dropped because the device is busy.
        A measurement over the budget is repeated once before it counts, so one burst of
        load from another process does not fail an install.
        """
        try:
            hc = model.health_check()
        except Exception as exc:  # running the sample failed outright
            return {"ok": False, "problem": f"the sample input did not run: {exc}"}
        out: dict[str, Any] = dict(hc)
        if not hc["ok"]:
            out["problem"] = ("the output is not finite" if not hc.get("finite", True) else
                              f"the output differs from the expected one by {hc.get('max_abs_diff'):.4g} "
                              f"(atol {hc.get('atol')}, rtol {hc.get('rtol')})")
            return out
        budget = self.latency_budget_ms
        if budget is None:
            budget = model.manifest.target.latency_budget_ms
        if model.manifest.health_check is None or self.latency_runs <= 0:
            return out
        lat = self._time_sample(model, budget)
        if budget is not None and lat["p90_ms"] > budget:
            time.sleep(0.2)
            lat = {**self._time_sample(model, budget), "first_p90_ms": lat["p90_ms"]}
        lat["over_budget"] = budget is not None and lat["p90_ms"] > budget
        out["latency"] = lat
        if lat["over_budget"]:
            problem = (f"p90 latency {lat['p90_ms']:.2f} ms over {self.latency_runs} runs exceeds the budget of "
                       f"{budget} ms (twice)")
            if latency_gate:
                out["ok"] = False
                out["problem"] = problem
            else:
                out["warning"] = problem
        return out

    def _time_sample(self, model: Any, budget: float | None) -> dict[str, Any]:
        from ..api import _load_npy

        x = _load_npy(model.bundle.members[model.manifest.health_check.input])
        for _ in range(HEALTH_WARMUP):
            model.run(x)
        times = []
        for _ in range(self.latency_runs):
            t0 = time.perf_counter()
            model.run(x)
            times.append((time.perf_counter() - t0) * 1e3)
        return {"runs": self.latency_runs, "p50_ms": round(float(np.percentile(times, 50)), 4),
                "p90_ms": round(float(np.percentile(times, 90)), 4), "budget_ms": budget}

    # -- rollback ----------------------------------------------------------------------------
    def rollback(self, reason: str | None = None, request_id: str | None = None,
                 from_sha256: str | None = None) -> tuple[dict[str, Any], Any]:
        """Point back at the previous slot (it must be "good" and pass its health check).

        Idempotent: ``from_sha256`` names the bundle to roll back from; when the active
        slot holds something else there is nothing to undo (``changed: false``), so a
        retried or late rollback never rolls a device *forward* again. The same holds
        for a ``request_id`` the pointer already records.
        """
        if not self._busy.acquire(blocking=False):
            raise InstallError("busy", "an install is running; roll back after it finishes", code=ErrorCode.CONFIG_INVALID)
        try:
            sd = self.sd
            pointer = sd.read_pointer()
            if pointer is not None:
                cur_rec = sd.read_slot(pointer["slot"])
                done_before = request_id is not None and pointer.get("rollback_of") == request_id
                cur_sha = cur_rec.get("sha256")
                if from_sha256 is not None and cur_sha is None and sd.active_bundle() is not None:
                    from .fetch import sha256_file

                    cur_sha = sha256_file(sd.active_bundle())  # no record (an older agent): the file decides
                elsewhere = from_sha256 is not None and cur_sha != from_sha256
                if done_before or elsewhere:
                    result = {"slot": pointer["slot"], "previous_slot": pointer.get("previous"),
                              "model": cur_rec.get("model"), "sha256": cur_sha, "changed": False,
                              "reason": reason, "note": "already rolled back" if done_before else
                              f"the active bundle is not {from_sha256[:12]}…: nothing to roll back"}
                    sd.log_install({"request_id": request_id, "command": "rollback", "ok": True, "result": result})
                    return result, None
            if pointer is None or pointer.get("previous") is None:
                raise InstallError("no_previous", "there is no previous model to roll back to", step="rollback",
                                   code=ErrorCode.CONFIG_INVALID)
            result, model = self._switch_back(pointer, reason, request_id)
            self._fault("rollback_switched")  # tests: a crash right after a rollback's pointer switch
            try:  # switched: nothing below may turn this into a failure
                sd.log_install({"request_id": request_id, "command": "rollback", "ok": True, "result": result})
            except Exception:
                log.exception("after rolling back to slot %s", result["slot"])
            return result, model
        finally:
            self._busy.release()

    def _switch_back(self, pointer: dict[str, Any], reason: str | None,
                     request_id: str | None) -> tuple[dict[str, Any], Any]:
        """Load and health-check the previous slot, then point at it (the caller holds the install lock)."""
        sd = self.sd
        prev, cur = pointer["previous"], pointer["slot"]
        rec = sd.read_slot(prev)
        bundle = sd.slot_dir(prev) / "bundle.ekb"
        if rec.get("state") == "shadow":
            m = rec.get("model") or {}
            raise InstallError("no_previous", f"slot {prev} holds the shadow candidate {m.get('name')} "
                               f"{m.get('version')} (installed with --shadow), not the previous model", step="rollback",
                               code=ErrorCode.CONFIG_INVALID,
                               hint="install the previous bundle again to go back to it, or install the candidate "
                                    "without --shadow to switch to it")
        if rec.get("state") != "good" or not bundle.is_file():
            raise InstallError("no_previous", f"slot {prev} holds no good model (state {rec.get('state')}); "
                               "it was overwritten by a later install", step="rollback",
                               code=ErrorCode.CONFIG_INVALID)
        try:
            model = self._load(bundle, sd.slot_dir(prev) / "model")
        except RuntimeErrorBase as exc:
            sd.write_slot(prev, {**rec, "state": "bad", "error": exc.to_event()})
            raise InstallError("verify_failed" if int(exc.code) < 200 else "prepare_failed",
                               f"the previous model in slot {prev} no longer loads: {exc.message}",
                               step="rollback", code=exc.code) from None
        health = self.health_check(model)
        if not health["ok"]:
            model.close()
            raise InstallError("health_check_failed", f"the previous model in slot {prev} fails its health "
                               f"check: {health['problem']}", step="rollback",
                               code=ErrorCode.ENGINE_HEALTH_CHECK_FAILED)
        sd.write_pointer(prev, cur, rollback_of=request_id, reason=reason)
        result = {"slot": prev, "previous_slot": cur, "model": rec.get("model") or _model(model.bundle),
                  "sha256": rec.get("sha256"), "health": health, "reason": reason, "changed": True}
        return result, model

    # -- crash recovery ------------------------------------------------------------------------
    def recover(self) -> dict[str, Any] | None:
        """Finish or undo an install cut short by a crash; what was done, or None if nothing was pending."""
        sd = self.sd
        marker = sd.read_marker()
        # temporary files of writes cut short, and downloads nobody will resume
        cleaned = sd.clean_leftovers(keep_sha256=(marker or {}).get("sha256"))
        if cleaned:
            log.info("removed leftovers: %s", ", ".join(cleaned))
        if marker is None:
            return None
        pointer = sd.read_pointer()
        slot = marker.get("slot")
        step = marker.get("step")
        shadow = sd.read_shadow()
        switched = (pointer is not None and slot in SLOTS and pointer["slot"] == slot
                    and pointer.get("txn") == marker.get("txn"))
        shadowed = (shadow is not None and shadow.get("slot") == slot and shadow.get("txn") == marker.get("txn")
                    and sd.read_slot(slot).get("state") == "shadow")
        if switched or shadowed:
            sd.clear_marker()  # the switch (or the shadow install) happened; only the marker removal was lost
            outcome = "completed"
        else:
            if slot in SLOTS and (pointer is None or pointer["slot"] != slot):
                # only a slot this install had marked was written to (the crash may have come before that)
                if sd.read_slot(slot).get("txn") == marker.get("txn"):
                    if shadow is not None and shadow.get("slot") == slot:
                        sd.clear_shadow()  # the slot it names is emptied below
                    _empty_slot(sd.slot_dir(slot))
                    sd.write_slot(slot, {"state": "aborted", "txn": marker.get("txn"), "failed_step": step,
                                         "note": "the agent stopped during the install"})
            sd.clear_marker()
            outcome = "undone"
        info = {"outcome": outcome, "step": step, "slot": slot, "request_id": marker.get("request_id"),
                "txn": marker.get("txn"), "active_slot": sd.active_slot()}
        log.warning("install %s interrupted at %s: %s", marker.get("request_id"), step, outcome)
        sd.log_install({"request_id": marker.get("request_id"), "command": "install", "ok": outcome == "completed",
                        "recovered": info})
        return info

    def fall_back(self, error: dict[str, Any]) -> tuple[dict[str, Any], Any] | None:
        """At start: the active slot failed to load; switch to a good previous slot if it loads and passes."""
        pointer = self.sd.read_pointer()
        if pointer is None or pointer.get("previous") is None:
            return None
        try:
            return self.rollback(reason=f"the active model failed at start: {error.get('message')}")
        except InstallError as exc:
            log.error("no fallback: %s", exc)
            return None


def _empty_slot(path: Path) -> None:
    """Remove everything in a slot folder but the folder itself (and its record, rewritten after)."""
    path.mkdir(parents=True, exist_ok=True)
    for child in path.iterdir():
        if child.name == "slot.json":
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _model(verified: Any) -> dict[str, Any]:
    m = verified.manifest
    return {"name": m.model.name, "version": m.model.version, "release": m.model.release,
            "target": m.target.name, "backend": m.backend.name, "precision": m.backend.precision,
            "key_id": verified.key_id}


def _model_of_file(path: Path | None, reader: Callable[[Path], dict[str, Any]]) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return reader(path)["model"]
    except Exception:  # an unreadable old bundle does not block installing a good one
        return None
