"""The ingest's reader (`PacketReader.feed_split`): the same publishes as `feed` + `parse_publish`, whatever the
chunking, and a PUBLISH whose fields overrun its packet is a WireError, not a crash."""

from __future__ import annotations

import random

import pytest

from edgekit.fleet import wire


def _stream(big: bool) -> tuple[bytes, list[tuple]]:
    sizes = (0, 5, 127, 128, 16383, 16384, 70000) if big else (0, 5, 120, 127, 128, 130, 200)
    packets, expected = [], []
    for n, (qos, retain) in enumerate([(1, False), (0, False), (1, True), (1, False), (0, True)] * 6):
        topic = f"edgekit/v1/f/dev{n}/telemetry"
        payload = random.Random(n).randbytes(sizes[n % 7])
        pid = n + 1 if qos else 0
        packets.append(wire.publish_packet(topic, payload, qos, pid, retain))
        expected.append((topic, pid, payload, int(retain)))
        if n % 4 == 0:
            packets.append(wire.PINGREQ_PACKET)
    # a PUBLISH with a multi-byte property length (user properties), as a broker may forward
    props = b"".join(b"\x26" + wire._str(f"k{i}") + wire._str("v" * 20) for i in range(8))
    body = wire._str("edgekit/v1/f/p/telemetry") + b"\x00\x07" + wire.varint(len(props)) + props + b"{}"
    packets.append(wire._packet(0x32, body))
    expected.append(("edgekit/v1/f/p/telemetry", 7, b"{}", 0))
    return b"".join(packets), expected


@pytest.mark.parametrize("chunk,big", [(1, False), (2, False), (3, False), (7, False), (100, True), (1500, True),
                                       (65536, True), (1 << 20, True)])
def test_split_reading_gives_every_publish_whatever_the_chunks(chunk, big):
    stream, expected = _stream(big)
    reader = wire.PacketReader()
    pubs, others = [], []
    for i in range(0, len(stream), chunk):
        p, o = reader.feed_split(stream[i:i + chunk])
        pubs += p
        others += o
    assert pubs == expected
    assert [o[0] for o in others] == [wire.PINGREQ] * 8
    assert reader.buf == b""
    old = [wire.parse_publish(f, b) for t, f, b in wire.PacketReader().feed(stream) if t == wire.PUBLISH]
    assert [(t, p, pl, int(r)) for t, p, pl, r in old] == expected


def test_a_publish_whose_fields_overrun_the_packet_is_a_wire_error():
    bad = bytes((0x32, 3)) + b"\x00\x10ab"  # topic length 16 in a 3-byte body
    with pytest.raises(wire.WireError, match="malformed PUBLISH"):
        wire.PacketReader().feed_split(bad + wire.PINGREQ_PACKET * 10)
    with pytest.raises(wire.WireError, match="malformed packet length"):
        wire.PacketReader().feed_split(b"\x30\xff\xff\xff\xff\x01")


def test_the_load_generator_counts_whole_success_pubacks_without_parsing():
    from edgekit.fleet.loadgen import _pubacks

    four = b"".join(wire.puback_packet(p) for p in (1, 0x4002, 7))
    five = b"".join(b"\x40\x03" + p.to_bytes(2, "big") + b"\x10" for p in (1, 0x4003, 0x4002, 9))
    assert _pubacks(four) == 3 and _pubacks(five) == 4
    assert _pubacks(four[:-1]) == 0  # a partial packet: parsed the slow way
    assert _pubacks(four + five) == 0  # mixed forms: parsed
    assert _pubacks(b"\x40\x03\x00\x01\x80" * 4) == 0  # a failure reason: counted as refused by the parser
    assert _pubacks(wire.PINGREQ_PACKET * 2) == 0
