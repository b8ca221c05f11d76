"""The typed bundle manifest: one dataclass per section, the format's defaults, and the parse that refuses misfits.

The host builds a :class:`Manifest` and writes :meth:`Manifest.to_dict`; the
device parses ``manifest.json`` with :meth:`Manifest.from_dict`. Both sides
therefore share one set of types and one set of defaults, and the defaults live
here only (a host config reads them with :func:`defaults`).

Rules (``docs/bundle-format.md`` §5): fields are only appended; a reader ignores
fields it does not know; a field that an older bundle may lack has a default
here. A manifest that does not fit (wrong type, missing required field, unknown
dtype, a reference to a file that is not in ``files``, ...) is refused with
``BundleError(code=BUNDLE_BAD_MANIFEST)`` and a message naming the field's path,
e.g. ``manifest.inputs[0].dtype``.

Standard library only, like all of ``contract``.
"""

from __future__ import annotations

import math
import re
import types
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from . import bundle_spec as spec
from .errors import BundleError, ErrorCode

# Integer dtypes a tensor's quantization may name (the artifact's own I/O; users still pass float).
QUANTIZED_DTYPES = frozenset({"int8", "uint8", "int16", "int32"})
GATE_STATUSES = ("passed", "failed", "not_checked")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _bad(message: str) -> BundleError:
    return BundleError(message, code=ErrorCode.BUNDLE_BAD_MANIFEST)


def _f(default: Any = MISSING, *, factory: Any = MISSING, required: bool = False, flatten: str | None = None) -> Any:
    """A field. ``required``: the key must be present in JSON even though Python has a default for it
    (so a host can build the object before the writer fills it in); ``flatten``: how a mapping field
    is spread into its parent object (``"extra"``: every key this reader does not know;
    ``"precision"``: keys that are precision names)."""
    meta = {k: v for k, v in (("required", required), ("flatten", flatten)) if v}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def json_required(f: Field) -> bool:
    """Whether the key of field ``f`` must be present in a manifest's JSON."""
    return bool(f.metadata.get("required")) or (f.default is MISSING and f.default_factory is MISSING)


def defaults(cls: type) -> dict[str, Any]:
    """The defaults of a section's optional fields, e.g. ``defaults(Preprocess)["scale"]`` (1/255).

    This is how other code (the host's typed config) takes its defaults from the
    format instead of restating them.
    """
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict:
        return "an object"
    if isinstance(tp, type) and issubclass(tp, Section):
        return "an object"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            type(None): "null"}.get(tp, str(tp))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _parse(tp: Any, value: Any, path: str) -> Any:
    """``value`` (from JSON) as type ``tp``, or a BUNDLE_BAD_MANIFEST error naming ``path``."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _parse(option, value, path)
            except BundleError:
                if len(args) - (type(None) in args) == 1:
                    raise  # one real option: its own message says more
        raise _bad(f"{path} must be {_describe(tp)}, not {_json_type(value)}")
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in get_args(tp)):
            raise _bad(f"{path} is {value!r}; it must be {_describe(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _bad(f"{path} must be a list, not {_json_type(value)}")
        (item,) = get_args(tp)
        return [_parse(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(f"{path} must be an object, not {_json_type(value)}")
        _, item = get_args(tp)
        return {k: _parse(item, v, f"{path}[{k!r}]") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Section):
        return tp.from_dict(value, path)
    # JSON has one number type: an integer is a number; a boolean is neither.
    ok = {str: isinstance(value, str), bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool)}.get(tp)
    if ok is None:
        raise TypeError(f"manifest field type {tp!r} is not supported")  # a mistake in this module
    if not ok:
        raise _bad(f"{path} must be {_describe(tp)}, not {_json_type(value)}")
    return float(value) if tp is float else value


def _dump(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


class Section:
    """Base of every manifest section: parse from and write to its JSON object."""

    #: where the section sits in a manifest, for messages when it is parsed on its own
    PATH: ClassVar[str] = "manifest"

    @classmethod
    def from_dict(cls, data: Any, path: str | None = None):
        """Parse a JSON object into this section; unknown keys are ignored, misfits refused (BUNDLE_BAD_MANIFEST)."""
        path = path or cls.PATH
        if not isinstance(data, dict):
            raise _bad(f"{path} must be an object, not {_json_type(data)}")
        hints = _hints(cls)
        kwargs: dict[str, Any] = {}
        known: set[str] = set()
        flattened = []
        for f in fields(cls):
            if f.metadata.get("flatten"):
                flattened.append(f)
                continue
            known.add(f.name)
            if f.name not in data:
                if json_required(f):
                    raise _bad(f"{path}.{f.name} is missing")
                continue
            kwargs[f.name] = _parse(hints[f.name], data[f.name], f"{path}.{f.name}")
        for f in flattened:
            _, item = get_args(hints[f.name])
            if f.metadata["flatten"] == "precision":
                picked = {k: v for k, v in data.items() if k in spec.PRECISIONS}
            else:
                picked = {k: v for k, v in data.items() if k not in known}
            kwargs[f.name] = {k: _parse(item, v, f"{path}.{k}") for k, v in picked.items()}
        obj = cls(**kwargs)
        obj._check(path)
        return obj

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this section (every field, ``None`` as null; key names as in the format)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("flatten"):
                out.update(_dump(value))
            else:
                out[f.name] = _dump(value)
        return out

    def _check(self, path: str) -> None:
        """Checks beyond the types (ranges, agreement between fields); raise :func:`_bad`."""


def _at_most(value: int | None, limit: int, path: str, what: str = "") -> None:
    """Refuse a number that would size memory or work past the format's limit (``bundle_spec.MAX_*``)."""
    if value is not None and value > limit:
        raise _bad(f"{path} is {value}{what}; the format allows at most {limit}")


