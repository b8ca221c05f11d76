"""What a rollout installs where, and how carefully: :class:`RolloutPlan` (strict, validated).

A plan names the fleet, the devices in rollout order, the bundle (URL, sha256,
size), the canary share or count, the waves (a first size that grows by
``wave_factor`` up to ``wave_max``), a cap on installs in flight, the abort rules
(a failure count ``max_failures`` and a failure percentage ``abort_percent`` once
``abort_min_devices`` have finished), the per-device timeout and the commands'
expiry.
:mod:`.rollout` runs it. Canaries are ``ceil(share * n)`` devices (at least 1)
for a share such as ``"10%"``, or exactly the count for ``"2"``; they are taken
from the devices online when the rollout starts (:meth:`RolloutPlan.phases`).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any, Iterable, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgekit_runtime.contract import fleet_protocol

from ..config import format_validation_error
from ..errors import ConfigError
from .commands import MAX_SIGNED_EXPIRY_S

_SHARE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_COUNT = re.compile(r"^\s*(\d+)\s*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def parse_share(text: str) -> Fraction:
    """``"10%"`` → ``Fraction(1, 10)``; a share must be above 0 % and at most 100 %."""
    m = _SHARE.match(text) if isinstance(text, str) else None
    if m is None:
        raise ConfigError(f"share {text!r} must be a percentage such as '10%' or '12.5%'")
    share = Fraction(m.group(1)) / 100
    if not 0 < share <= 1:
        raise ConfigError(f"share {text!r} must be above 0% and at most 100%")
    return share


def parse_canary(value: Union[str, int]) -> Union[Fraction, int]:
    """A canary share (``"10%"`` → Fraction) or count (``"2"``/``2`` → int, at least 1)."""
    if isinstance(value, bool):
        raise ConfigError(f"canary {value!r} must be a share ('10%') or a count ('2')")
    if isinstance(value, int):
        count = value
    elif isinstance(value, str) and _COUNT.match(value):
        count = int(value)
    elif isinstance(value, str) and "%" in value:
        return parse_share(value)
    else:
        raise ConfigError(f"canary {value!r} must be a share ('10%') or a count ('2')")
    if count < 1:
        raise ConfigError(f"canary {value!r}: at least one canary device is needed (a count >= 1 or a share > 0%)")
    return count


def canary_count(canary: Union[str, int], n_devices: int) -> int:
    """How many canaries ``canary`` means among ``n_devices``: ceil(share * n), at least 1; or the count."""
    value = parse_canary(canary)
    if isinstance(value, Fraction):
        return max(1, math.ceil(value * n_devices))
    if value > n_devices:
        raise ConfigError(f"canary {canary!r} asks for {value} canary devices, but only {n_devices} are selected")
    return value


class RolloutPlan(BaseModel):
    """What to install where, and how carefully. Strict: unknown keys and wrong types are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    fleet: str = Field(description="Fleet name (the MQTT topic tree edgekit/v1/<fleet>/...)")
    devices: list[str] = Field(min_length=1, description="Devices in rollout order")
    url: str = Field(description="Where devices download the bundle (http(s)://host:port/bundles/<sha256>.ekb)")
    sha256: str = Field(description="sha256 of the bundle file (64 lowercase hex)")
    size: int = Field(gt=0, description="Bundle size in bytes")
    bundle_name: str = Field(description="Bundle file name, for people")
    model: str = Field(description="Model name in the bundle")
    model_version: Optional[str] = Field(None, description="Model version in the bundle")
    release: Optional[int] = Field(None, ge=0, description="The bundle's release counter (anti-rollback)")
    allow_downgrade: bool = Field(False, description="Let devices install an older release than they run")
    canary: Union[str, int] = Field("10%", description="Canary share ('10%') or count ('2')")
    max_failures: Optional[int] = Field(0, ge=0, description="Halt when failed + timed-out devices exceed this "
                                                              "(None: no count rule)")
    abort_percent: Optional[float] = Field(None, gt=0, le=100, description="Halt when at least this percentage of "
                                           "the finished devices failed or timed out (None: no percentage rule)")
    abort_min_devices: int = Field(0, ge=0, description="The percentage rule applies once this many devices finished")
    wave_size: int = Field(0, ge=0, description="Devices in the first wave after the canaries (0: all the rest at "
                                                "once)")
    wave_factor: float = Field(1.0, ge=1, le=100, description="Each wave is this many times the one before "
                                                                "(rounded up); 1: all waves of wave_size")
    wave_max: int = Field(0, ge=0, description="No wave is larger than this (0: no cap)")
    max_in_flight: int = Field(0, ge=0, description="At most this many online devices install at once (0: no cap)")
    device_timeout_s: float = Field(600.0, gt=0, description="Seconds an online device has to answer")
    command_expiry_s: float = Field(86400.0, description="Signed commands expire this long after sending (seconds, "
                                                         "> 0); bounds how long queued installs stay valid")
    rollback_canaries_on_halt: bool = Field(True, description="On halt, roll back the devices this rollout switched")

    @field_validator("fleet")
    @classmethod
    def _fleet(cls, v: str) -> str:
        try:
            return fleet_protocol.check_name(v, "fleet")
        except fleet_protocol.ProtocolError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: list[str]) -> list[str]:
        seen = set()
        for name in v:
            try:
                fleet_protocol.check_name(name, "device")
            except fleet_protocol.ProtocolError as exc:
                raise ValueError(str(exc)) from None
            if name in seen:
                raise ValueError(f"device {name!r} is listed twice")
            seen.add(name)
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not _SHA256.match(v):
            raise ValueError("must be 64 lowercase hex characters")
        return v

    @field_validator("command_expiry_s", mode="before")
    @classmethod
    def _expiry(cls, v: Any) -> float:
        # before strict type checking: a clear word for None (allowed by older edgekits) and bad numbers
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"must be a positive number of seconds, not {v!r}: signed commands always expire "
                             "(devices refuse install/rollback without an expiry); the default is 86400 (1 day)")
        if v > MAX_SIGNED_EXPIRY_S:
            raise ValueError(f"{v:g} s is more than {MAX_SIGNED_EXPIRY_S:g} s ({MAX_SIGNED_EXPIRY_S / 86400:g} days): "
                             "devices refuse signed commands that expire later")
        return float(v)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+/\S*$", v):
            raise ValueError("must be an http:// or https:// URL the devices can reach")
        return v

    @field_validator("canary")
    @classmethod
    def _canary(cls, v: Union[str, int]) -> str:
        try:
            parse_canary(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return str(v).strip()

    @model_validator(mode="after")
    def _canary_fits(self) -> "RolloutPlan":
        try:
            canary_count(self.canary, len(self.devices))
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if not math.isfinite(self.wave_factor):
            raise ValueError("wave_factor must be a finite number >= 1")
        if self.wave_factor > 1 and self.wave_size == 0:
            raise ValueError("wave_factor grows the waves from wave_size (--wave-start): give a first wave size, "
                             "e.g. --wave-start 2 --wave-factor 2")
        if self.wave_max and self.wave_size > self.wave_max:
            raise ValueError(f"the first wave (wave_size {self.wave_size}) is larger than wave_max {self.wave_max}")
        if self.abort_percent is not None and not math.isfinite(self.abort_percent):
            raise ValueError("abort_percent must be a percentage above 0 and at most 100")
        return self

    @classmethod
    def parse(cls, data: Any, source: str = "rollout plan") -> "RolloutPlan":
        """Validate ``data``; a :class:`ConfigError` says which field is wrong (and suggests a key)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls, source)) from None

    def canary_count(self) -> int:
        return canary_count(self.canary, len(self.devices))

    def phases(self, online: Iterable[str] = ()) -> list[list[str]]:
        """``[canaries, wave 1, wave 2, ...]``: canaries online first (in plan order), then the rest in waves."""
        online = set(online)
        k = self.canary_count()
        first = [d for d in self.devices if d in online] + [d for d in self.devices if d not in online]
        canaries = set(first[:k])
        rest = [d for d in self.devices if d not in canaries]
        return [[d for d in self.devices if d in canaries]] + [rest[i:j] for i, j in self._wave_bounds(len(rest))]

    def wave_sizes(self, n_rest: int) -> list[int]:
        """The sizes of the waves that follow the canaries, for ``n_rest`` devices."""
        return [j - i for i, j in self._wave_bounds(n_rest)]

    def _wave_bounds(self, n_rest: int) -> list[tuple[int, int]]:
        size = self.wave_size or n_rest or 1
        out, i = [], 0
        while i < n_rest:
            out.append((i, min(n_rest, i + size)))
            i += size
            size = math.ceil(size * self.wave_factor)
            if self.wave_max:
                size = min(size, self.wave_max)
        return out

    def install_args(self, rollout_id: Optional[str]) -> dict[str, Any]:
        return {"url": self.url, "sha256": self.sha256, "size": self.size, "allow_downgrade": self.allow_downgrade,
                "rollout": rollout_id}

    def rollback_args(self, reason: Optional[str]) -> dict[str, Any]:
        """A rollback that undoes only this plan's bundle: the device rolls back only while it runs ``sha256``."""
        return {"reason": reason, "from_sha256": self.sha256}
