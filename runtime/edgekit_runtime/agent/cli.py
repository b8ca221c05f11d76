"""``edgekit-agent``: the device agent's command line (argparse, no extra deps).

    edgekit-agent run --config /etc/edgekit/agent.toml [--log-level info]
    edgekit-agent status --config /etc/edgekit/agent.toml [--json]
    edgekit-agent install BUNDLE --config /etc/edgekit/agent.toml [--sha256 HEX] [--allow-downgrade] [--shadow] [--json]
    edgekit-agent rollback --config /etc/edgekit/agent.toml [--reason TEXT] [--json]

``install`` and ``rollback`` hand the request to the running agent (through
``state_dir/inbox``) so it switches models without a restart; with no agent
running they do the transaction themselves.

Exit codes: 0 ok, 2 usage, 3 a runtime error (its stable code is printed).
``run`` stops cleanly on SIGTERM/SIGINT (flushes the spool, publishes "offline").
With ``--json`` stdout holds exactly one JSON document: the answer, or
``{"ok": false, "error": {"code", "name", "message", "hint", ...}}`` with the stable
runtime error code (a wrong command line is ``CONFIG_INVALID``); ``run --json`` prints
what it starts (device, fleet, broker, state directory, pid) and then only logs, on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .. import __version__
from ..contract.errors import ErrorCode, ExitStatus, RuntimeErrorBase
from .config import AgentConfig
from .spool import read_stats
from .state import StateDir


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Agent

    config = AgentConfig.load(args.config)
    agent = Agent(config)

    def on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        logging.getLogger("edgekit_runtime.agent").info("signal %d: stopping", signum)
        agent.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.json:
        print(json.dumps({"running": True, "device_id": config.device_id, "fleet": config.fleet,
                          "broker": config.broker_url, "state_dir": str(config.state_dir), "pid": os.getpid()},
                         indent=2), flush=True)
        args.json = False  # that was the one document: a later error goes to stderr only
    agent.run()
    return ExitStatus.OK


def status_of(config: AgentConfig) -> dict[str, Any]:
    """What the state directory says about the agent (running or not)."""
    from ..bundle import read_manifest_unverified
    from ..contract.manifest import Manifest

    sd = StateDir(config.state_dir)
    out: dict[str, Any] = {"device_id": config.device_id, "fleet": config.fleet, "state_dir": str(sd.root),
                           "running": sd.is_locked(), "boot": sd.read_boot(), "active_slot": None, "model": None}
    if sd.root.is_dir():
        pointer = sd.read_pointer()
        out["active_slot"] = pointer["slot"] if pointer else None
        out["previous_slot"] = pointer.get("previous") if pointer else None
        out["slots"] = {slot: {k: v for k, v in sd.read_slot(slot).items() if k in ("state", "sha256", "model",
                                                                                     "installed_at", "failed_step")}
                        for slot in ("a", "b")}
        out["install_pending"] = sd.read_marker()
        bundle = sd.active_bundle()
        if bundle is not None:
            # it was verified when installed, and again at every load
            m = Manifest.from_dict(read_manifest_unverified(bundle))
            out["model"] = {**m.model.to_dict(), "target": m.target.name, "backend": m.backend.name,
                            "bundle": str(bundle)}
        out["spool"] = read_stats(sd.spool_path)
        last = sd.read_status()
        if last is not None:
            out["agent"] = last
            if not out["running"]:
                out["agent"]["note"] = "last report of an agent that is not running now"
    return out


def cmd_status(args: argparse.Namespace) -> int:
    config = AgentConfig.load(args.config)
    st = status_of(config)
    if args.json:
        print(json.dumps(st, indent=2))
        return ExitStatus.OK
    agent = st.get("agent") or {}
    model = st["model"]
    print(f"device     {st['fleet']}/{st['device_id']}")
    print(f"running    {'yes, state ' + agent.get('state', '?') if st['running'] else 'no'}"
          + (f" (pid {agent.get('pid')})" if st["running"] else ""))
    print(f"boot       {st['boot']}")
    shown = f"{model['name']} {model['version']} (slot {st['active_slot']})" if model else "none"
    print(f"model      {shown}")
    spool = st.get("spool")
    if spool:
        print(f"spool      {spool['pending']} messages, {spool['bytes']} bytes; dropped "
              f"{spool['dropped_oldest_total']}, rejected {spool['rejected_new_total']}")
    return ExitStatus.OK


def _emit(args: argparse.Namespace, reply: dict[str, Any], text: str) -> int:
    """Print a result (JSON with --json); exit OK when it went well, RUNTIME_ERROR when the device refused."""
    if args.json:
        print(json.dumps(reply, indent=2, default=str))
    elif reply["ok"]:
        print(text)
    else:
        err = reply["error"]
        code = f"E{err['code']} " if err.get("code") else ""
        print(f"error: {reply.get('command') or 'install'} refused at {err.get('step') or 'start'}: [{code}{err.get('reason')}] "
              f"{err.get('message')}" + (f" — {err['hint']}" if err.get("hint") else "")
              + f"; slot {err.get('active_slot')} still serves", file=sys.stderr)
    return ExitStatus.OK if reply["ok"] else ExitStatus.RUNTIME_ERROR


def _change(config: AgentConfig, command: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run an install/rollback: handed to the running agent, or done here when none runs."""
    from .daemon import make_installer
    from .install import InstallError, InstallRequest

    sd = StateDir(config.state_dir).ensure()
    request_id = f"local-{uuid.uuid4().hex[:12]}"
    if sd.is_locked():
        return _via_agent(sd, {"request_id": request_id, "command": command, "args": args}, timeout)
    sd.lock()  # raises if an agent started meanwhile
    try:
        installer = make_installer(sd, config)
        if isinstance(installer, str):
            raise RuntimeErrorBase(installer, code=ErrorCode.CONFIG_NO_KEYRING)
        installer.recover()
        try:
            if command == "install":
                result, model = installer.install(InstallRequest(args["path"], args.get("sha256"), None,
                                                                 bool(args.get("allow_downgrade")), request_id,
                                                                 shadow=bool(args.get("shadow"))))
            else:
                result, model = installer.rollback(args.get("reason"), request_id)
        except InstallError as exc:
            return {"ok": False, "command": command, "request_id": request_id, "agent_running": False,
                    "error": exc.to_error(sd.active_slot())}
        if model is not None:
            model.close()
        return {"ok": True, "command": command, "request_id": request_id, "agent_running": False, **result}
    finally:
        sd.unlock()