def _fixed_elements(dims: list[int | str], path: str) -> None:
    """Refuse a shape with more than ``MAX_RANK`` dimensions or whose fixed ones multiply past ``MAX_TENSOR_ELEMENTS``."""
    _at_most(len(dims), spec.MAX_RANK, f"{path} rank")
    elements = 1
    for d in dims:
        if isinstance(d, int):
            elements *= max(d, 1)
    _at_most(elements, spec.MAX_TENSOR_ELEMENTS, path, " elements (the product of its fixed dimensions)")


def _finite(value: float | None, path: str, *, minimum: float | None = None, positive: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value):
        raise _bad(f"{path} must be a finite number, not {value}")
    if positive and value <= 0:
        raise _bad(f"{path} must be positive, not {value}")
    if minimum is not None and value < minimum:
        raise _bad(f"{path} must be at least {minimum}, not {value}")


# ----------------------------------------------------------------------------- identity
@dataclass(frozen=True, kw_only=True)
class ModelInfo(Section):
    """Which model this is; ``release`` only goes up (devices refuse an older one: anti-rollback)."""

    PATH: ClassVar[str] = "manifest.model"
    name: str
    version: str
    release: int

    def _check(self, path: str) -> None:
        if not self.name:
            raise _bad(f"{path}.name is empty")
        if self.release < 0:
            raise _bad(f"{path}.release must be >= 0, not {self.release}")


@dataclass(frozen=True, kw_only=True)
class TargetInfo(Section):
    """The target profile the bundle was compiled for."""

    PATH: ClassVar[str] = "manifest.target"
    name: str
    device: str | None = None
    latency_budget_ms: float | None = None

    def _check(self, path: str) -> None:
        _finite(self.latency_budget_ms, f"{path}.latency_budget_ms", positive=True)


# ----------------------------------------------------------------------------- backend
@dataclass(frozen=True, kw_only=True)
class ShapeRange(Section):
    """A TensorRT optimization profile for one input: smallest, typical and largest shape."""

    PATH: ClassVar[str] = "manifest.backend.options.tensorrt.shapes[...]"
    min: list[int]
    opt: list[int]
    max: list[int]

    def _check(self, path: str) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise _bad(f"{path}: min, opt and max must have the same rank")
        for i, (lo, opt, hi) in enumerate(zip(self.min, self.opt, self.max)):
            if not 0 <= lo <= opt <= hi:
                raise _bad(f"{path}: dimension {i} needs 0 <= min <= opt <= max, not {lo}, {opt}, {hi}")
        _fixed_elements(self.max, f"{path}.max")


@dataclass(frozen=True, kw_only=True)
class TensorRTOptions(Section):
    """How a device builds its TensorRT engine from the bundle's Q/DQ ONNX (Jetson targets)."""

    PATH: ClassVar[str] = "manifest.backend.options.tensorrt"
    precision: list[Literal["int8", "fp16", "fp32"]] = _f(factory=lambda: ["int8", "fp16"])
    workspace_mb: int = 1024
    dla_core: int | None = None
    gpu_fallback: bool = True
    # None: every input fixed at its manifest shape, symbolic dimensions as 1
    shapes: dict[str, ShapeRange] | None = None

    def _check(self, path: str) -> None:
        if self.workspace_mb < 1:
            raise _bad(f"{path}.workspace_mb must be positive, not {self.workspace_mb}")
        _at_most(self.workspace_mb, spec.MAX_WORKSPACE_MB, f"{path}.workspace_mb")
        if self.dla_core is not None and not 0 <= self.dla_core <= 15:
            raise _bad(f"{path}.dla_core must be 0 to 15, not {self.dla_core}")


