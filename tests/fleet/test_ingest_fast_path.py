"""The ingest's one-pass telemetry check never accepts what the contract refuses, and reads the same figures.

`ingest.fast_telemetry` stands in for `fleet_protocol.validate` + `check_telemetry` + `telemetry_figures`
on the hot path; here every field of real agent telemetry (and of bodies with every optional section) is
replaced by hostile values, one and two at a time, and the fast answer is compared with the contract's.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from typing import Any, Iterator

import pytest

from edgekit.fleet.ingest import Ingestor, fast_telemetry, telemetry_figures
from edgekit.fleet.loadgen import agent_bodies
from edgekit_runtime.contract import fleet_protocol as fp

HOSTILE: list[Any] = [
    None, True, False, 0, 1, -1, 50, 50.0, 0.5, -0.0, -0.5, 2**31, 2**53 - 1, 2**53, 2**63, 2**64, -(2**63),
    1e12, 1e12 + 1, 10**12, 10**12 + 1, 86400e3, 86400e3 + 1, 409600.0, 409601, 1e6, 1e6 + 1, 1000.0, 1001,
    -273.15, -273.16, -274, float(2**33), float(2**33) + 1, 30 * 86400.0, 30 * 86400.0 + 1, 1e308, -1e308,
    float("inf"), float("-inf"), float("nan"), "", "x", "5", [], [1], {}, {"a": 1}, {"a": None}, {"a": -1},
    {"a": 1.5}, {"a": 2**62, "b": 2**62}, {"psi": 0.3}, {"psi": -1}, {"psi": "x"}, {"x": {"psi": 0.5}},
    {"cpu": 40.0, "gpu": 55}, {"cpu": 1e308},
]


def _base_messages() -> list[dict[str, Any]]:
    bodies = [json.loads(b) for b in agent_bodies(2)]
    full = {"window_s": 10.0, "inferences": 50, "calls": 52, "errors": {"E301": 1, "E302": 1},
            "errors_by_code": {"E301": 1}, "latency_ms": {"count": 50, "p50": 4.0, "p99": 9, "sketch": {"b": [1]}},
            "system": {"cpu_percent": 37.5, "temperature_c": {"cpu": 51.0, "gpu": 48}},
            "drift": {"psi": 0.05, "inputs": {"image": {"psi": 0.12}, "aux": {"psi": 0.3}, "raw": "n/a"}}}
    flat = {"window_s": 1, "inferences": 0, "errors": 3, "latency_ms": None, "system": {"temperature_c": 40},
            "drift": {"psi": 0.2}}
    out = []
    for seq, body in enumerate(bodies + [full, flat], start=2):
        out.append({"schema": 1, "kind": "telemetry", "fleet": "f1", "device": "d1", "boot": 3, "seq": seq,
                    "ts": time.time(), "historical": False, "body": body})
    return out


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every key path of nested dicts (the sketch's buckets excluded: the contract does not read them)."""
    if isinstance(value, dict) and prefix[-1:] != ("buckets",):
        for k, v in value.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))


def _set(msg: dict, path: tuple, value: Any) -> dict:
    out = copy.deepcopy(msg)
    node = out
    for k in path[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


_DELETE = object()


def _contract(msg: Any) -> bool:
    try:
        fp.validate(msg)
        if msg["kind"] == "telemetry":
            fp.check_telemetry(msg["body"])
    except fp.ProtocolError:
        return False
    return msg["fleet"] == "f1" and msg["device"] == "d1" and msg["kind"] == "telemetry"


def _same(a: tuple, b: tuple) -> bool:
    return all((x is None and y is None) or (x == y and type(x) is type(y)) or
               (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
               for x, y in zip(a, b, strict=True))


def _check(msg: Any) -> bool:
    fast = fast_telemetry(msg, "f1", "d1")
    if fast is None:
        return False
    assert _contract(msg), f"fast path accepted what the contract refuses: {json.dumps(msg)[:400]}"
    figures = telemetry_figures(msg["body"])
    assert _same(fast, figures), (fast, figures)
    return True


def test_agent_telemetry_takes_the_fast_path_with_the_contracts_figures():
    for msg in _base_messages():
        assert _check(msg)


@pytest.mark.parametrize("base", range(4))
def test_no_single_hostile_field_passes_the_fast_path_that_the_contract_refuses(base):
    msg = _base_messages()[base]
    paths = list(_paths(msg))
    accepted = refused = 0
    for path in paths:
        for value in HOSTILE + [_DELETE]:
            if _check(_set(msg, path, value)):
                accepted += 1
            else:
                refused += 1
    assert accepted and refused  # (both sides were exercised)


def test_no_pair_of_hostile_fields_passes_the_fast_path_that_the_contract_refuses():
    rng = random.Random(17)
    messages = _base_messages()
    for _ in range(6000):
        msg = rng.choice(messages)
        for _ in range(2):
            paths = list(_paths(msg))
            msg = _set(msg, rng.choice(paths), rng.choice(HOSTILE + [_DELETE]))
        _check(msg)


def test_other_topics_envelopes_and_kinds_leave_the_fast_path():
    msg = _base_messages()[0]
    assert fast_telemetry(msg, "f1", "d2") is None  # (the contract refuses it as topic_mismatch)
    assert fast_telemetry(msg, "f2", "d1") is None
    assert fast_telemetry({**msg, "kind": "event"}, "f1", "d1") is None
    assert fast_telemetry({**msg, "schema": 0}, "f1", "d1") is None  # valid, but the contract decides
    assert fast_telemetry([msg], "f1", "d1") is None


def test_the_ingestor_stores_the_same_row_either_way():
    """The fast path's row equals the one the contract's path builds (the slow path is forced by schema 0)."""
    now = time.time()
    for msg in _base_messages():
        fast, slow = Ingestor(fleet="f1"), Ingestor(fleet="f1")
        assert fast.add("edgekit/v1/f1/d1/telemetry", json.dumps(msg).encode(), False, now)
        assert slow.add("edgekit/v1/f1/d1/telemetry", json.dumps({**msg, "schema": 0}).encode(), False, now)
        (a,), (b,) = fast.rows, slow.rows
        assert _same(a[:-1], b[:-1])