def _via_agent(sd: StateDir, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Drop the request in the running agent's inbox and wait for its answer in the outbox."""
    from .state import atomic_write

    reply_path = sd.outbox / f"{request['request_id']}.json"
    inbox_file = sd.inbox / f"{request['request_id']}.json"
    atomic_write(inbox_file, json.dumps(request).encode(), durable=False)
    inbox_file.chmod(0o644)  # the agent runs as another user (edgekit); an admin's umask may be 077
    deadline = time.monotonic() + timeout
    while not reply_path.exists():
        if time.monotonic() > deadline:
            raise RuntimeErrorBase(f"the running agent did not answer within {timeout:.0f} s",
                                   code=ErrorCode.CONFIG_INVALID, hint="see `edgekit-agent status` and its log")
        if not sd.is_locked():
            raise RuntimeErrorBase("the agent stopped before it answered", code=ErrorCode.CONFIG_INVALID,
                                   hint="run the command again (an install cut short is undone at the next start)")
        time.sleep(0.1)
    reply = json.loads(reply_path.read_text())
    reply_path.unlink(missing_ok=True)
    out = {"ok": reply["ok"], "command": reply["command"], "request_id": reply["request_id"], "agent_running": True}
    return {**out, **reply["result"]} if reply["ok"] else {**out, "error": reply["error"]}


def _health_words(reply: dict) -> str:
    """What the install's health check did: a bundle without one is said so, never "passed"."""
    health = reply.get("health") or {}
    return "the bundle has no health check (nothing was run)" if health.get("checked") is False else "health check passed"


def cmd_install(args: argparse.Namespace) -> int:
    config = AgentConfig.load(args.config)
    if not args.bundle.is_file():
        raise RuntimeErrorBase(f"{args.bundle} does not exist", code=ErrorCode.BUNDLE_UNREADABLE)
    reply = _change(config, "install", {"path": str(args.bundle.resolve()), "sha256": args.sha256,
                                        "allow_downgrade": args.allow_downgrade, "shadow": args.shadow},
                    args.timeout)
    if reply["ok"] and reply.get("shadow"):
        m = reply["model"]
        text = (f"installed {m['name']} {m['version']} (release {m['release']}) as a shadow candidate in slot "
                f"{reply['shadow_slot']}; {_health_words(reply)}; slot {reply['slot']} still serves "
                "(`edgekit-runtime serve` on the state directory runs the candidate beside it)")
    elif reply["ok"]:
        m = reply["model"]
        text = (f"{m['name']} {m['version']} (release {m['release']}) is already active in slot {reply['slot']}"
                if reply.get("already_active") else
                f"installed {m['name']} {m['version']} (release {m['release']}) in slot {reply['slot']}; "
                f"{_health_words(reply)}; it serves now" + ("" if reply["agent_running"] else
                                                          " (the agent loads it when it starts)"))
    else:
        text = ""
    return _emit(args, reply, text)


def cmd_rollback(args: argparse.Namespace) -> int:
    config = AgentConfig.load(args.config)
    reply = _change(config, "rollback", {"reason": args.reason}, args.timeout)
    text = (f"rolled back to slot {reply['slot']}: {reply['model']['name']} {reply['model']['version']}"
            if reply["ok"] else "")
    return _emit(args, reply, text)


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are a JSON document too when ``--json`` is on the command line."""

    json_errors = False  # set by main() for the command line it parses

    def error(self, message: str):  # type: ignore[override]
        if _Parser.json_errors:
            print(json.dumps({"ok": False, "error": {"reason": "usage", "step": None,
                                                     "code": int(ErrorCode.CONFIG_INVALID),
                                                     "name": ErrorCode.CONFIG_INVALID.name,
                                                     "message": f"{self.prog}: {message}", "hint": "see --help"}}))
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgekit-agent", description="edgekit device agent: serve a bundle, report "
                                "telemetry over MQTT, answer fleet commands.")
    p.add_argument("--version", action="version", version=f"edgekit-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent (foreground; systemd runs it)")
    run.add_argument("--config", required=True, type=Path, help="agent config file (.toml or .json)")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--json", action="store_true", help="print what was started as JSON (logs stay on stderr)")
    run.set_defaults(func=cmd_run)
    st = sub.add_parser("status", help="what the state directory says: running, boot, model, spool")
    st.add_argument("--config", required=True, type=Path)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    ins = sub.add_parser("install", help="install a bundle into the idle slot; health-check; switch to it")
    ins.add_argument("bundle", type=Path)
    ins.add_argument("--config", required=True, type=Path)
    ins.add_argument("--sha256", help="refuse the file unless it has this sha256 (pinned by the sender)")
    ins.add_argument("--allow-downgrade", action="store_true", help="install an older release than the active one")
    ins.add_argument("--shadow", action="store_true",
                     help="install into the idle slot and health-check it, without switching: a shadow candidate "
                          "that `edgekit-runtime serve` on the state directory runs beside the active model")
    ins.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for a running agent's answer")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_install)
    rb = sub.add_parser("rollback", help="switch back to the previous slot (after its health check)")
    rb.add_argument("--config", required=True, type=Path)
    rb.add_argument("--reason", default=None, help="recorded with the rollback")
    rb.add_argument("--timeout", type=float, default=300.0)
    rb.add_argument("--json", action="store_true")
    rb.set_defaults(func=cmd_rollback)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _Parser.json_errors = "--json" in argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, getattr(args, "log_level", "warning").upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except RuntimeErrorBase as exc:
        if getattr(args, "json", False):  # callers parsing stdout (edgekit flash --host) get JSON either way
            print(json.dumps({"ok": False, "error": {"reason": "error", "step": None, **exc.to_event()}}))
        print(f"error: {exc}", file=sys.stderr)
        return ExitStatus.RUNTIME_ERROR


if __name__ == "__main__":
    sys.exit(main())