@dataclass(frozen=True, kw_only=True)
class BackendOptions(Section):
    """Engine settings the model was validated with (``backend.options``); a device may override threads."""

    PATH: ClassVar[str] = "manifest.backend.options"
    threads: int | None = None  # None: the engine's default
    # OpenVINO INFERENCE_PRECISION_HINT: "f32" keeps FP32 math on CPUs whose default is bf16
    inference_precision: Literal["f32", "bf16", "f16"] | None = None
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"  # OpenVINO
    providers: list[str] | None = None  # ONNX Runtime execution providers in order; None: CPU
    device: str = "CPU"  # OpenVINO device
    tensorrt: TensorRTOptions | None = None

    def _check(self, path: str) -> None:
        if self.threads is not None and self.threads < 1:
            raise _bad(f"{path}.threads must be >= 1, not {self.threads}")
        _at_most(self.threads, spec.MAX_THREADS, f"{path}.threads")


@dataclass(frozen=True, kw_only=True)
class QuantizationDetails(Section):
    """How the artifact was quantized (``backend.quantization``). The device reads only
    ``calibration_cache``; the rest is a record, and keys particular to one backend are
    kept as they were written in ``extra``."""

    PATH: ClassVar[str] = "manifest.backend.quantization"
    method: str | None = None
    format: str | None = None
    preset: str | None = None
    per_channel: bool | None = None
    calibrate_method: str | None = None
    calibration_cache: str | None = None  # member: TensorRT calibration cache
    excluded_nodes: list[str] | None = None  # layers kept in float
    extra: dict[str, Any] = _f(factory=dict, flatten="extra")


@dataclass(frozen=True, kw_only=True)
class BackendInfo(Section):
    """The compiler backend, the artifact it made, and the engines that may run it."""

    PATH: ClassVar[str] = "manifest.backend"
    name: str
    version: str
    precision: str
    artifact: str
    engines: list[str]
    options: BackendOptions = _f(factory=BackendOptions)
    quantization: QuantizationDetails | None = None

    def _check(self, path: str) -> None:
        if self.precision not in spec.PRECISIONS:
            raise _bad(f"{path}.precision {self.precision!r} is not one of {', '.join(sorted(spec.PRECISIONS))}")
        if not self.engines:
            raise _bad(f"{path}.engines is empty")


# ----------------------------------------------------------------------------- tensors
@dataclass(frozen=True, kw_only=True)
class QuantParams(Section):
    """How to (de)quantize a tensor whose dtype in the artifact is integer: ``real = (q - zero_point) * scale``."""

    PATH: ClassVar[str] = "manifest.inputs[...].quantization"
    scale: float
    zero_point: int
    dtype: str

    def _check(self, path: str) -> None:
        _finite(self.scale, f"{path}.scale", positive=True)
        if self.dtype not in QUANTIZED_DTYPES:
            raise _bad(f"{path}.dtype {self.dtype!r} is not one of {', '.join(sorted(QUANTIZED_DTYPES))}")


@dataclass(frozen=True, kw_only=True)
class TensorSpec(Section):
    """A model input or output: name, dtype, shape (ints fixed, strings symbolic), layout, quantization."""

    PATH: ClassVar[str] = "manifest.inputs[...]"
    name: str
    dtype: str
    shape: list[int | str]
    layout: str | None = None  # e.g. "NCHW": one letter per dimension
    quantization: QuantParams | None = None

    def _check(self, path: str) -> None:
        if self.dtype not in spec.DTYPES:
            raise _bad(f"{path}.dtype {self.dtype!r} is not one of {', '.join(sorted(spec.DTYPES))}")
        for i, d in enumerate(self.shape):
            if isinstance(d, int) and d < 0:
                raise _bad(f"{path}.shape[{i}] is {d}; a fixed dimension is >= 0")
        _fixed_elements(self.shape, f"{path}.shape")
        if self.layout is not None and len(self.layout) != len(self.shape):
            raise _bad(f"{path}.layout {self.layout!r} does not fit the {len(self.shape)}-D shape {self.shape}")


# ----------------------------------------------------------------------------- processing
PREPROCESS_TYPES = ("image", "tensor")
"""The preprocessing kinds this runtime applies (``tensor`` from format 1.2 on)."""


