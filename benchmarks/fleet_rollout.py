"""Rollout rate control on one machine: 100 `edgekit-agent run` processes, Mosquitto, `edgekit flash --fleet`.

A control-plane benchmark. Every device serves the tests' one-MatMul model (a 4x3 MatMul,
microseconds to run), so what is timed is the rollout machinery, not inference: command
fan-out over MQTT, downloads from the bundle server, the agents' install transactions
(download, verify, unpack, prepare, health check, switch, all fsync'd), their answers, and
the host's waves. What is measured, per scenario:

* **command -> fleet switched**: ``fleet_switch_s`` of the rollout's summary, from the
  first signed ``install`` command to the last device's successful answer;
* **per wave**: devices, first command -> last answer, and the gap the host leaves between
  a wave's last answer and the next wave's first command;
* **where a device's time goes** (to profile a slow switch): command sent -> the agent's
  first ``install_progress`` event (MQTT delivery and dispatch), the install steps the agent
  reports (``result.timings_s``), its ack -> the host recording it;
* **lost**: devices not serving a verified model of the expected release afterwards, devices
  whose install ran more than once (their ``installs.jsonl``), and messages lost on the way:
  a watcher subscribed to the fleet's topics before the agents started checks that every
  device's ``(boot, seq)`` numbers arrive without a gap;
* **load**: CPU seconds and peak RSS of the `edgekit flash` process (the rollout and its
  bundle HTTP server, ``--serve``), of Mosquitto, and of the agents (sum, and per agent RSS
  and PSS, so 100 of them can be seen to fit the machine's memory).

Scenarios (the defaults are the issue's done-means configuration):

* ``waves``: release 1 -> 2 on all devices; ``--canary 5 --wave-start 5 --wave-factor 2``
  (5 canaries, then waves of 5, 10, 20, 40 and the last 20).
* ``abort``: the same, with ``--abort-percent 10 --abort-min-devices 20``, where every
  tenth device (dev009, dev019, ...) refuses the install: its agent config sets
  ``health_latency_budget_ms`` far below what any inference takes, so the new model fails
  the health check's latency gate on that device (a real refusal by the device; at start-up
  the same budget only warns, so it serves release 1). The rollout must halt once 10 % of
  at least 20 finished devices failed, roll back the devices it switched, and leave the
  whole fleet on release 1.

Setup per scenario (not timed): a fresh Mosquitto (``edgekit.fleet.broker``), N state
directories given release 1 by the agent's own install transaction (what ``edgekit-agent
install`` runs when no agent is running), N agents started with a lean config (telemetry
every 10 s, 1 inference thread, ``spool_sync`` normal), the watcher, and release 2 handed to
``edgekit flash BUNDLE --fleet ... --serve`` run as its own process, as a user runs it.

All agents share this machine's cores and disk: a wave's installs contend for CPU and fsync,
which a real fleet (one board per device) does not. Figures taken while other work runs on
the machine are noisy; the CPU seconds per device are the steadier figure.

    python benchmarks/fleet_rollout.py                       # 100 agents, waves + abort
    python benchmarks/fleet_rollout.py --devices 30 --scenarios waves --keep
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

if __name__ == "__main__":  # `python benchmarks/fleet_rollout.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, CpuMonitor, ensure_keys, file_sha256, log, provenance

RESULTS = REPO / "benchmarks" / "results"
FLEET = "bench"
STEPS = ("download", "verify", "unpack", "prepare", "health_check", "switch")
SCENARIOS = ("waves", "abort")
# far below any inference (0.1 microsecond): the health check's latency gate refuses the new model
REFUSING_BUDGET_MS = 0.0001
WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 8 - 0.75
SAMPLE = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


# ----------------------------------------------------------------------------- bundles
def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _matmul_onnx() -> bytes:
    """The tests' model (tests/flash/conftest.py): y = x @ W, x float32 [batch, 4]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(WEIGHTS, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8,
                              producer_name="edgekit-benchmarks")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def matmul_bundles(out_dir: Path, releases: tuple[int, ...] = (1, 2)) -> dict[int, Path]:
    """One signed one-MatMul bundle per release (benchmark key), with a health check and no latency budget."""
    from edgekit_runtime.contract import bundle_spec

    from edgekit.build.bundle_writer import write_bundle
    from edgekit.signing import load_private_key

    key = load_private_key(ensure_keys()["private"])
    members = {"model.onnx": _matmul_onnx(), "health/input.npy": _npy(SAMPLE),
               "health/expected_output.npy": _npy(SAMPLE @ WEIGHTS)}
    out: dict[int, Path] = {}
    for release in releases:
        manifest = {
            "format": bundle_spec.FORMAT_NAME, "format_version": bundle_spec.FORMAT_VERSION,
            "created_at": "2020-01-01T00:00:00+00:00", "created_by": "benchmarks/fleet_rollout.py",
            "model": {"name": "matmul", "version": f"{release}.0.0", "release": release},
            "target": {"name": "onnxruntime-cpu", "device": "generic"},
            "backend": {"name": "onnxruntime", "version": "test", "precision": "fp32", "artifact": "model.onnx",
                        "engines": ["onnxruntime"], "options": {"threads": 1}},
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4], "layout": None, "quantization": None}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3], "layout": None,
                         "quantization": None}],
            "preprocess": None, "postprocess": None, "labels": None, "metrics": {}, "calibration": None,
            "health_check": {"input": "health/input.npy", "expected_output": "health/expected_output.npy",
                             "atol": 1e-5, "rtol": 1e-5},
            "files": {}, "signing": {},
        }
        out[release] = write_bundle(out_dir / f"matmul-r{release}.ekb", manifest, members, key)
    return out


