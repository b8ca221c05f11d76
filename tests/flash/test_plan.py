"""Rollout plans (:mod:`edgekit.flash.plan`): canary shares and counts, strict validation, phases."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from edgekit.errors import ConfigError
from edgekit.flash.plan import RolloutPlan, canary_count, parse_canary, parse_share
from tests.flash.fleet_doubles import make_plan, names


# ----------------------------------------------------------------------------- shares and canaries
def test_parse_share():
    assert parse_share("10%") == Fraction(1, 10)
    assert parse_share(" 12.5 % ") == Fraction(1, 8)
    assert parse_share("100%") == 1
    for bad in ("0%", "0.0%", "101%", "-5%", "10", "abc", "", "ten%", "10%%"):
        with pytest.raises(ConfigError):
            parse_share(bad)


def test_canary_counts():
    assert canary_count("10%", 10) == 1
    assert canary_count("25%", 10) == 3  # ceil(2.5)
    assert canary_count("30%", 10) == 3  # exact arithmetic: 0.3 * 10 is not 3.0000000000000004 → 4
    assert canary_count("1%", 3) == 1  # at least one
    assert canary_count("100%", 7) == 7
    assert canary_count("2", 10) == 2
    assert canary_count(2, 10) == 2
    assert parse_canary("10%") == Fraction(1, 10) and parse_canary("3") == 3
    for bad in ("0%", "0", "bad", "", "-1", "2.5", True):
        with pytest.raises(ConfigError):
            canary_count(bad, 10)
    with pytest.raises(ConfigError, match="only 3 are selected"):
        canary_count("5", 3)


def test_plan_is_strict_and_checked():
    plan = make_plan(names(10), canary="20%", wave_size=3)
    assert plan.canary_count() == 2
    with pytest.raises(ConfigError, match="did you mean 'max_failures'"):
        make_plan(names(3), max_failure=1)
    with pytest.raises(ConfigError, match="device_timeout_s"):
        make_plan(names(3), device_timeout_s="30")  # strict: no str → float coercion
    with pytest.raises(ConfigError, match="canary"):
        make_plan(names(3), canary="0%")
    with pytest.raises(ConfigError, match="only 3 are selected"):
        make_plan(names(3), canary="4")
    with pytest.raises(ConfigError, match="sha256"):
        make_plan(names(3), sha256="XYZ")
    with pytest.raises(ConfigError, match="twice"):
        make_plan(["cam-1", "cam-1"])
    with pytest.raises(ConfigError, match="max_failures"):
        make_plan(names(3), max_failures=-1)
    assert make_plan(names(3), canary=2).canary == "2"
    # the record holds the plan as JSON: it must come back equal
    assert RolloutPlan.parse(json.loads(json.dumps(plan.model_dump(mode="json")))) == plan


def test_phases_take_online_canaries_first():
    plan = make_plan(names(10), canary="20%", wave_size=3)
    online = [d for d in names(10) if d != "cam-1"]
    phases = plan.phases(online)
    assert phases[0] == ["cam-2", "cam-3"]
    assert phases[1:] == [["cam-1", "cam-4", "cam-5"], ["cam-6", "cam-7", "cam-8"], ["cam-9", "cam-10"]]
    assert make_plan(names(4), canary="1").phases(names(4)) == [["cam-1"], ["cam-2", "cam-3", "cam-4"]]
    assert make_plan(names(1), canary="1").phases(names(1)) == [["cam-1"]]