@dataclass(frozen=True, kw_only=True)
class Preprocess(Section):
    """Raw input → model input with ``(x * scale - mean) / std`` per channel, then ``dtype``.

    ``image``: a decoded uint8 image; colour, resize and layout apply first.
    ``tensor`` (1.2): an array of the model input's shape (sensor window, tabular row,
    forecasting window); mean/std are per channel along axis 1 of the input; ``size``,
    ``color``, ``resize``, ``interpolation`` and ``layout`` do not apply.
    ``resize`` ``letterbox`` (1.4): aspect kept, ``scale = min(H/h0, W/w0)``, padded to ``size``
    with grey 114 (before scale/mean/std), centred; what detectors and segmenters are trained on.
    """

    PATH: ClassVar[str] = "manifest.preprocess"
    type: str = "image"  # "image" or "tensor" (1.2); the runtime refuses to preprocess other kinds
    color: Literal["gray", "rgb", "bgr"] = "rgb"
    size: list[int] | None = None  # [height, width]; required for images
    resize: Literal["stretch", "shorter_center_crop", "letterbox"] = "stretch"  # letterbox: 1.4
    interpolation: Literal["area", "linear", "nearest", "cubic"] = "area"
    scale: float = 1 / 255  # images 0-255 → 0-1; a tensor spec that leaves it out parses as 1.0
    mean: list[float] | None = None  # per channel (or one value for all)
    std: list[float] | None = None
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, data: Any, path: str | None = None):
        """As :meth:`Section.from_dict`; a ``tensor`` spec without ``scale`` gets 1.0 (raw arrays are not 0-255)."""
        if isinstance(data, dict) and data.get("type") == "tensor" and "scale" not in data:
            data = {**data, "scale": 1.0}
        return super().from_dict(data, path)

    @property
    def channels(self) -> int:
        """Channels of the preprocessed image (image kind only; a tensor's come from the model input)."""
        return 1 if self.color == "gray" else 3

    def _check(self, path: str) -> None:
        if self.type == "image":
            if self.size is None:
                raise _bad(f"{path}.size is missing; image preprocessing needs size [height, width]")
            if len(self.size) != 2 or min(self.size) < 1:
                raise _bad(f"{path}.size must be [height, width] with positive values, not {self.size}")
            if max(self.size) > spec.MAX_IMAGE_SIDE or self.size[0] * self.size[1] > spec.MAX_IMAGE_PIXELS:
                raise _bad(f"{path}.size {self.size} is too large: the format allows each side up to "
                           f"{spec.MAX_IMAGE_SIDE} and height * width up to {spec.MAX_IMAGE_PIXELS} pixels")
        _finite(self.scale, f"{path}.scale")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is None:
                continue
            if not values:
                raise _bad(f"{path}.{name} is empty; give one value or one per channel")
            if self.type == "image" and len(values) not in (1, self.channels):
                raise _bad(f"{path}.{name} has {len(values)} values; {self.color} images have {self.channels} "
                           f"channel(s)")
            for i, v in enumerate(values):
                _finite(v, f"{path}.{name}[{i}]")
        if self.std is not None and 0.0 in self.std:
            raise _bad(f"{path}.std has a zero")
        if self.dtype not in spec.DTYPES:
            raise _bad(f"{path}.dtype {self.dtype!r} is not one of {', '.join(sorted(spec.DTYPES))}")


POSTPROCESS_TYPES = ("classification", "detection", "detections", "segmentation")
"""The postprocessing kinds this runtime applies (``detection``, ``detections`` and ``segmentation`` from format
1.4 on)."""
DENSE_POSTPROCESS = ("detection", "detections", "segmentation")
"""The kinds whose results are mapped back onto the original image (each needs the image's ImageMeta)."""


