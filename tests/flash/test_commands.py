"""Fleet commands (:mod:`edgekit.flash.commands`): device selection, signed command bodies, FleetClient
(in memory and against a real Mosquitto, a test thread playing the device).
"""

from __future__ import annotations

import time

import pytest

from edgekit.errors import ConfigError, SigningError
from edgekit.flash.commands import DEFAULT_SIGNED_EXPIRY_S, FleetClient, Received, command_body, select_devices
from edgekit.fleet.connection import BrokerSettings, FleetConnectionError
from edgekit_runtime.contract import fleet_protocol as fp
from edgekit_runtime.command_auth import CommandAuthError, verify_command
from edgekit_runtime.keyring import key_id_of
from tests.flash.fleet_doubles import NEW_MODEL, OLD_MODEL, SHA, STEPS, MqttDevice
from tests.polling import wait_until


# ----------------------------------------------------------------------------- device selection
KNOWN = {
    "cam-1": {"status": "online", "model": {"name": "digits", "version": "1.0"}},
    "cam-2": {"status": "offline", "model": {"name": "digits", "version": "1.0"}},
    "cam-10": {"status": "online", "model": {"name": "yolo", "version": "2"}},
    "dock-01": {"status": "online", "model": None},
    "dock-02": {"status": "online", "model": {"name": "digits", "version": "1.0"}},
    "dock-10": {"status": "online", "model": {"name": "digits", "version": "1.0"}},
}


def test_select_devices_globs_and_filters():
    assert select_devices(KNOWN, "cam-*", None) == ["cam-1", "cam-2", "cam-10"]  # natural order
    assert select_devices(KNOWN, "cam-*,dock-0?", None) == ["cam-1", "cam-2", "cam-10", "dock-01", "dock-02"]
    assert select_devices(KNOWN, "*,status=online", None) == ["cam-1", "cam-10", "dock-01", "dock-02", "dock-10"]
    assert select_devices(KNOWN, "model=digits", None) == ["cam-1", "cam-2", "dock-02", "dock-10"]
    assert select_devices(KNOWN, "cam-*, model=digits, status=online", None) == ["cam-1"]
    assert select_devices(KNOWN, "model=y*", None) == ["cam-10"]
    assert select_devices(KNOWN, None, ["dock-10", "cam-2"]) == ["cam-2", "dock-10"]
    assert select_devices(KNOWN, "dock-1*", ["cam-1"]) == ["cam-1", "dock-10"]
    assert select_devices(KNOWN, "status=online", ["cam-2", "cam-1"]) == ["cam-1"]


def test_select_devices_errors_say_what_is_known():
    with pytest.raises(ConfigError, match=r"selects no device; known devices: cam-1 \(online, digits 1.0\)"):
        select_devices(KNOWN, "gate-*", None)
    with pytest.raises(ConfigError, match="selects no device"):
        select_devices(KNOWN, "cam-*,model=resnet", None)
    with pytest.raises(ConfigError, match="filter 'version' is unknown"):
        select_devices(KNOWN, "version=2", None)
    with pytest.raises(ConfigError, match="status=busy must be one of online, offline"):
        select_devices(KNOWN, "status=busy", None)
    with pytest.raises(ConfigError, match="gate-9: never reported"):
        select_devices(KNOWN, None, ["cam-1", "gate-9"])
    with pytest.raises(ConfigError, match="name the devices"):
        select_devices(KNOWN, None, None)
    with pytest.raises(ConfigError, match="no device has reported"):
        select_devices({}, "*", None)


# ----------------------------------------------------------------------------- commands
def test_command_bodies_follow_the_spec(key, keyring):
    body = command_body("f1", "cam-1", "install", {"url": "http://h/b.ekb", "sha256": SHA, "size": 1,
                                                   "allow_downgrade": False, "rollout": "r1"},
                        request_id="r-1", expires_ts=123.0, sign_key=key)
    assert set(body) == {"request_id", "command", "expires_ts", "args", "auth"}
    assert verify_command("f1", "cam-1", body, keyring) == key_id_of(key.public_key())
    with pytest.raises(CommandAuthError):  # signed for cam-1: useless for cam-2
        verify_command("f1", "cam-2", body, keyring)
    # the same fields sign to the same body: a resumed rollout re-sends an identical command
    assert command_body("f1", "cam-1", "install", body["args"], request_id="r-1", expires_ts=123.0,
                        sign_key=key) == body
    rb = command_body("f1", "cam-1", "rollback", {"reason": None}, sign_key=key)
    assert rb["command"] == "rollback" and rb["args"] == {"reason": None} and "auth" in rb
    # a signed command always expires (devices refuse one without): 1 day unless told
    assert rb["expires_ts"] == pytest.approx(time.time() + DEFAULT_SIGNED_EXPIRY_S, abs=60)
    assert DEFAULT_SIGNED_EXPIRY_S == 86400.0
    verify_command("f1", "cam-1", rb, keyring)  # the expiry is inside the signature
    for bad in (float("nan"), float("inf"), "tomorrow", True):
        with pytest.raises(ConfigError, match="expires_ts must be a finite UNIX time"):
            command_body("f1", "cam-1", "install", {}, expires_ts=bad, sign_key=key)
    assert command_body("f1", "cam-1", "ping", request_id="p") == {"request_id": "p", "command": "ping"}
    for command in ("install", "rollback"):
        with pytest.raises(SigningError, match="must be signed"):
            command_body("f1", "cam-1", command, {})
    fp.envelope("cmd", "f1", "cam-1", 0, 0, body)  # a valid envelope


