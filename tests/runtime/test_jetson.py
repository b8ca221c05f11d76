"""Jetson helpers that can be checked anywhere: tegrastats parsing and the no-Jetson path."""

from __future__ import annotations

import pytest

from edgekit_runtime import jetson

ORIN = ("11-24-2026 10:00:00 RAM 2647/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
        "CPU [2%@1510,1%@1510,0%@1510,0%@1510,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 37%@[611] "
        "VIC_FREQ 729 APE 200 cpu@47.843C soc2@46.656C soc0@47.031C gpu@48.125C tj@48.281C soc1@46.937C "
        "VDD_IN 4383mW/4383mW VDD_CPU_GPU_CV 481mW/481mW VDD_SOC 1323mW/1323mW")
XAVIER = ("RAM 1779/7772MB (lfb 1106x4MB) SWAP 0/3886MB (cached 0MB) CPU [7%@1190,3%@1190,off,off] "
          "EMC_FREQ 0% GR3D_FREQ 0% AO@39.5C GPU@38.5C PMIC@100C AUX@38.5C CPU@40C thermal@39.2C")


def test_parse_orin_line():
    s = jetson.parse_tegrastats(ORIN)
    assert s["ram_used_mb"] == 2647 and s["ram_total_mb"] == 7620
    assert s["cpu_load_pct"] == [2, 1, 0, 0] and s["cpu_freq_mhz"] == [1510] * 4  # offline cores skipped
    assert s["gpu_load_pct"] == 37 and s["gpu_freq_mhz"] == 611
    assert s["temperature_c"]["tj"] == pytest.approx(48.281) and s["temperature_c"]["gpu"] == pytest.approx(48.125)
    assert s["power_mw"] == {"VDD_IN": 4383, "VDD_CPU_GPU_CV": 481, "VDD_SOC": 1323}


def test_parse_older_line_without_rails():
    s = jetson.parse_tegrastats(XAVIER)
    assert s["gpu_load_pct"] == 0 and "gpu_freq_mhz" not in s
    assert s["temperature_c"]["pmic"] == 100 and "power_mw" not in s


def test_summary_of_samples():
    stats = jetson.TegraStats()
    stats.samples = [jetson.parse_tegrastats(ORIN), jetson.parse_tegrastats(ORIN.replace("37%", "63%"))]
    summary = stats.summary()
    assert summary["samples"] == 2 and summary["gpu_load_pct_mean"] == 50
    assert summary["max_temperature_c"] == pytest.approx(48.281) and summary["power_mw_mean"] == 6187


def test_off_a_jetson_nothing_is_touched(monkeypatch):
    monkeypatch.setattr(jetson.shutil, "which", lambda name: None)
    assert jetson.is_jetson() is False and jetson.describe() is None and jetson.power_mode() is None


def test_bench_cli_refuses_jetson_flags_elsewhere(monkeypatch, capsys):
    from pathlib import Path

    from edgekit_runtime.cli import main

    monkeypatch.setattr(jetson.shutil, "which", lambda name: None)
    golden = Path(__file__).resolve().parents[1] / "golden"
    rc = main(["bench", str(golden / "v1.0-onnxruntime-matmul.ekb"), "--keyring", str(golden / "golden.pub"),
               "--lock-clocks"])
    assert rc == 2 and "need a Jetson" in capsys.readouterr().err