@dataclass(frozen=True, kw_only=True)
class Postprocess(Section):
    """What to make of the first output, by ``type``.

    ``classification``: the top-k labels (``softmax``, ``top_k``). ``detection`` (1.4): the
    output is ``[B, A, 4 + C]`` over the anchor points of ``strides``; boxes are decoded, kept
    at ``score_threshold`` (each point's best class), class-aware NMS at ``iou_threshold``, at
    most ``max_detections``, mapped back onto the original image. ``detections`` (1.4): a graph
    that ran its own NMS outputs ``[B, N, 6]`` rows ``x0, y0, x1, y1, score, class`` in
    network-input pixels (unused rows scored 0); rows at ``score_threshold`` or above are kept,
    best first, at most ``max_detections``, mapped back onto the original image. ``segmentation`` (1.4): the
    output is ``[B, K, h, w]`` logits (channel 0 background); a mask at the original size.
    Other types give raw outputs. Every field is written whatever the type; each type reads its own.
    """

    PATH: ClassVar[str] = "manifest.postprocess"
    type: str = "classification"
    softmax: bool = True
    top_k: int = 5
    strides: list[int] = _f(factory=lambda: [8, 16, 32])  # 1.4, detection: the levels' strides, output order
    score_threshold: float = 0.25  # 1.4, detection: least sigmoid score of a point's best class
    iou_threshold: float = 0.5  # 1.4, detection: NMS suppresses a box of the same class above this IoU
    max_detections: int = 100  # 1.4, detection: boxes kept per image at most

    def _check(self, path: str) -> None:
        if self.top_k < 1:
            raise _bad(f"{path}.top_k must be >= 1, not {self.top_k}")
        _at_most(self.top_k, spec.MAX_TOP_K, f"{path}.top_k")
        if not self.strides:
            raise _bad(f"{path}.strides is empty; give the detector's strides, e.g. [8, 16, 32]")
        _at_most(len(self.strides), spec.MAX_DETECTION_LEVELS, f"{path}.strides length")
        for i, s in enumerate(self.strides):
            if s < 1:
                raise _bad(f"{path}.strides[{i}] must be a positive integer, not {s}")
            _at_most(s, spec.MAX_IMAGE_SIDE, f"{path}.strides[{i}]")
        for name in ("score_threshold", "iou_threshold"):
            value = getattr(self, name)
            _finite(value, f"{path}.{name}", minimum=0.0)
            if value > 1:
                raise _bad(f"{path}.{name} must lie in [0, 1], not {value}")
        if self.max_detections < 1:
            raise _bad(f"{path}.max_detections must be >= 1, not {self.max_detections}")
        _at_most(self.max_detections, spec.MAX_DETECTIONS, f"{path}.max_detections")


# ----------------------------------------------------------------------------- self-test, data
@dataclass(frozen=True, kw_only=True)
class HealthCheck(Section):
    """A sample input and the output the compiler got for it: passes when finite and ``allclose(atol, rtol)``."""

    PATH: ClassVar[str] = "manifest.health_check"
    input: str
    expected_output: str
    atol: float
    rtol: float

    def _check(self, path: str) -> None:
        _finite(self.atol, f"{path}.atol", minimum=0.0)
        _finite(self.rtol, f"{path}.rtol", minimum=0.0)


@dataclass(frozen=True, kw_only=True)
class CalibrationInfo(Section):
    """The calibration tensor the INT8 artifact was calibrated on: its hash, size and origin."""

    PATH: ClassVar[str] = "manifest.calibration"
    sha256: str
    count: int
    source: str | None = None


@dataclass(frozen=True, kw_only=True)
class Histogram(Section):
    """``counts[i]`` values fell in ``[edges[i], edges[i+1])``."""

    PATH: ClassVar[str] = "manifest.input_stats[...].histogram"
    edges: list[float]
    counts: list[int]

    def _check(self, path: str) -> None:
        _at_most(len(self.counts), spec.MAX_HISTOGRAM_BINS, f"{path}.counts length")
        _at_most(len(self.edges), spec.MAX_HISTOGRAM_BINS + 1, f"{path}.edges length")


@dataclass(frozen=True, kw_only=True)
class SampleMean(Section):
    """Mean and spread of the per-sample means."""

    PATH: ClassVar[str] = "manifest.input_stats[...].sample_mean"
    mean: float
    std: float


@dataclass(frozen=True, kw_only=True)
class InputStats(Section):
    """One input's distribution over the calibration set: the drift reference and synthetic-input source."""

    PATH: ClassVar[str] = "manifest.input_stats[...]"
    count: int | None = None
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    percentiles: dict[str, float] | None = None  # "1", "5", "50", "95", "99" → value
    histogram: Histogram | None = None
    sample_mean: SampleMean | None = None


