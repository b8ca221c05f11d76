"""The agent against a real Mosquitto: online state, telemetry, commands, outages, TLS."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from edgekit_runtime.agent import AgentState


def test_comes_online_with_retained_state_and_sends_telemetry(agent_env, broker, subscriber):
    sub = subscriber()
    path = agent_env.config_file()
    agent_env.install(path)
    agent = agent_env.start_agent(agent_env.config())
    sub.wait(lambda s: s.of("state"), what="state published")
    state = agent_env.fresh_state(broker, "edgekit/v1/f1/dev1/state")  # a brand-new subscriber, retained
    assert state["retain"] and state["body"]["status"] == "online" and state["boot"] == 1 and state["seq"] >= 1
    body = state["body"]
    assert body["model"]["name"] == "golden-matmul" and body["model"]["version"] == "1.0.0"
    assert body["backend"] == "onnxruntime" and body["runtime_version"] and body["agent_state"] == "online"

    for _ in range(5):
        agent.core.record_inference(0.004)
    sub.wait(lambda s: [t for t in s.of("telemetry") if t["body"]["inferences"]], what="telemetry with inferences")
    tel = [t for t in sub.of("telemetry") if t["body"]["inferences"]][0]
    assert tel["body"]["inferences"] == 5 and tel["body"]["latency_ms"]["p50"] == pytest.approx(4, rel=0.011)
    assert tel["historical"] is False and tel["boot"] == 1
    sysinfo = tel["body"]["system"]
    assert sysinfo["mem_total_mb"] > 0 and "temperature_c" in sysinfo
    loaded = sub.wait(lambda s: s.events("model_loaded"), what="model_loaded event")[0]
    assert loaded["body"]["model"]["name"] == "golden-matmul" and loaded["body"]["health"]["ok"]
    assert agent.core.state == AgentState.ONLINE
    assert sub.invalid == []

    agent_env.stop_agent(agent)
    offline = agent_env.fresh_state(broker, "edgekit/v1/f1/dev1/state")
    assert offline["body"]["status"] == "offline" and offline["body"]["reason"] == "stopped"
    assert offline["boot"] == 1 and offline["seq"] > state["seq"]


def test_commands_ping_config_bench_and_malformed(agent_env, broker, subscriber):
    sub = subscriber()
    agent_env.install(agent_env.config_file())
    agent = agent_env.start_agent(agent_env.config())
    agent_env.wait_until(lambda: agent.link.subscribed, what="cmd subscription")
    rid_bench = sub.publish_cmd("f1", "dev1", "bench", args={"queries": 20, "seconds": 0.05, "warmup": 2})
    rid_ping = sub.publish_cmd("f1", "dev1", "ping")
    rid_cfg = sub.publish_cmd("f1", "dev1", "config", args={"set": {"drift_psi_threshold": 0.3}})
    sub.publish_raw("edgekit/v1/f1/dev1/cmd", b"\x00garbage{")
    rid_unknown = sub.publish_cmd("f1", "dev1", "selfdestruct")
    for rid in (rid_ping, rid_cfg, rid_unknown, rid_bench):
        sub.wait(lambda s, rid=rid: s.ack(rid), timeout=20, what=f"ack {rid}")
    ping = sub.ack(rid_ping)["body"]
    assert ping["ok"] and ping["result"]["model"]["name"] == "golden-matmul"
    cfg = sub.ack(rid_cfg)["body"]
    assert cfg["ok"] and cfg["result"]["config"]["drift_psi_threshold"] == 0.3
    assert "password" not in json.dumps(cfg["result"]["config"]).replace("password_file", "")
    unknown = sub.ack(rid_unknown)["body"]
    assert not unknown["ok"] and unknown["error"]["reason"] == "unknown_command"
    bench = sub.ack(rid_bench)["body"]
    assert bench["ok"], bench
    assert bench["result"]["single_stream"]["inference"]["count"] >= 20 and bench["result"]["system"]["model"]
    garbage = sub.wait(lambda s: [a for a in s.of("ack") if a["body"]["request_id"] is None], what="error ack")[0]
    assert garbage["body"]["ok"] is False and garbage["body"]["error"]["reason"] == "malformed"
    # the agent is still up and answering
    rid = sub.publish_cmd("f1", "dev1", "ping")
    assert sub.wait(lambda s: s.ack(rid), what="ping after garbage")["body"]["ok"]


def _by_boot_seq(messages):
    out = {}
    for m in messages:
        out.setdefault((m["boot"], m["seq"]), m)
    return out


def test_broker_outage_loses_nothing_and_replays_in_order(agent_env, broker, subscriber):
    sub = subscriber(client_id="outage-watcher")  # persistent session: survives the broker restart
    agent = agent_env.start_agent(agent_env.config(telemetry_interval_s=0.1), load_model=False)
    agent_env.wait_until(lambda: agent.link.connected, what="agent connected")
    sub.wait(lambda s: len(s.of("telemetry")) >= 3, what="live telemetry")

    broker.stop()
    agent_env.wait_until(lambda: agent.core.state == AgentState.OFFLINE_SPOOLING, what="offline_spooling")
    for _ in range(10):
        agent.core.record_inference(0.002)
    agent_env.wait_until(lambda: len(agent.core.spool) >= 20, what="telemetry piling up in the spool")
    spooled_seqs = {r.seq for r in agent.core.spool.next_unsent(10_000)}
    broker.start()

    agent_env.wait_until(lambda: agent.core.state == AgentState.DEGRADED, what="reconnected")  # no model: degraded
    sub.wait(lambda s: spooled_seqs <= {m["seq"] for m in s.of("telemetry") + s.of("event")}, timeout=15,
             what="every spooled message")
    top = agent.core.seq
    agent_env.wait_until(lambda: len(agent.core.spool) == 0 and not agent.link.pending, what="empty spool")
    agent_env.stop_agent(agent)
    assert len(agent.core.spool) == 0

    msgs = [m for m in sub.of("telemetry") + sub.of("event") + sub.of("ack") + sub.of("state") if m["seq"] > 0]
    unique = _by_boot_seq(msgs)
    assert {b for b, _ in unique} == {1}
    seqs = sorted(s for _, s in unique)
    assert seqs[: top] == list(range(1, top + 1)), "a message went missing"
    # arrival order of the spooled kinds follows seq (first copies; later copies are duplicates)
    firsts, seen = [], set()
    for _, env, _ in sub.messages:
        if env["kind"] in ("telemetry", "event") and (env["boot"], env["seq"]) not in seen:
            seen.add((env["boot"], env["seq"]))
            firsts.append(env["seq"])
    assert firsts == sorted(firsts)
    replayed = [m for m in sub.of("telemetry") if m["seq"] in spooled_seqs]
    assert replayed and all(m["historical"] for m in replayed)
    assert sum(m["body"]["inferences"] for m in _by_boot_seq(sub.of("telemetry")).values()) == 10
    (rec,) = sub.events("reconnected")
    assert rec["body"]["offline_s"] > 0 and rec["historical"] is False
    made_offline = [m for m in sub.of("telemetry") if max(spooled_seqs) < m["seq"] < rec["seq"]]
    assert all(m["historical"] for m in made_offline)
    live_after = [m for m in sub.of("telemetry") if m["seq"] > rec["seq"]]
    assert live_after and not any(m["historical"] for m in live_after)


def test_spool_overflow_during_an_outage_is_reported(agent_env, broker, subscriber):
    sub = subscriber(client_id="overflow-watcher")
    agent = agent_env.start_agent(agent_env.config(telemetry_interval_s=0.05, spool_max_bytes=6000),
                                  load_model=False)
    agent_env.wait_until(lambda: agent.link.connected, what="agent connected")
    broker.stop()
    agent_env.wait_until(lambda: agent.core.spool.counters["dropped_oldest"] >= 3, what="drops")
    broker.start()
    # drop_oldest may drop older spool_drop events too; the newest one carries the total
    drop = sub.wait(lambda s: [e for e in s.events("spool_drop") if e["body"]["dropped_oldest_total"] >= 3],
                    timeout=15, what="spool_drop event")[0]["body"]
    assert drop["policy"] == "drop_oldest" and drop["max_bytes"] == 6000
    tel = sub.wait(lambda s: [t for t in s.of("telemetry") if t["body"]["spool"]["dropped_oldest_total"] >= 3],
                   what="telemetry reporting the drops")[0]
    assert tel["body"]["spool"]["max_bytes"] == 6000


def test_command_sent_while_the_device_is_away_arrives_when_it_returns(agent_env, broker, subscriber):
    sub = subscriber()
    cfg_path = agent_env.config_file()
    first = agent_env.start_agent(agent_env.config(), load_model=False)
    agent_env.wait_until(lambda: first.link.subscribed, what="the session's cmd subscription")
    agent_env.stop_agent(first)
    rid = sub.publish_cmd("f1", "dev1", "ping")
    second = agent_env.start_agent(agent_env.config(), load_model=False)
    ack = sub.wait(lambda s: s.ack(rid), what="ack of the queued command")
    assert ack["body"]["ok"] and ack["boot"] == second.core.boot == 2
    assert cfg_path.exists()


def test_mqtt_311_for_brokers_without_v5(agent_env, broker, subscriber):
    sub = subscriber()
    agent = agent_env.start_agent(agent_env.config(mqtt_version="3.1.1"), load_model=False)
    agent_env.wait_until(lambda: agent.link.subscribed, what="cmd subscription")
    rid = sub.publish_cmd("f1", "dev1", "ping")
    assert sub.wait(lambda s: s.ack(rid), what="ack over MQTT 3.1.1")["body"]["ok"]
    agent.core.record_inference(0.003)
    sub.wait(lambda s: [t for t in s.of("telemetry") if t["body"]["inferences"] == 1], what="telemetry over 3.1.1")
    assert sub.of("state")[0]["body"]["status"] == "online"


# -- TLS and per-device credentials ---------------------------------------------------------
def _pki(root):
    """A CA, a server certificate for 127.0.0.1 and a client certificate (cryptography, no openssl CLI)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(key, cert, stem):
        (root / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.TraditionalOpenSSL,
                                                             serialization.NoEncryption()))
        (root / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("edgekit test CA")).issuer_name(name("edgekit test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    write(ca_key, ca, "ca")
    for stem, cn, san in (("server", "127.0.0.1", True), ("client", "dev1", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        write(key, b.sign(ca_key, hashes.SHA256()), stem)


def test_tls_with_client_certificate_and_password(agent_env, tmp_path):
    pki = tmp_path / "pki"
    pki.mkdir()
    _pki(pki)
    passwd = pki / "passwd"
    passwd.write_text("dev1:s3cret\n")
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True, capture_output=True)
    (pki / "dev1.password").write_text("s3cret\n")
    (pki / "wrong.password").write_text("nope\n")
    extra = (f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\nkeyfile {pki / 'server.key'}\n"
             f"require_certificate true\npassword_file {passwd}\nallow_anonymous false\n")
    tls_broker = agent_env.Broker(tmp_path / "tls-broker", extra=extra, tls=True).start()
    try:
        common = dict(broker_url=tls_broker.url, username="dev1", ca_file=str(pki / "ca.pem"),
                      cert_file=str(pki / "client.pem"), key_file=str(pki / "client.key"))
        good = agent_env.start_agent(agent_env.config("dev1", password_file=str(pki / "dev1.password"), **common),
                                     load_model=False)
        bad = agent_env.start_agent(agent_env.config("dev2", password_file=str(pki / "wrong.password"), **common),
                                    load_model=False)
        agent_env.wait_until(lambda: good.link.connected, what="TLS connection with a client certificate")
        agent_env.wait_until(lambda: bad.link.last_reason, what="the refused connection's reason")
        assert not bad.link.connected and bad.core.state == AgentState.CONNECTING
        assert "password" in bad.link.last_reason.lower() or "authori" in bad.link.last_reason.lower()
        good.core.record_inference(0.001)
        agent_env.wait_until(lambda: len(good.core.spool) == 0 and good.core.seq >= 2, what="telemetry sent over TLS")
    finally:
        for a in list(agent_env.agents):
            agent_env.stop_agent(a)
        tls_broker.stop()


def test_drift_alarm_reaches_the_fleet(agent_env, broker, subscriber):
    sub = subscriber()
    path = agent_env.config_file(drift_min_values=1000)
    agent_env.install(path, agent_env.stats_bundle())
    agent = agent_env.start_agent(agent_env.config(drift_min_values=1000))
    agent_env.wait_until(lambda: agent.link.connected, what="agent connected")
    rng = np.random.default_rng(0)
    for _ in range(300):
        agent.core.predict(rng.normal(0, 1, size=(1, 4)).astype(np.float32))
    sub.wait(lambda s: [t for t in s.of("telemetry") if t["body"]["drift"]["inputs"]["x"].get("judged")],
             what="a judged drift window")
    assert not sub.events("drift_alarm")
    for _ in range(300):
        agent.core.predict(rng.normal(1.0, 1, size=(1, 4)).astype(np.float32))
    alarm = sub.wait(lambda s: s.events("drift_alarm"), what="drift_alarm event")[0]["body"]
    assert alarm["input"] == "x" and alarm["psi"] > 0.2 and alarm["psi_threshold"] == 0.2


def test_broker_refusals_are_counted_not_retried_forever(agent_env, tmp_path):
    """A broker ACL that denies the device its telemetry topic: PUBACK "not authorized" (0x87).

    (Mosquitto grants a SUBSCRIBE its ACL denies and then delivers nothing, so the
    agent's CMD_SUBSCRIBE_REFUSED event is for brokers that refuse in the SUBACK.)
    """
    acl = tmp_path / "acl"
    acl.write_text("topic write edgekit/v1/f1/dev1/state\ntopic write edgekit/v1/f1/dev1/event\n"
                   "topic write edgekit/v1/f1/dev1/ack\n\nuser monitor\ntopic read edgekit/v1/#\n")
    acl_broker = agent_env.Broker(tmp_path / "acl-broker", extra=f"acl_file {acl}\n").start()
    try:
        agent = agent_env.start_agent(agent_env.config(broker_url=acl_broker.url, telemetry_interval_s=0.1),
                                      load_model=False)
        agent_env.wait_until(lambda: agent.core.spool.counters["broker_rejected"] >= 2, what="rejected telemetry")
        agent_env.wait_until(lambda: len(agent.core.spool) <= 2, what="the spool does not jam")
        agent_env.wait_until(lambda: agent.core.spool.counters["accepted"] > 10 and len(agent.core.spool) <= 2,
                             what="messages keep flowing past the rejected ones")
        agent_env.stop_agent(agent)
        assert agent.core.spool.counters["broker_rejected"] >= 2
    finally:
        acl_broker.stop()