def test_fleet_client_counts_bad_messages_and_ignores_stale_wills():
    client = FleetClient(BrokerSettings(), "f1")  # not connected: handle_message is what paho's thread calls
    topic = fp.topic("f1", "cam-1", "state")
    assert client.handle_message(topic, b"not json") is None
    assert client.handle_message(topic, fp.encode(fp.envelope("state", "f1", "cam-2", 1, 1,
                                                              {"status": "online"}))) is None  # topic mismatch
    assert client.handle_message(fp.topic("f1", "cam-1", "ack"), b'{"schema": 1}') is None
    assert client.invalid == 3 and "cam-1" in client.last_invalid
    online = fp.envelope("state", "f1", "cam-1", 2, 5, {"status": "online", "model": NEW_MODEL, "active_slot": "b"})
    assert client.handle_message(topic, fp.encode(online)) is not None
    stale_will = fp.envelope("state", "f1", "cam-1", 1, 0, {"status": "offline"})
    assert client.handle_message(topic, fp.encode(stale_will)) is None
    dev = client.devices()["cam-1"]
    assert dev["status"] == "online" and dev["model"]["sha256"] == SHA and dev["active_slot"] == "b"
    will = fp.envelope("state", "f1", "cam-1", 2, 0, {"status": "offline"})
    client.handle_message(topic, fp.encode(will))
    assert client.devices()["cam-1"]["status"] == "offline"
    assert client.devices()["cam-1"]["model"]["sha256"] == SHA  # the last model known is kept
    assert [r.kind for r in client.poll()] == ["state", "state"]
    with pytest.raises(FleetConnectionError, match="not connected"):
        client.send("cam-1", "ping")


def test_fleet_client_connection_error_is_clear():
    from edgekit.fleet.broker import free_port

    client = FleetClient(BrokerSettings(port=free_port(), connect_timeout=2), "f1")
    with pytest.raises(FleetConnectionError, match="nothing listens at mqtt://127.0.0.1"):
        client.connect()


def test_fleet_client_against_mosquitto(mqtt_broker, key, keyring, tmp_path):
    settings = BrokerSettings(host=mqtt_broker.host, port=mqtt_broker.port, keepalive=10)
    cam1 = MqttDevice(mqtt_broker, "cam-1", keyring).start()
    cam2 = MqttDevice(mqtt_broker, "cam-2", keyring).start()
    cam2.go_offline()  # its session (and cmd subscription) stays with the broker
    client = FleetClient(settings, "f1").connect()
    try:
        known = client.discover(timeout=3.0)
        assert {d: e["status"] for d, e in known.items()} == {"cam-1": "online", "cam-2": "offline"}
        assert known["cam-1"]["model"]["sha256"] == OLD_MODEL["sha256"] and known["cam-1"]["active_slot"] == "a"
        assert known["cam-1"]["boot"] == 1 and known["cam-1"]["ts"] > 0
        assert select_devices(known, "cam-*,status=online", None) == ["cam-1"]
        args = {"url": f"http://127.0.0.1:1/bundles/{SHA}.ekb", "sha256": SHA, "size": 10, "allow_downgrade": False,
                "rollout": None}
        rid = client.send("cam-1", "install", args, sign_key=key, expires_s=600)
        ack = client.wait_ack(rid, 10)
        assert ack is not None and ack["ok"] and ack["result"]["slot"] == "b"
        wait_until(lambda: len(client.progress(rid)) >= len(STEPS), 5, "install progress events")
        assert [e["step"] for e in client.progress(rid)] == list(STEPS)
        # a command for the offline device is kept by the broker and delivered when it comes back
        expires = time.time() + 600
        rid2 = client.send("cam-2", "install", args, sign_key=key, expires_ts=expires)
        assert client.wait_ack(rid2, 0.5) is None
        cam2.start()
        ack2 = client.wait_ack(rid2, 10)
        assert ack2 is not None and ack2["ok"] and cam2.executed == [rid2]
        # the same request again (a resumed rollout): answered from the agent's cache, not run twice
        assert client.send("cam-2", "install", args, sign_key=key, request_id=rid2, expires_ts=expires) == rid2
        wait_until(lambda: cam2.received.count(rid2) >= 2, 5, "the repeated request delivered")
        assert cam2.received.count(rid2) == 2 and cam2.executed == [rid2]
        got: list[Received] = []

        def duplicate_acked() -> bool:
            got.extend(client.poll(0.2))
            return any(r.kind == "ack" and r.body.get("duplicate") for r in got)

        wait_until(duplicate_acked, 5, "the duplicate's ack")
        assert any(r.kind == "ack" and r.body.get("duplicate") and r.request_id == rid2 for r in got)
        assert client.wait_ack(rid2, 0)["ok"] and "duplicate" not in client.wait_ack(rid2, 0)  # the first answer
        # the device's retained state after its switch may trail its ack
        wait_until(lambda: client.devices()["cam-2"].get("active_slot") == "b", 5, "cam-2's state after its switch")
        assert client.devices()["cam-2"]["status"] == "online" and client.devices()["cam-2"]["active_slot"] == "b"
        with pytest.raises(SigningError):
            client.send("cam-1", "rollback", {"reason": None})
        # a signed command sent without an expiry gets the default one (1 day), inside its signature
        rid3 = client.send("cam-1", "rollback", {"reason": None, "from_sha256": SHA}, sign_key=key)
        ack3 = client.wait_ack(rid3, 10)
        assert ack3 is not None and ack3["ok"], ack3
        assert cam1.bodies[rid3]["expires_ts"] == pytest.approx(time.time() + 86400, abs=60)
        verify_command("f1", "cam-1", cam1.bodies[rid3], keyring)
        with pytest.raises(ConfigError, match="expires_s must be a positive number"):
            client.send("cam-1", "rollback", {"reason": None}, sign_key=key, expires_s=0)
        assert client.invalid == 0
    finally:
        client.close()
        cam1.stop()
        cam2.stop()