# ----------------------------------------------------------------------------- the build report
@dataclass(frozen=True, kw_only=True)
class AccuracyReport(Section):
    """The task metric of the FP32 reference and of what ships, and the budget it was held to."""

    PATH: ClassVar[str] = "manifest.metrics.accuracy"
    metric: str | None = None  # e.g. "top1_percent"
    direction: Literal["higher", "lower"] | None = None  # which way is better
    dataset: str | None = None
    count: int | None = None
    checked: bool | None = None  # False: no labelled data or no budget; fidelity is the quality figure
    budget_pts: float | None = None
    fp32: float | None = None
    int8: float | None = None
    drop_pts: float | None = None
    deployed: float | None = None  # when FP32 ships
    fp32_measured_with: dict[str, Any] | None = None  # engine and options
    int8_measured_with: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class Fidelity(Section):
    """Label-free agreement of the shipped artifact with FP32 on held-back calibration samples."""

    PATH: ClassVar[str] = "manifest.metrics.fidelity"
    cosine: float
    top1_agreement: float
    samples: int
    cosine_min: float | None = None
    min_cosine: float | None = None  # the gate's threshold
    min_top1_agreement: float | None = None
    source: str | None = None


@dataclass(frozen=True, kw_only=True)
class LatencyFigures(Section):
    """Single-stream latency of one precision at batch 1."""

    PATH: ClassVar[str] = "manifest.metrics.latency_ms[...]"
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    count: int


@dataclass(frozen=True, kw_only=True)
class LatencyReport(Section):
    """Latency measured at compile time; figures per precision sit under the precision's name (``"int8"``)."""

    PATH: ClassVar[str] = "manifest.metrics.latency_ms"
    engine: str | None = None
    batch: int | None = None
    threads: int | str | None = None
    interleaved: bool | None = None
    speedup: float | None = None  # FP32 p50 / INT8 p50
    gated: bool | None = None  # whether the latency gate judged this host's figures
    not_gated_reason: str | None = None
    figures: dict[str, LatencyFigures] = _f(factory=dict, flatten="precision")


@dataclass(frozen=True, kw_only=True)
class GateRecord(Section):
    """One gate's verdict."""

    PATH: ClassVar[str] = "manifest.metrics.gates[...]"
    name: str
    status: Literal["passed", "failed", "not_checked"]
    value: float | None = None
    threshold: float | None = None
    unit: str = ""
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class StageRecord(Section):
    """One build stage and what it cost."""

    PATH: ClassVar[str] = "manifest.metrics.stages[...]"
    name: str
    seconds: float


@dataclass(frozen=True, kw_only=True)
class OptimizePassRecord(Section):
    """*1.3.* One compression pass (pruning, distillation) and what it changed, measured at compile time."""

    PATH: ClassVar[str] = "manifest.metrics.optimize.passes[...]"
    kind: str  # "prune" | "distill"
    settings: dict[str, Any] = _f(factory=dict)  # the pass's settings as the build resolved them
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    metric: str | None = None  # the task metric's name ("accuracy", "rmse")
    metric_before: float | None = None
    metric_after: float | None = None
    fp32_p50_ms_before: float | None = None
    fp32_p50_ms_after: float | None = None
    int8_p50_ms_before: float | None = None
    int8_p50_ms_after: float | None = None


@dataclass(frozen=True, kw_only=True)
class OptimizeRecord(Section):
    """*1.3.* The compression passes the model went through before export (``metrics.optimize``)."""

    PATH: ClassVar[str] = "manifest.metrics.optimize"
    passes: list[OptimizePassRecord] = _f(factory=list)
    macs_reduction: float | None = None  # MACs before the first pass / after the last
    params_reduction: float | None = None


@dataclass(frozen=True, kw_only=True)
class BuildMetrics(Section):
    """The build report's figures (``metrics``): a record for people and dashboards; the runtime acts on none."""

    PATH: ClassVar[str] = "manifest.metrics"
    accuracy: AccuracyReport | None = None
    fidelity: Fidelity | None = None
    latency_ms: LatencyReport | None = None
    latency_measured_on: str | None = None  # CPU name
    size_bytes: dict[str, int] = _f(factory=dict)  # precision → artifact bytes
    gates: list[GateRecord] = _f(factory=list)
    stages: list[StageRecord] = _f(factory=list)
    optimize: OptimizeRecord | None = None  # 1.3: compression passes (None: the model was compiled as given)


# ----------------------------------------------------------------------------- envelope
@dataclass(frozen=True, kw_only=True)
class FileEntry(Section):
    """A member of the archive: its sha256 (64 lowercase hex) and size in bytes."""

    PATH: ClassVar[str] = "manifest.files[...]"
    sha256: str
    size: int

    def _check(self, path: str) -> None:
        if not _SHA256.match(self.sha256):
            raise _bad(f"{path}.sha256 is not 64 lowercase hex digits")
        if self.size < 0:
            raise _bad(f"{path}.size must be >= 0, not {self.size}")


@dataclass(frozen=True, kw_only=True)
class Signing(Section):
    """Who signed: the algorithm and the key id (``signature.json`` must name the same key)."""

    PATH: ClassVar[str] = "manifest.signing"
    algorithm: str
    key_id: str


