"""Jetson board helpers: power mode, clocks and ``tegrastats`` for honest benchmarks.

A Jetson's latency depends on its nvpmodel power mode and on DVFS: a benchmark
that does not pin them measures the governor as much as the model. The
benchmark records the power mode and whether clocks were locked, and samples
``tegrastats`` (RAM, CPU/GPU load and frequency, temperatures, power rails)
while it runs. Everything here is a no-op that says so on a machine that is not
a Jetson. ``firmware/jetson-bench.sh`` wraps the same tools for shell use.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any

_RAM = re.compile(r"RAM (\d+)/(\d+)MB")
_CPU = re.compile(r"CPU \[([^\]]*)\]")
_GPU = re.compile(r"GR3D_FREQ (\d+)%(?:@\[?(\d+)\]?)?")
_TEMP = re.compile(r"\b([A-Za-z_]+[0-9]*)@(-?[\d.]+)C\b")
_RAIL = re.compile(r"\b(VDD_[A-Z0-9_]+|POM_[A-Z0-9_]+) (\d+)mW/(\d+)mW")


def is_jetson() -> bool:
    return shutil.which("tegrastats") is not None and shutil.which("nvpmodel") is not None


def parse_tegrastats(line: str) -> dict[str, Any]:
    """One ``tegrastats`` line → numbers (missing fields are left out)."""
    out: dict[str, Any] = {}
    if m := _RAM.search(line):
        out["ram_used_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _CPU.search(line):
        loads, freqs = [], []
        for core in m.group(1).split(","):
            core = core.strip()
            if core == "off" or "%" not in core:
                continue
            load, _, freq = core.partition("%@")
            loads.append(int(load))
            if freq:
                freqs.append(int(freq))
        out["cpu_load_pct"] = loads
        if freqs:
            out["cpu_freq_mhz"] = freqs
    if m := _GPU.search(line):
        out["gpu_load_pct"] = int(m.group(1))
        if m.group(2):
            out["gpu_freq_mhz"] = int(m.group(2))
    temps = {name.lower(): float(value) for name, value in _TEMP.findall(line)}
    if temps:
        out["temperature_c"] = temps
    rails = {name: int(now) for name, now, _avg in _RAIL.findall(line)}
    if rails:
        out["power_mw"] = rails
    return out


def _run(args: list[str]) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout


def power_mode() -> dict[str, Any] | None:
    """``nvpmodel -q`` → ``{"name": "15W", "id": 0}``; None where nvpmodel is absent."""
    if not shutil.which("nvpmodel"):
        return None
    text = _run(["nvpmodel", "-q"])
    name = re.search(r"NV Power Mode:\s*(\S+)", text)
    ident = re.search(r"^\s*(\d+)\s*$", text, re.MULTILINE)
    return {"name": name.group(1) if name else None, "id": int(ident.group(1)) if ident else None}


def set_power_mode(mode: int) -> None:
    """Switch nvpmodel mode (needs root). Some mode changes need a reboot; nvpmodel says so."""
    _run(["nvpmodel", "-m", str(int(mode))])


def lock_clocks(store: str = "/tmp/edgekit-jetson-clocks.conf") -> None:
    """``jetson_clocks`` pins CPU/GPU/EMC at their maximum for the mode; the old state is stored."""
    _run(["jetson_clocks", "--store", store])
    _run(["jetson_clocks"])


def restore_clocks(store: str = "/tmp/edgekit-jetson-clocks.conf") -> None:
    _run(["jetson_clocks", "--restore", store])


@dataclass
class TegraStats:
    """Samples ``tegrastats`` in the background while a benchmark runs."""

    interval_ms: int = 500
    samples: list[dict[str, Any]] = field(default_factory=list)

    def __enter__(self) -> "TegraStats":
        self._proc = subprocess.Popen(["tegrastats", "--interval", str(self.interval_ms)],
                                      stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            self.samples.append(parse_tegrastats(line))

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=5)
        self._thread.join(timeout=5)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"samples": 0}
        out: dict[str, Any] = {"samples": len(self.samples)}
        gpu = [s["gpu_load_pct"] for s in self.samples if "gpu_load_pct" in s]
        if gpu:
            out["gpu_load_pct_mean"] = sum(gpu) / len(gpu)
        temps = [max(s["temperature_c"].values()) for s in self.samples if s.get("temperature_c")]
        if temps:
            out["max_temperature_c"] = max(temps)
        power = [sum(s["power_mw"].values()) for s in self.samples if s.get("power_mw")]
        if power:
            out["power_mw_mean"] = sum(power) / len(power)
        return out


def describe() -> dict[str, Any] | None:
    """What a benchmark result records about the board, or None off a Jetson."""
    if not is_jetson():
        return None
    from .engines.tensorrt_engine import jetpack_version, l4t_release

    return {"power_mode": power_mode(), "l4t": l4t_release(), "jetpack": jetpack_version()}
