"""The TensorRT INT8 calibration cache the host writes into Jetson bundles, in TensorRT's own text format."""

from __future__ import annotations

import math

import pytest

from edgekit.build.backends.tensorrt_calibration import CalibrationCacheError, read_cache, write_cache


def test_calibration_cache_round_trip():
    amax = {"input": 2.5, "/features/0/Relu_output_0": 11.25, "name:with:colons": 0.5}
    text = write_cache(amax)
    header, scales = read_cache(text)
    assert header == "TRT-8601-EntropyCalibration2"
    assert set(scales) == set(amax)
    for name, value in amax.items():
        assert math.isclose(scales[name] * 127, value, rel_tol=1e-6)


def test_calibration_cache_uses_big_endian_float_hex():
    # 1/127 * 127 = 1.0 → scale 1/127 = 0x3c010204 as big-endian IEEE-754
    assert write_cache({"t": 1.0}).splitlines()[1] == "t: 3c010204"


@pytest.mark.parametrize("text", ["", "not a header\nx: 3c010204", "TRT-1-X\nx: zz", "TRT-1-X\nx: 3c01", "TRT-1-X\njunk"])
def test_malformed_calibration_cache_is_refused(text):
    with pytest.raises(CalibrationCacheError):
        read_cache(text)


def test_negative_or_nan_range_is_refused():
    with pytest.raises(CalibrationCacheError):
        write_cache({"t": float("nan")})
