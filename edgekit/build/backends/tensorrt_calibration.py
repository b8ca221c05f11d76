"""TensorRT INT8 calibration cache: the host writes it into Jetson bundles, and reads it back to check it.

The format is TensorRT's own (what ``IInt8Calibrator.write_calibration_cache``
produces and ``read_calibration_cache`` consumes)::

    TRT-8601-EntropyCalibration2
    input: 3c010a14
    /features/conv/Conv_output_0: 3d8b2a11

The first line names the TensorRT version and algorithm; each following line is
``tensor_name: <hex of the big-endian IEEE-754 float32 scale>``, with scale =
amax / 127 (symmetric INT8). Bundles carry it next to the explicit-quantization
Q/DQ ONNX so a device can also build an implicitly quantized engine, and so the
ranges are auditable. Only the host uses this module (the device's TensorRT reads the
cache itself), so it lives here and not in the runtime.
"""

from __future__ import annotations

import math
import struct

DEFAULT_HEADER = "TRT-8601-EntropyCalibration2"


class CalibrationCacheError(ValueError):
    """The cache text is not a TensorRT calibration cache."""


def scale_to_hex(scale: float) -> str:
    return struct.pack(">f", float(scale)).hex()


def hex_to_scale(text: str) -> float:
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raise CalibrationCacheError(f"{text!r} is not hex") from None
    if len(raw) != 4:
        raise CalibrationCacheError(f"{text!r} is not 4 bytes")
    return struct.unpack(">f", raw)[0]


def write_cache(amax: dict[str, float], header: str = DEFAULT_HEADER) -> str:
    """Per-tensor absolute maxima → cache text (scale = amax / 127)."""
    lines = [header]
    for name in sorted(amax):
        value = float(amax[name])
        if not math.isfinite(value) or value < 0:
            raise CalibrationCacheError(f"amax of {name!r} is {value}")
        lines.append(f"{name}: {scale_to_hex(value / 127.0)}")
    return "\n".join(lines) + "\n"


def read_cache(text: str) -> tuple[str, dict[str, float]]:
    """Cache text → (header, {tensor name: scale})."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("TRT-"):
        raise CalibrationCacheError("first line must be a TRT-<version>-<algorithm> header")
    scales: dict[str, float] = {}
    for line in lines[1:]:
        # tensor names may themselves contain ':'; the value is after the last one
        name, sep, value = line.rpartition(":")
        if not sep or not name:
            raise CalibrationCacheError(f"line {line!r} is not 'name: hex'")
        scales[name.strip()] = hex_to_scale(value)
    return lines[0], scales