# ----------------------------------------------------------------------------- /proc
def proc_cpu_s(pid: int) -> Optional[float]:
    """User + system CPU seconds of a live process (/proc/<pid>/stat), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_memory(pid: int) -> dict[str, Optional[float]]:
    """RSS now, peak RSS (VmHWM) and PSS in MiB (PSS: shared pages split among the processes sharing them)."""
    out: dict[str, Optional[float]] = {"rss_mib": None, "peak_rss_mib": None, "pss_mib": None}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    out["rss_mib"] = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    out["peak_rss_mib"] = int(line.split()[1]) / 1024
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    out["pss_mib"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def mem_available_mib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class CpuSampler:
    """CPU seconds of a few processes, sampled every ``interval`` s, to cut out a time window afterwards."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05):
        self.pids = dict(pids)
        self.interval = interval
        self.samples: list[tuple[float, dict[str, Optional[float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-sampler")

    def add(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), {n: proc_cpu_s(p) for n, p in list(self.pids.items())}))
            self._stop.wait(self.interval)

    def start(self) -> "CpuSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def at(self, name: str, ts: float) -> Optional[float]:
        """The process's CPU seconds at ``ts``: the last sample at or before it (the first after, if none)."""
        before = [s[name] for t, s in self.samples if t <= ts and s.get(name) is not None]
        if before:
            return before[-1]
        after = [s[name] for t, s in self.samples if t > ts and s.get(name) is not None]
        return after[0] if after else None

    def between(self, name: str, t0: float, t1: float) -> Optional[float]:
        a, b = self.at(name, t0), self.at(name, t1)
        return round(b - a, 3) if a is not None and b is not None else None


# ----------------------------------------------------------------------------- processes
def agent_command() -> list[str]:
    """The `edgekit-agent` console script of this interpreter's environment (or the module)."""
    script = Path(sys.executable).parent / "edgekit-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgekit_runtime.agent.cli"]


def edgekit_command() -> list[str]:
    script = Path(sys.executable).parent / "edgekit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgekit.cli"]


