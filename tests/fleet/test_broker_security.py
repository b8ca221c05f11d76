"""firmware/mosquitto: the ACL keeps each device to its own topics, passwords and TLS work, refusals are clear."""

from __future__ import annotations

import ssl
import threading

import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.errors import ExitCode
from edgekit.fleet.connection import BrokerSettings, FleetConnectionError, paho_reason_code, refusal_message
from edgekit.fleet.monitor import Monitor, MonitorOptions
from edgekit_runtime.contract import fleet_protocol as fp

pytestmark = pytest.mark.timeout(60)


def _tls(broker, device: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(broker.certs / "ca.crt"))
    if device:
        ctx.load_cert_chain(broker.certs / "devices" / f"{device}.crt", broker.certs / "devices" / f"{device}.key")
    return ctx


def _collector(helper, **login):
    """A monitor-side subscriber to edgekit/v1/# that records (topic, payload)."""
    got: list[tuple[str, bytes]] = []
    c = helper.client("collector", **login, connect=False)
    c.on_message = lambda cl, ud, m: got.append((m.topic, bytes(m.payload)))
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    c.on_connect = lambda cl, *a: cl.subscribe("edgekit/v1/#", qos=1)
    c.connect(helper.broker.host, helper.broker.port, keepalive=10)
    c.loop_start()
    helper_wait = helper.wait
    helper_wait(subscribed.is_set, what="collector subscribed")
    return got


def _publish_acks(client, pairs):
    """Publish (topic, payload) pairs at QoS 1; returns each PUBACK's reason code."""
    codes: dict[int, int] = {}
    done = threading.Event()
    client.on_publish = lambda cl, ud, mid, rc, props: (codes.__setitem__(mid, int(rc.value)),
                                                        len(codes) == len(pairs) and done.set())
    mids = [client.publish(t, p, qos=1).mid for t, p in pairs]
    assert done.wait(10), "PUBACKs did not come back"
    return [codes[m] for m in mids]


def test_a_device_publishes_only_under_its_own_topics(firmware_broker, fleet_tools, tmp_path):
    helper = fleet_tools.FleetHelper(firmware_broker, tmp_path)
    try:
        got = _collector(helper, username="edgekit-monitor", password="monitor-pw")
        dev_a = helper.client("dev-a", username="dev-a", password="a-pw")
        forged = fp.encode(fp.envelope("telemetry", "f1", "dev-b", 1, 1, {"window_s": 1, "inferences": 1}))
        own = fp.encode(fp.envelope("telemetry", "f1", "dev-a", 1, 1, {"window_s": 1, "inferences": 1}))
        codes = _publish_acks(dev_a, [("edgekit/v1/f1/dev-b/telemetry", forged),  # someone else's topic
                                      ("edgekit/v1/f1/dev-b/state", forged),
                                      ("edgekit/v1/f1/dev-a/cmd", own),  # commands come from the host only
                                      ("edgekit/v1/f1/dev-a/telemetry", own)])
        assert codes == [0x87, 0x87, 0x87, 0x00]  # not authorized, ..., success
        helper.wait(lambda: got, what="dev-a's own telemetry")
        # dev-a's publishes are ordered: the refused ones would have arrived before its own
        assert got == [("edgekit/v1/f1/dev-a/telemetry", own)]

        # dev-a may subscribe to dev-b's commands, but the broker never delivers them
        seen: list[str] = []
        dev_a.on_message = lambda cl, ud, m: seen.append(m.topic)
        sub = threading.Event()
        dev_a.on_subscribe = lambda *a: sub.set()
        dev_a.subscribe([("edgekit/v1/f1/dev-b/cmd", 1), ("edgekit/v1/f1/dev-a/cmd", 1)])
        helper.wait(sub.is_set, what="SUBACK")
        host = helper.client("host", username="edgekit-monitor", password="monitor-pw")
        for device in ("dev-b", "dev-a"):
            cmd = fp.envelope("cmd", "f1", device, 0, 1, {"request_id": "r1", "command": "ping"})
            assert _publish_acks(host, [(fp.topic("f1", device, "cmd"), fp.encode(cmd))]) == [0]
        helper.wait(lambda: seen, what="dev-a's own command")
        assert seen == ["edgekit/v1/f1/dev-a/cmd"]
    finally:
        helper.close()


def test_monitor_with_its_credentials_ingests_through_the_acl(firmware_broker, fleet_tools, tmp_path):
    helper = fleet_tools.FleetHelper(firmware_broker, tmp_path)
    helper.settings = BrokerSettings(host=firmware_broker.host, port=firmware_broker.port, keepalive=10,
                                     username="edgekit-monitor", password="monitor-pw")
    try:
        helper.start_monitor(workers=0)
        dev_b = helper.client("dev-b", username="dev-b", password="b-pw")
        for seq, kind, body in ((1, "state", {"status": "online"}), (2, "telemetry", {"window_s": 1, "inferences": 2})):
            dev_b.publish(fp.topic("f1", "dev-b", kind), fp.encode(fp.envelope(kind, "f1", "dev-b", 1, seq, body)),
                          qos=1, retain=kind == "state").wait_for_publish(10)
        helper.wait_device("dev-b", lambda d: d["status"] == "online" and d["seq"] == 2)
    finally:
        helper.close()