@dataclass(frozen=True, kw_only=True)
class Manifest(Section):
    """The whole ``manifest.json``.

    The host builds one (``files`` and ``signing`` are filled in by the bundle
    writer) and writes :meth:`to_dict`; the device parses one with
    :meth:`from_dict`, which refuses anything that does not fit.
    """

    PATH: ClassVar[str] = "manifest"
    format: str = _f(spec.FORMAT_NAME, required=True)
    format_version: str = _f(spec.FORMAT_VERSION, required=True)
    created_at: str
    created_by: str
    model: ModelInfo
    target: TargetInfo
    backend: BackendInfo
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocess: Preprocess | None = _f(None, required=True)
    postprocess: Postprocess | None = _f(None, required=True)
    labels: str | None = None  # member: one label per line
    metrics: BuildMetrics = _f(factory=BuildMetrics, required=True)
    calibration: CalibrationInfo | None = _f(None, required=True)
    health_check: HealthCheck | None = _f(None, required=True)
    input_stats: dict[str, InputStats] = _f(factory=dict)  # input name → statistics
    files: dict[str, FileEntry] = _f(factory=dict, required=True)
    signing: Signing | None = _f(None, required=True)

    @classmethod
    def from_dict(cls, data: Any, path: str | None = None) -> "Manifest":
        """Parse ``manifest.json``; a newer major format is BUNDLE_UNSUPPORTED_VERSION, any misfit BUNDLE_BAD_MANIFEST."""
        if not isinstance(data, dict):
            raise _bad(f"manifest must be an object, not {_json_type(data)}")
        spec.check_format_version(data)
        return super().from_dict(data, path)

    def referenced_files(self) -> list[tuple[str, str]]:
        """``(field path, member name)`` of every member the manifest refers to."""
        refs = [("backend.artifact", self.backend.artifact)]
        if self.labels:
            refs.append(("labels", self.labels))
        if self.health_check is not None:
            refs += [("health_check.input", self.health_check.input),
                     ("health_check.expected_output", self.health_check.expected_output)]
        q = self.backend.quantization
        if q is not None and q.calibration_cache:
            refs.append(("backend.quantization.calibration_cache", q.calibration_cache))
        return refs

    def _check(self, path: str) -> None:
        if self.signing is None:
            raise _bad(f"{path}.signing must be an object, not null")
        for group in ("inputs", "outputs"):
            tensors = getattr(self, group)
            if not tensors:
                raise _bad(f"{path}.{group} is empty")
            _at_most(len(tensors), spec.MAX_TENSORS, f"{path}.{group} length")
            names = [t.name for t in tensors]
            if len(set(names)) != len(names):
                raise _bad(f"{path}.{group} names a tensor twice: {names}")
        _at_most(len(self.input_stats), spec.MAX_TENSORS, f"{path}.input_stats length")
        for name in self.files:
            if name in spec.RESERVED_NAMES:
                raise _bad(f"{path}.files lists the reserved name {name!r}")
            problem = spec.member_name_problem(name)
            if problem is not None:
                raise _bad(f"{path}.files[{name[:300]!r}]: the member name {problem}")
        problem = spec.member_set_problem([*self.files, *spec.RESERVED_NAMES])
        if problem is not None:
            raise _bad(f"{path}.files: {problem}")
        for where, name in self.referenced_files():
            if name not in self.files:
                raise _bad(f"{path}.{where} refers to {name!r}, which is not in manifest.files")
        # input_stats entries that name no input are not refused: drift reports them unavailable.
        # Before 1.1 inputs[].layout was guessed from the rank and read by nothing, so only
        # bundles from 1.1 on are held to agree with their preprocessing.
        if self.preprocess is not None and self.preprocess.type == "tensor":
            self._check_tensor_preprocess_fits(path, self.preprocess, self.inputs[0])
        elif self.preprocess is not None and spec.parse_version(self.format_version) >= (1, 1):
            self._check_preprocess_fits(path, self.preprocess, self.inputs[0])
        if self.postprocess is not None and self.postprocess.type in DENSE_POSTPROCESS:
            self._check_dense_postprocess_fits(path, self.postprocess, self.preprocess, self.outputs[0])

    @staticmethod
    def _check_preprocess_fits(path: str, pre: Preprocess, first: TensorSpec) -> None:
        """The images the device preprocesses go to the first input: its layout, channels and size must agree."""
        if pre.type != "image":
            return  # a kind this reader does not know: the runtime refuses to preprocess it
        if first.layout is not None and first.layout != pre.layout:
            raise _bad(f"{path}.inputs[0].layout is {first.layout!r} but {path}.preprocess.layout is "
                       f"{pre.layout!r}: the device would feed the model the wrong layout")
        if len(first.shape) != 4:
            return
        c, h, w = first.shape[1:] if pre.layout == "NCHW" else (first.shape[3], *first.shape[1:3])
        for what, dim, want in (("channels", c, pre.channels), ("height", h, pre.size[0]), ("width", w, pre.size[1])):
            if isinstance(dim, int) and dim != want:
                raise _bad(f"{path}.preprocess makes {pre.layout} images with {what} {want} but "
                           f"{path}.inputs[0].shape {first.shape} has {dim}")

    @staticmethod
    def _check_dense_postprocess_fits(path: str, post: Postprocess, pre: Preprocess | None, first: TensorSpec) -> None:
        """A detector's anchor points come from the input size and strides: they must tile the input and give
        as many rows as the first output has; a segmenter's channels must fit a uint8 mask."""
        shape = first.shape
        if post.type == "segmentation":
            if len(shape) != 4:
                raise _bad(f"{path}.postprocess is segmentation, which reads a [batch, classes, height, width] "
                           f"output, but {path}.outputs[0].shape is {shape}")
            if isinstance(shape[1], int) and not 1 <= shape[1] <= 256:
                raise _bad(f"{path}.outputs[0].shape[1] is {shape[1]}: a segmentation mask holds 1 to 256 classes")
            return
        if post.type == "detections":
            if len(shape) != 3 or (isinstance(shape[2], int) and shape[2] != 6):
                raise _bad(f"{path}.postprocess is detections, which reads [batch, boxes, 6] rows (x0, y0, x1, y1, "
                           f"score, class), but {path}.outputs[0].shape is {shape}")
            return
        if len(shape) != 3:
            raise _bad(f"{path}.postprocess is detection, which reads a [batch, anchors, 4 + classes] output, "
                       f"but {path}.outputs[0].shape is {shape}")
        if isinstance(shape[2], int) and shape[2] < 5:
            raise _bad(f"{path}.outputs[0].shape[2] is {shape[2]}: a detector outputs 4 box distances and at "
                       f"least one class")
        if pre is None or pre.type != "image" or pre.size is None:
            return
        height, width = pre.size
        step = max(post.strides)
        if height % step or width % step:
            raise _bad(f"{path}.preprocess.size {pre.size} is not divisible by the largest of "
                       f"{path}.postprocess.strides {post.strides}")
        anchors = sum((height // s) * (width // s) for s in post.strides)
        if isinstance(shape[1], int) and shape[1] != anchors:
            raise _bad(f"{path}.outputs[0].shape[1] is {shape[1]} but {path}.postprocess.strides {post.strides} "
                       f"over a {height}x{width} input make {anchors} anchor points")

    @staticmethod
    def _check_tensor_preprocess_fits(path: str, pre: Preprocess, first: TensorSpec) -> None:
        """Tensor preprocessing normalises axis 1 of the first input: mean/std have one value or one per channel."""
        if len(first.shape) < 2:
            raise _bad(f"{path}.preprocess is a tensor kind, which normalises axis 1, but {path}.inputs[0].shape "
                       f"{first.shape} has no axis after the batch")
        channels = first.shape[1]
        for name in ("mean", "std"):
            values = getattr(pre, name)
            if values is None or len(values) == 1:
                continue
            if not isinstance(channels, int):
                raise _bad(f"{path}.preprocess.{name} has {len(values)} values but {path}.inputs[0].shape[1] is "
                           f"{channels!r}, not a fixed channel count; give one value")
            if len(values) != channels:
                raise _bad(f"{path}.preprocess.{name} has {len(values)} values but {path}.inputs[0].shape "
                           f"{first.shape} has {channels} channel(s) on axis 1; give one value or {channels}")


SECTIONS: tuple[type[Section], ...] = (
    Manifest, ModelInfo, TargetInfo, BackendInfo, BackendOptions, TensorRTOptions, ShapeRange, QuantizationDetails,
    TensorSpec, QuantParams, Preprocess, Postprocess, HealthCheck, CalibrationInfo, InputStats, Histogram,
    SampleMean, BuildMetrics, AccuracyReport, Fidelity, LatencyReport, LatencyFigures, GateRecord, StageRecord,
    OptimizeRecord, OptimizePassRecord,
    FileEntry, Signing,
)
"""Every section type, for tools that walk the format (the documentation test)."""
