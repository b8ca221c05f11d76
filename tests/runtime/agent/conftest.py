"""Fixtures for the device agent: a real Mosquitto on a free loopback port, a recording
subscriber, agent configs and bundles (the golden one, and one with input statistics).

pytest runs with ``--import-mode=importlib``: tests reach the helpers through fixtures
(``broker``, ``subscriber``, ``agent_env``), not by importing this module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgekit_runtime.contract import fleet_protocol

from tests.polling import wait_until

REPO = Path(__file__).resolve().parents[3]
GOLDEN = REPO / "tests" / "golden"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """One Mosquitto process with its own config, persistence folder and log, restartable on its port."""

    def __init__(self, root: Path, *, extra: str = "", port: int | None = None, tls: bool = False):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls = tls
        self.log = root / "mosquitto.log"
        self.conf = root / "mosquitto.conf"
        (root / "data").mkdir(exist_ok=True)
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"{extra}\n"
            "persistence true\n"
            f"persistence_location {root / 'data'}/\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 1000\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            # started as root, Mosquitto drops to the user "mosquitto", who cannot read the test's tmp folders
            + ("user root\n" if os.geteuid() == 0 else "")
            + ("" if "allow_anonymous" in extra else "allow_anonymous true\n"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "Broker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

        def accepting() -> bool:
            if self.proc.poll() is not None:
                log = self.log.read_text() if self.log.exists() else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: "
                                   f"{self.proc.stderr.read().decode()} {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(accepting, timeout, what=f"mosquitto on port {self.port}")
        return self

    def stop(self) -> None:
        """Graceful stop (SIGTERM): Mosquitto saves its persistence file, as a service restart does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


class Subscriber:
    """Records every envelope under ``edgekit/v1/#`` (decoded), with a persistent session
    so that what is published while it reconnects after a broker restart still reaches it."""

    def __init__(self, broker: Broker, topic: str = "edgekit/v1/#", client_id: str | None = None):
        self.broker = broker
        self.messages: list[tuple[str, dict, bool]] = []  # (topic, envelope, retained flag)
        self.invalid: list[tuple[str, bytes, str]] = []
        self._lock = threading.Lock()
        self.connected = threading.Event()  # set once the subscription is acknowledged (SUBACK)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"test-sub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.connected.set()
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.reconnect_delay_set(0.05, 0.2)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        self.client.connect_async("127.0.0.1", broker.port, 30, clean_start=False, properties=props)
        self.client.loop_start()
        wait_until(self.connected.is_set, 10, what="subscriber connected and subscribed")

    def _on_message(self, client, userdata, msg) -> None:
        try:
            env = fleet_protocol.decode(msg.topic, msg.payload)
        except fleet_protocol.ProtocolError as exc:
            with self._lock:
                self.invalid.append((msg.topic, bytes(msg.payload), str(exc)))
            return
        with self._lock:
            self.messages.append((msg.topic, env, bool(msg.retain)))

    def of(self, kind: str, device: str | None = None) -> list[dict]:
        with self._lock:
            return [env for topic, env, _ in self.messages
                    if env["kind"] == kind and (device is None or env["device"] == device)]

    def events(self, type_: str | None = None) -> list[dict]:
        return [e for e in self.of("event") if type_ is None or e["body"]["type"] == type_]

    def ack(self, request_id: str) -> dict | None:
        acks = [a for a in self.of("ack") if a["body"]["request_id"] == request_id]
        return acks[0] if acks else None

    def wait(self, predicate: Callable[["Subscriber"], Any], timeout: float = 10.0, what: str = "messages"):
        return wait_until(lambda: predicate(self), timeout, what=what)

    def publish_cmd(self, fleet: str, device: str, command: str, request_id: str | None = None,
                    args: dict | None = None, **extra) -> str:
        request_id = request_id or uuid.uuid4().hex
        body = {"request_id": request_id, "command": command, **({"args": args} if args is not None else {}), **extra}
        env = fleet_protocol.envelope("cmd", fleet, device, 0, 0, body)
        self.client.publish(fleet_protocol.topic(fleet, device, "cmd"), fleet_protocol.encode(env), qos=1)
        return request_id

    def publish_raw(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber(broker):
    subs: list[Subscriber] = []

    def make(**kw) -> Subscriber:
        s = Subscriber(broker, **kw)
        subs.append(s)
        return s

    yield make
    for s in subs:
        s.close()


def fresh_state(broker: Broker, topic: str, timeout: float = 5.0) -> dict:
    """The retained message on ``topic`` as a brand-new subscriber sees it."""
    got: list[dict] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, qos=1)
    c.on_message = lambda cl, u, m: got.append({"retain": m.retain, **json.loads(m.payload)})
    c.connect("127.0.0.1", broker.port, 30)
    c.loop_start()
    try:
        wait_until(lambda: got, timeout, what=f"retained message on {topic}")
    finally:
        c.disconnect()
        c.loop_stop()
    return got[-1]