class Fleet:
    """N agents' configs, state directories and processes under ``root``; :meth:`close` stops them all.

    ``refusing``: devices whose config sets ``health_latency_budget_ms`` to
    :data:`REFUSING_BUDGET_MS` (they refuse any new model at the health check).
    """

    def __init__(self, root: Path, broker_url: str, n: int, telemetry_s: float, refusing: set[str] = frozenset()):
        self.root = root
        self.keys = root / "keys"
        self.keys.mkdir(parents=True)
        shutil.copy(ensure_keys()["public"], self.keys / "benchmark.pub")
        self.names = [f"dev{i:03d}" for i in range(n)]
        self.refusing = set(refusing)
        self.settings: dict[str, dict[str, Any]] = {}
        self.configs: dict[str, Path] = {}
        for name in self.names:
            # lean: one inference thread, telemetry every telemetry_s, no workload, a fast (not power-safe) spool
            s: dict[str, Any] = {
                "device_id": name, "fleet": FLEET, "broker_url": broker_url, "state_dir": str(self.state_dir(name)),
                "keyring": str(self.keys), "threads": 1, "telemetry_interval_s": telemetry_s, "keepalive_s": 30,
                "reconnect_min_s": 0.2, "reconnect_max_s": 2.0, "shutdown_flush_s": 2.0, "spool_sync": "normal",
                "spool_max_bytes": 8 * 1024 * 1024}
            self.settings[name] = dict(s)
            if name in self.refusing:
                s["health_latency_budget_ms"] = REFUSING_BUDGET_MS
            path = root / f"agent-{name}.json"
            path.write_text(json.dumps(s, indent=1))
            self.configs[name] = path
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def state_dir(self, name: str) -> Path:
        return self.root / f"state-{name}"

    def install(self, bundle: Path) -> dict[str, Any]:
        """Release 1 on every device by the agent's install transaction, as `edgekit-agent install` runs it
        when no agent is running (in this process: N interpreter starts would take minutes of CPU).

        Refusing devices get it with their budget left out (the override is what makes them refuse).
        """
        from edgekit_runtime.agent.config import AgentConfig
        from edgekit_runtime.agent.daemon import make_installer
        from edgekit_runtime.agent.install import InstallRequest
        from edgekit_runtime.agent.state import StateDir

        out = {}
        for name in self.names:
            config = AgentConfig.from_dict(self.settings[name])
            sd = StateDir(config.state_dir).ensure()
            sd.lock()
            try:
                installer = make_installer(sd, config)
                if isinstance(installer, str):
                    raise RuntimeError(f"{name}: {installer}")
                result, model = installer.install(InstallRequest(str(bundle), None, None, False, f"setup-{name}"))
                model.close()
                out[name] = result["timings_s"]
            finally:
                sd.unlock()
        return out

    def spawn(self, name: str) -> subprocess.Popen:
        log_path = self.root / f"agent-{name}.log"
        with open(log_path, "ab") as fh:
            proc = subprocess.Popen(agent_command() + ["run", "--config", str(self.configs[name]), "--log-level",
                                                       "warning"], stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=self.root, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.procs[name], self.logs[name] = proc, log_path
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.logs[name].read_text(errors="replace").splitlines()[-lines:])
        except (OSError, KeyError):
            return ""

    def agent_json(self, name: str) -> dict[str, Any]:
        try:
            return json.loads((self.state_dir(name) / "agent.json").read_text())
        except (OSError, ValueError):
            return {}

    def serving(self, name: str) -> dict[str, Any]:
        """What the device serves: the running agent's report, its active slot's record, its installs."""
        from edgekit_runtime.agent.state import StateDir

        sd = StateDir(self.state_dir(name))
        slot = sd.active_slot()
        rec = sd.read_slot(slot) if slot else {}
        reported = (self.agent_json(name).get("model") or {})
        try:
            lines = [json.loads(x) for x in sd.install_log.read_text().splitlines() if x.strip()]
        except OSError:
            lines = []
        remote = [x for x in lines if x.get("command") == "install" and not str(x.get("request_id")).startswith(
            "setup-")]
        return {"alive": self.procs[name].poll() is None, "active_slot": slot, "slot_state": rec.get("state"),
                "slot_release": (rec.get("model") or {}).get("release"), "reported_release": reported.get("release"),
                "reported_sha256": reported.get("sha256"), "installs_run": len(remote),
                "install_request_ids": sorted({x.get("request_id") for x in remote}),
                "rollbacks_run": sum(1 for x in lines if x.get("command") == "rollback")}

    def close(self) -> None:
        """SIGTERM every agent (they publish "offline" and flush), then SIGKILL what is left."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


class Watcher:
    """A fleet monitor's view: every message of the fleet, to find ``(boot, seq)`` gaps and install events.

    Subscribed (QoS 1) before any agent starts, so it sees each boot from its first message.
    """

    def __init__(self, broker_url: str):
        from edgekit.fleet.connection import BrokerSettings

        self.settings = BrokerSettings.from_url(broker_url)
        self.seen: dict[tuple[str, int], set[int]] = {}  # (device, boot) -> seqs
        self.progress: dict[str, float] = {}  # request id -> envelope ts of its first install_progress
        self.acks: dict[str, float] = {}  # request id -> envelope ts of its ack
        self.messages = 0
        self.invalid = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = self.settings.paho_client(f"bench-watcher-{os.getpid()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"edgekit/v1/{FLEET}/#", qos=1)
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = self._on_message

    def start(self) -> "Watcher":
        self.client.connect(self.settings.host, self.settings.port, 30, clean_start=True)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError("the watcher could not subscribe to the broker")
        return self

    def _on_message(self, client, userdata, message) -> None:
        from edgekit_runtime.contract import fleet_protocol

        try:
            msg = fleet_protocol.decode(message.topic, bytes(message.payload))
        except fleet_protocol.ProtocolError:
            with self._lock:
                self.invalid += 1
            return
        if msg["kind"] == "cmd":
            return
        body = msg["body"]
        with self._lock:
            self.messages += 1
            if msg["seq"] > 0:  # seq 0 is the last will, sent by the broker for a lost connection
                self.seen.setdefault((msg["device"], msg["boot"]), set()).add(msg["seq"])
            rid = body.get("request_id")
            if msg["kind"] == "event" and body.get("type") == "install_progress" and isinstance(rid, str):
                self.progress.setdefault(rid, float(msg["ts"]))
            elif msg["kind"] == "ack" and isinstance(rid, str):
                self.acks.setdefault(rid, float(msg["ts"]))

    def gaps(self) -> dict[str, Any]:
        """Per device and boot: seq numbers missing between 1 and the highest seen."""
        with self._lock:
            out = {}
            for (device, boot), seqs in self.seen.items():
                missing = sorted(set(range(1, max(seqs) + 1)) - seqs)
                if missing:
                    out[f"{device} boot {boot}"] = missing[:20]
            return {"messages": self.messages, "invalid": self.invalid, "boots": len(self.seen),
                    "lost": sum(len(v) for v in out.values()), "where": out}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def run_flash(cmd: list[str], cwd: Path, sampler: CpuSampler, timeout: float) -> dict[str, Any]:
    """Run `edgekit flash` to its end; its output, exit code, and CPU/peak RSS from the kernel (wait4)."""
    out_path, err_path = cwd / "flash.out", cwd / "flash.err"
    t0 = time.time()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd)
        sampler.add("flash", proc.pid)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise RuntimeError(f"edgekit flash did not finish within {timeout:.0f} s: "
                                   f"{err_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = out_path.read_text(errors="replace")
    try:
        summary = json.loads(text)
    except ValueError:
        raise RuntimeError(f"edgekit flash exited with {proc.returncode} without a JSON summary:\n{text[-2000:]}\n"
                           f"{err_path.read_text(errors='replace')[-3000:]}") from None
    return {"summary": summary, "exit_code": proc.returncode, "started_ts": t0, "ended_ts": time.time(),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


# ----------------------------------------------------------------------------- figures
def _stats(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(statistics.median(values), 3), "max": round(max(values), 3),
            "min": round(min(values), 3)}


def wave_times(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per phase: devices, first command, last answer, and the host's gap after the phase before."""
    out, first_all, prev_end = [], record.get("first_sent_ts"), None
    for index, phase in enumerate(record.get("phases") or []):
        attempts = [record["devices"][d]["install"] for d in phase if record["devices"][d].get("install")]
        row: dict[str, Any] = {"phase": "canary" if index == 0 else f"wave {index}", "devices": len(phase),
                               "sent": len(attempts)}
        if attempts:
            sent = min(a["first_sent_ts"] for a in attempts)
            done = [a["finished_ts"] for a in attempts if a.get("finished_ts")]
            end = max(done) if done else None
            sends = [a["last_send_ts"] for a in attempts if a.get("last_send_ts")]
            row.update(start_s=round(sent - first_all, 3), end_s=round(end - first_all, 3) if end else None,
                       send_spread_s=round(max(sends) - sent, 3) if sends else None,
                       seconds=round(end - sent, 3) if end and len(done) == len(attempts) else None,
                       gap_before_s=round(sent - prev_end, 3) if prev_end else None,
                       failed=sum(1 for a in attempts if a.get("status") in ("failed", "timed_out")))
            prev_end = end
        out.append(row)
    return out