def test_wrong_credentials_are_refused_with_a_clear_error(firmware_broker, fleet_tools, tmp_path):
    settings = BrokerSettings(host=firmware_broker.host, port=firmware_broker.port, username="edgekit-monitor",
                              password="wrong")
    monitor = Monitor(settings, tmp_path / "f.db", MonitorOptions(fleet="f1"))
    with pytest.raises(FleetConnectionError) as err:
        monitor.start()
    text = str(err.value)
    assert "refused the connection: not authorized (0x87)" in text and "--password" in text
    # the CLI prints it without a traceback and exits DEVICE (the broker refused us)
    result = CliRunner().invoke(app, ["fleet", "monitor", "--broker", f"mqtt://127.0.0.1:{firmware_broker.port}",
                                      "--username", "edgekit-monitor", "--password", "wrong", "--db",
                                      str(tmp_path / "g.db"), "--duration", "1", "--no-dashboard"])
    assert result.exit_code == ExitCode.DEVICE, result.output
    assert "error:" in result.output and "not authorized (0x87)" in result.output
    assert "Traceback" not in result.output
    # a paho client (what devices and `fleet simulate` use) gets the same message from its reason code
    codes = []
    helper = fleet_tools.FleetHelper(firmware_broker, tmp_path)
    c = helper.client("dev-a", username="dev-a", password="nope", connect=False)
    got = threading.Event()
    c.on_connect = lambda cl, ud, flags, rc, props: (codes.append(rc), got.set())
    c.connect(firmware_broker.host, firmware_broker.port)
    c.loop_start()
    try:
        assert got.wait(10)
        assert codes[0].is_failure
        msg = refusal_message(settings.url, paho_reason_code(codes[0]))
        assert "not authorized (0x87)" in msg and "password" in msg
    finally:
        c.loop_stop()


def test_tls_with_the_example_ca(firmware_broker, fleet_tools, tmp_path):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    b = firmware_broker
    helper = fleet_tools.FleetHelper(b, tmp_path)
    # the monitor over mqtts, verifying the broker with the CA, authenticating with its own certificate
    helper.settings = BrokerSettings.from_url(f"mqtts://localhost:{b.tls_port}", cafile=b.certs / "ca.crt",
                                              certfile=b.certs / "devices" / "edgekit-monitor.crt",
                                              keyfile=b.certs / "devices" / "edgekit-monitor.key")
    try:
        helper.start_monitor(workers=0)
        # a device with its certificate (CN = dev-a = its MQTT user name), to 127.0.0.1 (the SAN's IP)
        dev = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-a", protocol=mqtt.MQTTv5)
        dev.tls_set_context(_tls(b, "dev-a"))
        dev.connect("127.0.0.1", b.tls_port)
        dev.loop_start()
        try:
            msg = fp.envelope("state", "f1", "dev-a", 1, 1, {"status": "online"})
            assert dev.publish(fp.topic("f1", "dev-a", "state"), fp.encode(msg), qos=1, retain=True) \
                .wait_for_publish(10) is None
            denied = fp.envelope("state", "f1", "dev-b", 1, 1, {"status": "online"})
            dev.publish(fp.topic("f1", "dev-b", "state"), fp.encode(denied), qos=1, retain=True).wait_for_publish(10)
            helper.wait_device("dev-a", lambda d: d["status"] == "online", what="dev-a online over TLS")
            assert helper.device("dev-b") is None
        finally:
            dev.loop_stop()
            dev.disconnect()
    finally:
        helper.close()
    # without the CA the broker's certificate is not trusted: a clear error, not a hang
    untrusted = BrokerSettings.from_url(f"mqtts://localhost:{b.tls_port}", certfile=b.certs / "devices" / "dev-a.crt",
                                        keyfile=b.certs / "devices" / "dev-a.key")
    with pytest.raises(FleetConnectionError, match="not trusted.*--cafile"):
        Monitor(untrusted, tmp_path / "h.db", MonitorOptions(fleet="f1")).start()
    # a client without a certificate is turned away by require_certificate
    no_cert = BrokerSettings.from_url(f"mqtts://localhost:{b.tls_port}", cafile=b.certs / "ca.crt")
    with pytest.raises(FleetConnectionError, match="requires client certificates.*--cert and --key"):
        Monitor(no_cert, tmp_path / "i.db", MonitorOptions(fleet="f1")).start()