class AgentEnv:
    """Writes agent configs and bundles for a test; runs agents in-process or as subprocesses."""

    wait_until = staticmethod(wait_until)
    fresh_state = staticmethod(fresh_state)
    Broker = Broker
    GOLDEN = GOLDEN

    def __init__(self, tmp_path: Path, broker: Broker | None, kit):
        self.tmp = tmp_path
        self.broker = broker
        self.kit = kit
        self.keys = tmp_path / "keys"
        self.keys.mkdir()
        shutil.copy(GOLDEN / "golden.pub", self.keys / "golden.pub")
        (self.keys / "tests.pub").write_bytes(kit.public_pem(kit.key))
        self.procs: list[subprocess.Popen] = []
        self.agents: list[Any] = []

    def settings(self, device: str = "dev1", **overrides) -> dict[str, Any]:
        s = {"device_id": device, "fleet": "f1", "broker_url": self.broker.url if self.broker else "mqtt://127.0.0.1:1",
             "state_dir": str(self.tmp / f"state-{device}"), "keyring": str(self.keys),
             "telemetry_interval_s": 0.3, "keepalive_s": 5, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5,
             "shutdown_flush_s": 3.0, "spool_sync": "normal"}
        s.update(overrides)
        return {k: v for k, v in s.items() if v is not None}

    def config_file(self, device: str = "dev1", **overrides) -> Path:
        path = self.tmp / f"agent-{device}.json"
        path.write_text(json.dumps(self.settings(device, **overrides)))
        return path

    def config(self, device: str = "dev1", **overrides):
        from edgekit_runtime.agent import AgentConfig

        return AgentConfig.load(self.config_file(device, **overrides))

    def install(self, config_path: Path, bundle: Path | None = None) -> None:
        from edgekit_runtime.agent.cli import main

        assert main(["install", str(bundle or GOLDEN / "v1.0-onnxruntime-matmul.ekb"), "--config",
                     str(config_path)]) == 0

    def stats_bundle(self, name: str = "stats.ekb", seed: int = 0) -> Path:
        """The kit's MatMul bundle (x: [batch, 4]) with input_stats of N(0, 1) values, as the compiler writes them."""
        from edgekit.build.stages.package import input_statistics

        manifest, members = self.kit.parts()
        calib = np.random.default_rng(seed).normal(0.0, 1.0, size=(500, 4)).astype(np.float32)
        manifest["input_stats"] = {"x": input_statistics(calib)}
        return self.kit.write(name, manifest=manifest, members=members)

    def model_bundle(self, name: str, *, release: int = 2, scale: float = 2.0, version: str | None = None,
                     break_health: bool = False, health_offset: float = 0.0, budget_ms: float | None = None,
                     padding: int = 0) -> Path:
        """A signed MatMul bundle with weights ``scale * W`` (so its outputs differ from release 1).

        ``break_health``: the stored expected output is wrong (by 1.0), so the bundle verifies but
        fails its health check on the device (as a model compiled for other hardware would).
        ``health_offset``: add this to the stored expected output instead (the first output is
        exactly 0, so there the tolerance is the manifest's ``atol``, 1e-5).
        ``padding``: bytes of an extra (random, signed) member, so a download takes a while.
        """
        kit = self.kit
        manifest, members = kit.parts()
        weights = (kit.WEIGHTS * scale).astype(np.float32)
        members["model.onnx"] = kit.matmul_onnx(weights)
        expected = kit.SAMPLE @ weights + (1.0 if break_health else health_offset)
        members["health/expected_output.npy"] = kit.npy(expected.astype(np.float32))
        manifest["model"].update(release=release, version=version or f"{release}.0.0")
        if budget_ms is not None:
            manifest["target"]["latency_budget_ms"] = budget_ms
        if padding:
            members["padding.bin"] = np.random.default_rng(release).bytes(padding)
        return kit.write(name, manifest=manifest, members=members)

    # -- in-process agent ----------------------------------------------------------------
    def start_agent(self, config, **kw):
        """An :class:`Agent` running its loop on a thread; stopped at teardown."""
        from edgekit_runtime.agent import Agent

        agent = Agent(config, **kw)
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        agent._test_thread = thread
        self.agents.append(agent)
        return agent

    def stop_agent(self, agent, timeout: float = 15.0) -> None:
        agent.request_stop()
        agent._test_thread.join(timeout)
        assert not agent._test_thread.is_alive(), "the agent did not stop"

    # -- subprocess agent ------------------------------------------------------------------
    def spawn(self, config_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        log = open(self.tmp / f"agent-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "edgekit_runtime.agent.cli", "run", "--config",
                                 str(config_path), "--log-level", "info"], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=self.tmp)
        proc.log_path = log.name
        self.procs.append(proc)
        return proc

    def log_of(self, proc) -> str:
        return Path(proc.log_path).read_text()

    def close(self) -> None:
        for agent in self.agents:
            if agent._test_thread.is_alive():
                agent.request_stop()
                agent._test_thread.join(10)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def agent_env(request, tmp_path, kit):
    broker = request.getfixturevalue("broker") if "broker" in request.fixturenames else None
    env = AgentEnv(tmp_path, broker, kit)
    yield env
    env.close()