def device_times(record: dict[str, Any], watcher: Watcher) -> dict[str, Any]:
    """Where a device's install time goes: delivery, the agent's steps, the answer's way back."""
    steps: dict[str, list[float]] = {s: [] for s in STEPS}
    delivery, agent, back, total = [], [], [], []
    for e in record["devices"].values():
        ins = e.get("install") or {}
        if not ins.get("finished_ts"):
            continue
        # from the host deciding to send (the record written, then the wave's commands published together)
        rid, sent = ins["request_id"], ins.get("first_sent_ts")
        total.append(ins["finished_ts"] - sent)
        first, acked = watcher.progress.get(rid), watcher.acks.get(rid)
        if first is not None and sent is not None:
            delivery.append(first - sent)
        if first is not None and acked is not None:
            agent.append(acked - first)
        if acked is not None:
            back.append(ins["finished_ts"] - acked)
        for s, v in (ins.get("timings_s") or {}).items():
            if s in steps:
                steps[s].append(float(v))
    return {"command_to_answer_s": _stats(total), "delivery_s": _stats(delivery), "agent_s": _stats(agent),
            "answer_back_s": _stats(back), "steps_s": {s: _stats(v) for s, v in steps.items()}}


# ----------------------------------------------------------------------------- one scenario
def run_scenario(name: str, args: argparse.Namespace, bundles: dict[int, Path], root: Path) -> dict[str, Any]:
    """A fresh broker and fleet on release 1, one `edgekit flash --fleet` of release 2; figures and checks."""
    from edgekit.fleet.broker import BrokerConfig, free_port, start_broker

    abort = name == "abort"
    root.mkdir(parents=True)
    refusing = {f"dev{i:03d}" for i in range(args.devices) if abort and i % args.refuse_every == args.refuse_every - 1}
    result: dict[str, Any] = {"scenario": name, "devices": args.devices, "refusing": sorted(refusing)}
    with contextlib.ExitStack() as stack:
        broker = start_broker(BrokerConfig(dir=root / "broker", port=free_port(), persistence=False))
        stack.callback(broker.stop)
        fleet = Fleet(root, broker.url, args.devices, args.telemetry_s, refusing)
        stack.callback(fleet.close)

        t0 = time.monotonic()
        fleet.install(bundles[1])
        result["setup_install_r1_s"] = round(time.monotonic() - t0, 1)

        watcher = Watcher(broker.url).start()
        stack.callback(watcher.close)
        mem0 = mem_available_mib()
        t0 = time.monotonic()
        for dev in fleet.names:
            fleet.spawn(dev)

        def all_online() -> bool:
            for dev, proc in fleet.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"agent {dev} exited with {proc.returncode}:\n{fleet.log_tail(dev)}")
            return all(fleet.agent_json(d).get("state") == "online" and (fleet.agent_json(d).get("model") or {})
                       .get("release") == 1 for d in fleet.names)

        wait_until(all_online, args.start_timeout, f"{args.devices} agents online serving release 1", 0.5)
        result["setup_agents_online_s"] = round(time.monotonic() - t0, 1)
        time.sleep(1.0)  # their start-up is over: the load figures below are the rollout's
        sampler = CpuSampler({"broker": broker.proc.pid}).start()
        stack.callback(sampler.stop)
        agent_cpu0 = {d: proc_cpu_s(p.pid) for d, p in fleet.procs.items()}

        cmd = edgekit_command() + [
            "flash", str(bundles[2]), "--fleet", FLEET, "--broker", broker.url, "--devices", "*",
            "--canary", args.canary, "--wave-start", str(args.wave_start), "--wave-factor", str(args.wave_factor),
            "--wave-max", str(args.wave_max), "--max-in-flight", str(args.max_in_flight),
            "--device-timeout", str(args.device_timeout), "--expiry", "3600",
            "--serve", f"127.0.0.1:{free_port()}", "--key", str(ensure_keys()["private"]),
            "--record-dir", str(root), "--json"]
        if abort:
            cmd += ["--abort-percent", str(args.abort_percent), "--abort-min-devices", str(args.abort_min_devices)]
        log(f"{name}: edgekit flash of release 2 to {args.devices} agents, canary {args.canary}, waves from "
            f"{args.wave_start} x{args.wave_factor:g}" + (f", {len(refusing)} refusing, abort at "
                                                          f"{args.abort_percent:g} % after {args.abort_min_devices}"
                                                          if abort else ""))
        busy, mon_t0 = CpuMonitor().start(), time.time()
        flash = run_flash(cmd, root, sampler, args.flash_timeout)
        machine, mon_t1 = busy.stop(), time.time()
        agent_cpu = {d: proc_cpu_s(p.pid) for d, p in fleet.procs.items()}
        agents_cpu_s = sum(agent_cpu[d] - agent_cpu0[d] for d in fleet.names
                           if agent_cpu[d] is not None and agent_cpu0[d] is not None)
        # the machine's other work: all CPU time but this benchmark's own processes (agents, broker, flash, itself)
        ours_s = agents_cpu_s + (sampler.between("broker", mon_t0, mon_t1) or 0.0) + flash["cpu_s"]
        machine["benchmark_processes_pct"] = 100 * ours_s / ((mon_t1 - mon_t0) * (os.cpu_count() or 1))
        machine["other_work_pct"] = max(0.0, machine.get("other_processes_pct", 0.0)
                                        - machine["benchmark_processes_pct"])
        result["machine_during_rollout"] = {k: round(v, 1) for k, v in machine.items()}
        summary = flash["summary"]
        record = json.loads(Path(summary["record"]).read_text())
        first, last = record["first_sent_ts"], record.get("last_switch_ts")
        rb = record.get("rollback") or {}
        end = max(filter(None, [last, rb.get("finished_ts"), record.get("updated_ts")]))
        halted_at = next((e["ts"] for e in record["log"] if e["message"].startswith("halted:")), None)
        result.update(
            exit_code=flash["exit_code"],
            summary={k: summary.get(k) for k in ("phase", "counts", "failures", "halted", "halt_reason",
                                                 "fleet_switch_s", "rolled_back", "rollback_failed")},
            fleet_switch_s=summary.get("fleet_switch_s"),
            time_to_halt_s=round(halted_at - first, 3) if halted_at else None,
            time_to_rollback_done_s=round(rb["finished_ts"] - first, 3) if rb.get("finished_ts") else None,
            flash_wall_s=round(flash["ended_ts"] - flash["started_ts"], 3),
            waves=wave_times(record), times=device_times(record, watcher))

        # after: what every device serves, and whether anything ran twice or went missing
        expected = 1 if summary["halted"] else 2
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: all(fleet.agent_json(d).get("model", {}).get("release") == expected
                                   for d in fleet.names), 30, f"every agent reporting release {expected}")
        per = {d: fleet.serving(d) for d in fleet.names}
        on_expected = [d for d, v in per.items() if v["alive"] and v["slot_state"] == "good"
                       and v["slot_release"] == expected and v["reported_release"] == expected]
        twice = [d for d, v in per.items() if v["installs_run"] > 1]
        sent = {d for d, e in record["devices"].items() if e.get("install")}
        result["after"] = {"expected_release": expected, "on_expected_release": len(on_expected),
                           "lost": sorted(set(fleet.names) - set(on_expected)), "installed_twice": twice,
                           "installs_run": sum(v["installs_run"] for v in per.values()),
                           "installs_sent": len(sent), "rollbacks_run": sum(v["rollbacks_run"] for v in per.values()),
                           "not_sent_but_installed": sorted(d for d, v in per.items()
                                                            if v["installs_run"] and d not in sent)}
        if abort:
            switched_back = [d for d in summary.get("rolled_back") or []]
            result["after"]["rolled_back"] = len(switched_back)
            result["after"]["refusing_failed"] = sorted(d for d in refusing if (record["devices"][d].get("install")
                                                                                or {}).get("status") == "failed")
        result["messages"] = watcher.gaps()

        # load during the rollout: first command -> the rollout's end
        t_end = flash["ended_ts"]
        mem = {d: proc_memory(p.pid) for d, p in fleet.procs.items()}
        rss = [m["rss_mib"] for m in mem.values() if m["rss_mib"]]
        pss = [m["pss_mib"] for m in mem.values() if m["pss_mib"]]
        broker_mem = proc_memory(broker.proc.pid)
        result["load"] = {
            "window_s": round(t_end - first, 3),
            "flash": {"cpu_s_total": flash["cpu_s"], "cpu_s_rollout": sampler.between("flash", first, end),
                      "peak_rss_mib": flash["peak_rss_mib"]},
            "broker": {"cpu_s_rollout": sampler.between("broker", first, end),
                       "peak_rss_mib": broker_mem["peak_rss_mib"], "rss_mib": broker_mem["rss_mib"]},
            "agents": {"cpu_s_sum": round(agents_cpu_s, 2),
                       "rss_mib": _stats(rss), "rss_mib_sum": round(sum(rss), 1),
                       "pss_mib": _stats(pss), "pss_mib_sum": round(sum(pss), 1),
                       "peak_rss_mib_max": max((m["peak_rss_mib"] or 0) for m in mem.values()),
                       "mem_available_drop_mib": round(mem0 - mem_available_mib(), 1)
                       if mem0 and mem_available_mib() else None},
        }
        dead = [d for d, p in fleet.procs.items() if p.poll() is not None]
        bad = set(dead) | set(result["after"]["lost"]) | set(twice)
        if bad:
            result["agent_log_tails"] = {d: fleet.log_tail(d, 30) for d in sorted(bad)[:10]}
        result["record"] = {k: record.get(k) for k in ("id", "phase", "halted", "halt_reason", "log")}
    return result


