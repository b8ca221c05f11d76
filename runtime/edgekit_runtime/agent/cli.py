"""``edgekit-agent``: the device agent's command line (argparse, no extra deps).

    edgekit-agent run --config /etc/edgekit/agent.toml [--log-level info]
    edgekit-agent status --config /etc/edgekit/agent.toml [--json]
    edgekit-agent install BUNDLE --config /etc/edgekit/agent.toml [--allow-downgrade] [--no-health-check]

Exit codes: 0 ok, 2 usage, 3 a runtime error (its stable code is printed).
``run`` stops cleanly on SIGTERM/SIGINT (flushes the spool, publishes "offline").
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ErrorCode, RuntimeErrorBase
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
    agent.run()
    return 0


def status_of(config: AgentConfig) -> dict[str, Any]:
    """What the state directory says about the agent (running or not)."""
    from ..bundle import read_manifest_unverified

    sd = StateDir(config.state_dir)
    out: dict[str, Any] = {"device_id": config.device_id, "fleet": config.fleet, "state_dir": str(sd.root),
                           "running": sd.is_locked(), "boot": sd.read_boot(), "active_slot": None, "model": None}
    if sd.root.is_dir():
        out["active_slot"] = sd.active_slot()
        bundle = sd.active_bundle()
        if bundle is not None:
            m = read_manifest_unverified(bundle)  # it was verified when installed, and again at every load
            out["model"] = {"name": m["model"]["name"], "version": m["model"]["version"],
                            "release": m["model"].get("release"), "target": m["target"]["name"],
                            "backend": m["backend"]["name"], "bundle": str(bundle)}
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
        return 0
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
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from ..api import load
    from ..bundle import open_bundle, read_manifest_unverified
    from ..keyring import Keyring

    config = AgentConfig.load(args.config)
    keyring = Keyring.from_paths(config.keyring) if config.keyring else Keyring.default()
    verified = open_bundle(args.bundle, keyring)  # nothing is written before this passes
    new = verified.manifest["model"]
    sd = StateDir(config.state_dir).ensure()
    current = sd.active_bundle()
    if current is not None:
        old = read_manifest_unverified(current)["model"]
        if new["release"] < old.get("release", 0) and not args.allow_downgrade:
            raise RuntimeErrorBase(
                f"{args.bundle} is release {new['release']} of {new['name']}, older than the installed release "
                f"{old.get('release')} ({old['name']} {old['version']})",
                code=ErrorCode.BUNDLE_BAD_MANIFEST, hint="pass --allow-downgrade to install it anyway")
    health = None
    if not args.no_health_check:
        with load(args.bundle, keyring=keyring, threads=config.threads) as model:
            health = model.health_check()
        if not health["ok"]:
            raise RuntimeErrorBase(f"{args.bundle} fails its health check on this device: {health}",
                                   code=ErrorCode.ENGINE_INFERENCE_FAILED)
    # A/B installs (idle slot, marker, switch, roll back) come later; for now slot a is the active slot.
    dest = sd.place_bundle(args.bundle, "a")
    running = sd.is_locked()
    print(json.dumps({"ok": True, "installed": str(dest), "slot": "a", "model": new, "key_id": verified.key_id,
                      "health_check": health, "agent_running": running}, indent=2) if args.json else
          f"installed {new['name']} {new['version']} (release {new['release']}) in slot a"
          + ("; restart the agent to serve it" if running else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgekit-agent", description="edgekit device agent: serve a bundle, report "
                                "telemetry over MQTT, answer fleet commands.")
    p.add_argument("--version", action="version", version=f"edgekit-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent (foreground; systemd runs it)")
    run.add_argument("--config", required=True, type=Path, help="agent config file (.toml or .json)")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=cmd_run)
    st = sub.add_parser("status", help="what the state directory says: running, boot, model, spool")
    st.add_argument("--config", required=True, type=Path)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    ins = sub.add_parser("install", help="verify a bundle with the keyring and make it the active model")
    ins.add_argument("bundle", type=Path)
    ins.add_argument("--config", required=True, type=Path)
    ins.add_argument("--allow-downgrade", action="store_true", help="install an older release than the active one")
    ins.add_argument("--no-health-check", action="store_true", help="skip the health-check inference")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_install)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, getattr(args, "log_level", "warning").upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except RuntimeErrorBase as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