def check(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """What the issue's done-means require of a scenario's result; the list of what it misses."""
    miss = []
    a, m = result["after"], result["messages"]
    if m["lost"] or m["invalid"]:
        miss.append(f"{m['lost']} message(s) lost, {m['invalid']} invalid")
    if a["installed_twice"] or a["not_sent_but_installed"]:
        miss.append(f"installed twice: {a['installed_twice']}, installed unasked: {a['not_sent_but_installed']}")
    if a["lost"]:
        miss.append(f"{len(a['lost'])} device(s) not serving release {a['expected_release']}: {a['lost'][:10]}")
    if result["scenario"] == "waves":
        if result["summary"]["halted"] or result["summary"]["counts"]["succeeded"] != result["devices"]:
            miss.append(f"not every device switched: {result['summary']['counts']}")
        if result["fleet_switch_s"] is None or result["fleet_switch_s"] > args.target_s:
            miss.append(f"fleet switch {result['fleet_switch_s']} s, over the {args.target_s:g} s target")
        sizes = [w["devices"] for w in result["waves"][1:]]
        if len(sizes) > 1 and not all(b >= a for a, b in zip(sizes, sizes[1:-1])):
            miss.append(f"waves do not grow: {sizes}")
    else:
        if not result["summary"]["halted"]:
            miss.append("the rollout did not halt")
        finished = sum(w.get("sent", 0) for w in result["waves"])
        if finished < args.abort_min_devices:
            miss.append(f"halted after {finished} devices, fewer than {args.abort_min_devices}")
        if result["summary"]["rollback_failed"]:
            miss.append(f"rollback failed on {result['summary']['rollback_failed']}")
    return miss


# ----------------------------------------------------------------------------- output
def _label(r: dict[str, Any]) -> str:
    return r["scenario"] + (f" #{r['run']}" if r.get("repeats", 1) > 1 else "")


def _fmt(v: Any, digits: int = 2) -> str:
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def print_table(report: dict[str, Any]) -> None:
    print()
    for r in report["runs"]:
        if "error" in r:
            print(f"{_label(r)}: ERROR {r['error'].splitlines()[0][:200]}")
            continue
        c = {k: v for k, v in r["summary"]["counts"].items() if v}
        ld = r["load"]
        print(f"== {_label(r)}: {r['devices']} agents ({len(r['refusing'])} refusing) ==")
        if r["scenario"] == "waves":
            print(f"  command -> fleet switched: {_fmt(r['fleet_switch_s'])} s   (target <= {report['target_s']:g} s)")
        else:
            print(f"  halted at {_fmt(r['time_to_halt_s'])} s: {r['summary']['halt_reason']}")
            print(f"  rollback done at {_fmt(r['time_to_rollback_done_s'])} s; rolled back "
                  f"{r['after'].get('rolled_back')}, rollback failed {len(r['summary']['rollback_failed'] or [])}")
        print(f"  outcome {c}; {r['after']['on_expected_release']}/{r['devices']} serve release "
              f"{r['after']['expected_release']}; lost devices {len(r['after']['lost'])}, lost messages "
              f"{r['messages']['lost']} of {r['messages']['messages']}, installed twice "
              f"{len(r['after']['installed_twice'])}")
        for w in r["waves"]:
            print(f"  {w['phase']:>8}: {w['devices']:3d} devices, sent {w['sent']:3d}, "
                  f"start {_fmt(w.get('start_s'))} s, end {_fmt(w.get('end_s'))} s, took {_fmt(w.get('seconds'))} s, "
                  f"gap before {_fmt(w.get('gap_before_s'), 3)} s, sending took {_fmt(w.get('send_spread_s'), 3)} s, "
                  f"failed {w.get('failed', 0)}")
        t = r["times"]
        print("  per device median/max s: command->answer {0}, delivery {1}, agent {2}, answer back {3}".format(
            *(f"{t[k]['median']:.3f}/{t[k]['max']:.3f}" if t[k]["n"] else "–"
              for k in ("command_to_answer_s", "delivery_s", "agent_s", "answer_back_s"))))
        print("  agent steps median/max s: " + ", ".join(f"{s} {v['median']:.3f}/{v['max']:.3f}"
                                                          for s, v in t["steps_s"].items() if v["n"]))
        print(f"  load: edgekit flash CPU {_fmt(ld['flash']['cpu_s_rollout'])} s in the rollout "
              f"({_fmt(ld['flash']['cpu_s_total'])} s in all), peak RSS {_fmt(ld['flash']['peak_rss_mib'], 1)} MiB; "
              f"mosquitto CPU {_fmt(ld['broker']['cpu_s_rollout'])} s, peak RSS "
              f"{_fmt(ld['broker']['peak_rss_mib'], 1)} MiB; agents CPU {_fmt(ld['agents']['cpu_s_sum'])} s in all, "
              f"RSS median {_fmt(ld['agents']['rss_mib'].get('median'), 1)} MiB (sum "
              f"{_fmt(ld['agents']['rss_mib_sum'], 0)} MiB, PSS sum {_fmt(ld['agents']['pss_mib_sum'], 0)} MiB)")
        m = r["machine_during_rollout"]
        print(f"  machine: {m.get('machine_busy_pct', 0):.0f} % busy; other work than this benchmark's: "
              f"{m.get('other_work_pct', 0):.0f} % of the machine (the figures are noisy when that is high)")
        print(f"  done-means: {'MET' if not r['missing'] else 'NOT MET: ' + '; '.join(r['missing'])}")
    switched = [r["fleet_switch_s"] for r in report["runs"] if r["scenario"] == "waves" and "error" not in r]
    if switched:
        print(f"\nCOMMAND -> FLEET SWITCHED ({report['devices']} agents): median "
              f"{_fmt(statistics.median([v for v in switched if v is not None] or [float('nan')]))} s over "
              f"{len(switched)} run(s) ({', '.join(_fmt(v) for v in switched)}); target <= {report['target_s']:g} s")
    print()


def markdown(report: dict[str, Any]) -> str:
    s = report["system"]
    lines = [
        f"# Fleet rollout rate control: {report['devices']} local agents, real Mosquitto, `edgekit flash --fleet`",
        "",
        f"- **Machine**: {s['cpu']}, {s['usable_cores']} usable cores, {s['os']}; Python {s['python']}; "
        f"{report['mosquitto']}. Machine busy while `edgekit flash` ran: "
        + ", ".join(f"{_label(r)} {r['machine_during_rollout'].get('machine_busy_pct', 0):.0f} % (other work than "
                    f"this benchmark's: {r['machine_during_rollout'].get('other_work_pct', 0):.0f} % of the machine)"
                    for r in report["runs"] if "error" not in r) + ".",
        f"- **Fleet**: {report['devices']} `edgekit-agent run` processes, each with its own state directory and "
        f"persistent MQTT session, one Mosquitto, all on this machine. Lean agent config: 1 inference thread, "
        f"telemetry every {report['settings']['telemetry_s']:g} s, `spool_sync` normal, no workload.",
        "- **Model**: the tests' one-MatMul ONNX model (4x3, ONNX Runtime CPU), release 1 → release 2, signed "
        "with the benchmark key: a control-plane benchmark, the CPU is not spent on inference.",
        "- **Rollout**: `edgekit flash BUNDLE --fleet bench --serve 127.0.0.1:PORT "
        f"--canary {report['settings']['canary']} "
        f"--wave-start {report['settings']['wave_start']} --wave-factor {report['settings']['wave_factor']:g}"
        + (f" --wave-max {report['settings']['wave_max']}" if report['settings']['wave_max'] else "")
        + (f" --max-in-flight {report['settings']['max_in_flight']}" if report['settings']['max_in_flight'] else "")
        + "` run as its own process (its bundle HTTP server inside); abort scenario adds "
        f"`--abort-percent {report['settings']['abort_percent']:g} --abort-min-devices "
        f"{report['settings']['abort_min_devices']}`, with every {report['settings']['refuse_every']}th device "
        f"refusing at its health check (`health_latency_budget_ms` {REFUSING_BUDGET_MS} in its agent config).",
        "- **command → fleet switched** = first install command → last successful answer (`fleet_switch_s`). "
        "**lost devices** = not serving a verified model (slot `good`) of the expected release afterwards, as its "
        "state directory and the running agent report it. **lost messages** = gaps in the `(boot, seq)` numbers a "
        "watcher subscribed to the fleet before the agents started received. **installed twice** = more than one "
        "install in a device's `installs.jsonl`.",
        "",
        "| scenario | result | command → switched s | halt s | rollback done s | outcome | serving after | "
        "lost devices | lost messages | installed twice |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {_label(r)} | error: {r['error'].splitlines()[0][:120]} |" + " |" * 8)
            continue
        c = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in r["summary"]["counts"].items() if v)
        lines.append(
            f"| {_label(r)} ({len(r['refusing'])} refusing) | {'met' if not r['missing'] else 'NOT met'} | "
            f"**{_fmt(r['fleet_switch_s'])}** | {_fmt(r['time_to_halt_s'])} | {_fmt(r['time_to_rollback_done_s'])} | "
            f"{c} | {r['after']['on_expected_release']}/{r['devices']} on r{r['after']['expected_release']} | "
            f"**{len(r['after']['lost'])}** | **{r['messages']['lost']}** of {r['messages']['messages']} | "
            f"{len(r['after']['installed_twice'])} |")
    for r in report["runs"]:
        if "error" in r:
            continue
        lines += ["", f"**{_label(r)}** waves (seconds from the first command):", "",
                  "| phase | devices | sent | failed | start | end | took | host gap before | sending took |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for w in r["waves"]:
            lines.append(f"| {w['phase']} | {w['devices']} | {w['sent']} | {w.get('failed', 0)} | "
                         f"{_fmt(w.get('start_s'))} | {_fmt(w.get('end_s'))} | {_fmt(w.get('seconds'))} | "
                         f"{_fmt(w.get('gap_before_s'), 3)} | {_fmt(w.get('send_spread_s'), 3)} |")
    lines += ["", "Where a device's time goes (median / max s over the devices that answered): the host starts "
                  "sending its wave (record written, commands published) → the agent's first `install_progress` "
                  "(delivery), → its ack (the agent), → received by the host (answer back); the agent's own step "
                  "timings:", "",
              "| scenario | command → answer | delivery | agent | answer back | " + " | ".join(STEPS) + " |",
              "|---|---|---|---|---|" + "---|" * len(STEPS)]
    for r in report["runs"]:
        if "error" in r:
            continue
        t = r["times"]
        cell = (lambda v: f"{v['median']:.3f} / {v['max']:.3f}" if v["n"] else "–")
        lines.append(f"| {_label(r)} | " + " | ".join(cell(t[k]) for k in ("command_to_answer_s", "delivery_s",
                                                                                 "agent_s", "answer_back_s"))
                     + " | " + " | ".join(cell(t["steps_s"][s]) for s in STEPS) + " |")
    lines += ["", "Load during the rollout (first command → its end; CPU seconds from /proc, peak RSS from the "
                  "kernel: `wait4` for `edgekit flash`, VmHWM for Mosquitto):", "",
              "| scenario | window s | edgekit flash CPU s (rollout / all) | flash peak RSS MiB | mosquitto CPU s | "
              "mosquitto peak RSS MiB | agents CPU s (sum) | agent RSS MiB median / max | agents RSS sum MiB | "
              "agents PSS sum MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "error" in r:
            continue
        ld = r["load"]
        a = ld["agents"]
        lines.append(f"| {_label(r)} | {_fmt(ld['window_s'])} | {_fmt(ld['flash']['cpu_s_rollout'])} / "
                     f"{_fmt(ld['flash']['cpu_s_total'])} | {_fmt(ld['flash']['peak_rss_mib'], 1)} | "
                     f"{_fmt(ld['broker']['cpu_s_rollout'])} | {_fmt(ld['broker']['peak_rss_mib'], 1)} | "
                     f"{_fmt(a['cpu_s_sum'])} | {_fmt(a['rss_mib'].get('median'), 1)} / "
                     f"{_fmt(a['rss_mib'].get('max'), 1)} | {_fmt(a['rss_mib_sum'], 0)} | "
                     f"{_fmt(a['pss_mib_sum'], 0)} |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    command = " ".join(["python benchmarks/fleet_rollout.py"] + list(report["argv"]))
    lines += ["", f"Generated {report['generated']} by `{command}` in {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def notes(report: dict[str, Any]) -> list[str]:
    out = [f"All {report['devices']} agents share {report['system']['usable_cores']} cores and one disk: a wave's "
           "installs (each a few fsyncs, an ONNX Runtime session and its health check) queue for them, which a "
           "fleet of boards does not. Wall-clock figures from a busy machine are upper bounds."]
    for r in report["runs"]:
        if "error" in r:
            continue
        gaps = [w["gap_before_s"] for w in r["waves"] if w.get("gap_before_s") is not None]
        sends = [w["send_spread_s"] for w in r["waves"] if w.get("send_spread_s") is not None]
        if gaps:
            out.append(f"{_label(r)}: the host's own time between waves, from a wave's last answer to the next "
                       f"wave's first command, sums to {sum(gaps):.3f} s over {len(gaps)} waves; sending the "
                       f"waves' commands (the record written before them, then the signed commands) "
                       f"{sum(sends):.3f} s over {len(sends)} phases; the rest is the devices' installs.")
    return out


# ----------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated: {', '.join(SCENARIOS)}")
    ap.add_argument("--canary", default="5", help="canary share ('5%%') or count ('5')")
    ap.add_argument("--wave-start", type=int, default=5)
    ap.add_argument("--wave-factor", type=float, default=2.0)
    ap.add_argument("--wave-max", type=int, default=0)
    ap.add_argument("--max-in-flight", type=int, default=0)
    ap.add_argument("--abort-percent", type=float, default=10.0)
    ap.add_argument("--abort-min-devices", type=int, default=20)
    ap.add_argument("--refuse-every", type=int, default=10, help="abort scenario: every Nth device refuses")
    ap.add_argument("--repeats", type=int, default=1, help="runs per scenario, each on a fresh broker and fleet")
    ap.add_argument("--telemetry-s", type=float, default=10.0, help="agents' telemetry interval")
    ap.add_argument("--device-timeout", type=float, default=120.0)
    ap.add_argument("--target-s", type=float, default=5.0, help="done-means: fleet switched within this")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds for all agents to come online")
    ap.add_argument("--flash-timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "fleet_rollout", help="results path without suffix")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, state dirs, records)")
    ap.add_argument("--note", action="append", default=[], help="a line for the Markdown notes (repeatable)")
    args = ap.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if set(scenarios) - set(SCENARIOS):
        ap.error(f"--scenarios: unknown {sorted(set(scenarios) - set(SCENARIOS))}; choose from {', '.join(SCENARIOS)}")
    if args.devices < 1 or args.refuse_every < 2 or args.repeats < 1:
        ap.error("--devices and --repeats must be at least 1, --refuse-every at least 2")

    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the cleanup in run_scenario stops every process
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    from edgekit.fleet.broker import find_mosquitto
    from edgekit_runtime.bench import system_description

    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="edgekit-fleet-rollout-"))
    report: dict[str, Any] = {
        "schema": "edgekit-bench-fleet-rollout/2",
        "argv": argv if argv is not None else sys.argv[1:],
        "system": system_description(),
        "mosquitto": subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True).stdout.splitlines()[0],
        "provenance": provenance(), "devices": args.devices, "target_s": args.target_s,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": [],
    }
    try:
        bundles = matmul_bundles(work / "bundles")
        report["bundles"] = {r: {"size_bytes": p.stat().st_size, "sha256": file_sha256(p)} for r, p in bundles.items()}
        for name in scenarios:
            for run in range(1, args.repeats + 1):
                try:
                    r = run_scenario(name, args, bundles, work / f"{name}-{run}")
                    r["missing"] = check(r, args)
                except (RuntimeError, TimeoutError) as exc:
                    log(f"{name} #{run}: FAILED: {exc}")
                    r = {"scenario": name, "devices": args.devices, "error": str(exc)}
                r.update(run=run, repeats=args.repeats)
                report["runs"].append(r)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["generated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["seconds"] = round(time.time() - t_start, 1)
    report["notes"] = notes(report) + args.note
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    args.out.with_suffix(".md").write_text(markdown(report))
    log(f"wrote {args.out.with_suffix('.json')} and .md")
    return 0 if all("error" not in r and not r["missing"] for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
