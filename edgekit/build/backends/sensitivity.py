"""Mixed precision by sensitivity: keep the fewest layers in float that let the INT8 model pass its gates.

One strategy for every backend: ONNX Runtime and TensorRT's Q/DQ graph (``nodes_to_exclude``),
OpenVINO (ONNX names mapped to NNCF's ignored scope; ranked on a Q/DQ graph that, like NNCF,
quantizes layer inputs only), and TFLite (its own ops, ranked and kept float with
ai-edge-quantizer's recipe, see ``quantize_tflite``; :func:`search_fewest` is shared):

1. **rank** the quantizable layers (ONNX node names) by the error each one adds *on its own*: the
   model is quantized with only that layer in INT8 (ONNX Runtime's ``nodes_to_quantize``, with the
   activation ranges calibrated once and cached) and its output is compared with the float model's
   on calibration samples. Measured against the older "float vs Q/DQ activations, error added per
   node" ranking, this one also finds a layer whose *output* quantization does the harm (ONNX
   Runtime quantizes a Conv's output as well as its inputs, so an outlier tensor needs both its
   producer and its consumer kept in float, and only the isolated error ranks both high);
2. **search** the smallest ``k`` such that keeping the top ``k`` in float passes every quality gate:
   doubling (1, 2, 4, ...) up to ``quantize.max_excluded_nodes`` until one passes, then a binary
   search between the last failure and the first pass. Each candidate is a real artifact of the
   backend, judged by ``goal.evaluate`` through the device engine. The binary search assumes more
   layers in float is never worse, which holds for the ranked prefixes in practice but is not a law;
   the candidates tried are all listed in the report.

The fallback returns the failed candidates and the one passing candidate with the fewest layers in
float (larger passing candidates are recorded in its ``search`` detail, not offered as attempts, so
the quantize stage's "smallest drop wins" choice cannot pick a candidate with more float layers).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...data.sources import named_feeds
from ..gates import Attempt, RecoveryGoal

log = logging.getLogger(__name__)

STRATEGY = "mixed_precision"
# ONNX op types worth keeping in float: they compute, so their Q/DQ changes the numbers. Data movement
# (Reshape, MaxPool, Transpose...) and removable activations (Relu, Clip) only forward their input's
# quantization and are left to the quantizer.
RANKED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool",
                        "GlobalAveragePool", "Softmax", "Sigmoid", "LayerNormalization", "InstanceNormalization",
                        "BatchNormalization", "Resize", "LeakyRelu"})
RANKING_SAMPLES = 32
RANKING_IN_REPORT = 20


@dataclass
class LayerError:
    """One layer's sensitivity: relative L2 error of the model output with only this layer in INT8."""

    name: str
    op_type: str
    error: float

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.name, "op": self.op_type, "error": round(self.error, 6)}


@dataclass
class QdqOptions:
    """How ONNX Runtime writes the Q/DQ graph a backend is ranked on (the backend's own precision rules)."""

    activation_type: str = "uint8"  # "int8" | "uint8"
    per_channel: bool = True
    calibrate_method: str = "minmax"
    extra_options: dict[str, Any] | None = None
    # op types quantized (None: every op ONNX Runtime can quantize); the transformer recipe's weight layers
    op_types: tuple[str, ...] | None = None


class _Reader:
    """CalibrationDataReader over the samples, one per call (fixed-batch models included); several inputs'
    samples come as a structured array (``edgekit.data.sources.per_input``)."""

    def __init__(self, names: list[str], x: np.ndarray):
        self._items = iter([named_feeds(x[i : i + 1], names) for i in range(len(x))])

    def get_next(self):
        return next(self._items, None)


def input_names(path: Path) -> list[str]:
    """The graph inputs that are not initializers, in order."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


def calibration_cache(model: Path, calib: np.ndarray, method: str, workdir: Path,
                      op_types: tuple[str, ...] | None = None) -> Path:
    """Where the activation ranges of ``model`` on ``calib`` are kept, so every candidate reuses one calibration.

    Keyed by the model's bytes, the samples, the method and the op types quantized (ONNX Runtime calibrates
    only their tensors): a kept work folder never hands a retrained model, other calibration data or a
    wider recipe the old ranges.
    """
    h = hashlib.sha256(model.read_bytes())
    h.update(np.ascontiguousarray(calib if calib.dtype.names else calib.astype(np.float32, copy=False)).tobytes())
    h.update(method.encode())
    if op_types:
        h.update(",".join(sorted(op_types)).encode())
    return workdir / f"calibration-ranges.{h.hexdigest()[:16]}.json"


def write_qdq(pre: Path, out: Path, calib: np.ndarray, opts: QdqOptions, workdir: Path,
              exclude: list[str] | None = None, only: list[str] | None = None) -> Path:
    """ONNX Runtime static Q/DQ of ``pre``; ``exclude`` stays float, or only ``only`` is quantized."""
    import inspect

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # ONNX Runtime < 1.32 has no calibration cache: each candidate then calibrates again (slower, same result)
    cache = ({"calibration_cache_path": str(calibration_cache(pre, calib, opts.calibrate_method, workdir,
                                                              opts.op_types))}
             if "calibration_cache_path" in inspect.signature(quantize_static).parameters else {})
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    out.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_quantizer():
        quantize_static(
            str(pre), str(out), _Reader(input_names(pre), calib),
            quant_format=QuantFormat.QDQ, per_channel=opts.per_channel,
            activation_type=QuantType.QUInt8 if opts.activation_type == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=methods[opts.calibrate_method],
            nodes_to_exclude=list(exclude or []), nodes_to_quantize=list(only or []),
            op_types_to_quantize=list(opts.op_types) if opts.op_types else None,
            extra_options=dict(opts.extra_options or {}), **cache,
        )
    return out


@contextlib.contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantizer logs to the root logger, once per node and call (per-channel axis warnings on
    LayerNorm weights: hundreds of lines per ViT build): each distinct message goes to edgekit's log once."""
    seen: set[str] = set()

    def once(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.levelno >= logging.WARNING and text not in seen:
            seen.add(text)
            log.debug("onnxruntime.quantization: %s", text)
        return False

    root = logging.getLogger()
    root.addFilter(once)
    try:
        yield
    finally:
        root.removeFilter(once)


def ranked_layers(onnx_path: Path) -> list[tuple[str, str]]:
    """(node name, op type) of every layer the ranking considers, in graph order."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return [(n.name, n.op_type) for n in m.graph.node if n.op_type in RANKED_OPS and n.name]


def _outputs(path: Path, samples: np.ndarray) -> np.ndarray:
    """The first output of ``path`` on ``samples``, unoptimized (the graph as written), one sample per run."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names, out = [i.name for i in sess.get_inputs()], sess.get_outputs()[0].name
    return np.concatenate([sess.run([out], named_feeds(samples[i : i + 1], names))[0] for i in range(len(samples))])


def relative_error(ref: np.ndarray, out: np.ndarray) -> float:
    """||out - ref|| / ||ref|| over all samples."""
    ref64 = ref.astype(np.float64)
    return float(np.linalg.norm(out.astype(np.float64) - ref64) / (np.linalg.norm(ref64) + 1e-12))


def rank_isolated(pre: Path, calib: np.ndarray, opts: QdqOptions, workdir: Path,
                  samples: np.ndarray) -> list[LayerError]:
    """Each layer quantized alone (all others float), ranked by the output error it causes, largest first."""
    ref = _outputs(pre, samples)
    scratch = workdir / "sensitivity"
    ranking = []
    for i, (name, op) in enumerate(ranked_layers(pre)):
        path = write_qdq(pre, scratch / f"only-{i}.onnx", calib, opts, workdir, only=[name])
        ranking.append(LayerError(name, op, relative_error(ref, _outputs(path, samples))))
        path.unlink()
    return sorted(ranking, key=lambda e: e.error, reverse=True)


def rank_added(pre: Path, qdq: Path, samples: np.ndarray) -> list[LayerError]:
    """The older ranking, kept to compare with: float vs Q/DQ activations, error each node adds locally.

    Relative error at a node's output minus the error at its first input, in the fully quantized
    graph. Blind to output quantization: ONNX Runtime quantizes a Conv's output inside the producer,
    so the producer of an outlier tensor shows no added error.
    """
    import onnx
    import onnxruntime as ort

    fm = onnx.load(str(pre))
    nodes = [n for n in fm.graph.node if n.op_type in RANKED_OPS and n.name]
    watch = {t for n in nodes for t in (n.output[0], n.input[0])}

    def run_with(path: Path) -> dict[str, np.ndarray]:
        m = onnx.load(str(path))
        have = {o.name for o in m.graph.output}
        produced = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}
        for t in sorted(watch & produced - have):
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        feed = [i.name for i in sess.get_inputs()]
        runs = [sess.run(names, named_feeds(samples[i : i + 1], feed)) for i in range(len(samples))]
        return {n: np.concatenate([r[j] for r in runs]) for j, n in enumerate(names)}

    f, q = run_with(pre), run_with(qdq)

    def err(t: str) -> float:
        return relative_error(f[t], q[t]) if t in f and t in q else 0.0

    added = [LayerError(n.name, n.op_type, err(n.output[0]) - err(n.input[0])) for n in nodes]
    return sorted(added, key=lambda e: e.error, reverse=True)


def search_fewest(ranking: list[LayerError], limit: int, build: Callable[[list[str]], Any],
                  goal: RecoveryGoal, details: Callable[[Any], dict[str, Any]] | None = None) -> list[Attempt]:
    """Smallest ``k`` (≤ ``limit``) whose top-``k`` layers in float pass the gates: doubling, then bisection.

    ``build(names)`` returns the backend's artifact with ``names`` kept in float; ``details(artifact)``
    adds backend facts (names it could not map, ...). Returns the failed candidates in the order
    tried, then the passing one with the fewest layers in float (if any); every candidate tried is
    listed in that last attempt's ``search`` detail.
    """
    limit = min(limit, len(ranking))
    tried: dict[int, Attempt] = {}

    def attempt(k: int) -> bool:
        names = [e.name for e in ranking[:k]]
        art = build(names)
        extra = details(art) if details else {}
        a = goal.evaluate(art, STRATEGY, {"excluded_nodes": names, "k": k, **extra})
        tried[k] = a
        log.info("mixed precision: %d layer(s) in float %s", k, "passes" if a.passed else "still fails")
        return a.passed

    lo, hi, k = 0, None, 1  # lo: most layers known to fail (0 = plain PTQ); hi: fewest known to pass
    while k <= limit:
        if attempt(k):
            hi = k
            break
        lo = k
        if k == limit:
            break
        k = min(2 * k, limit)
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid):
            hi = mid
        else:
            lo = mid
    trail = [{"k": k, "passed": a.passed, **_figures(a)} for k, a in sorted(tried.items())]
    ranking_out = [e.to_dict() for e in ranking[:RANKING_IN_REPORT]]
    out = [a for k, a in sorted(tried.items()) if not a.passed]
    if hi is not None:
        out.append(tried[hi])
    last = out[-1] if out else None
    if last is not None:
        last.details.update(search=trail, ranking=ranking_out, ranked_layers=len(ranking),
                            fewest_in_float=hi, max_excluded_nodes=limit)
    return out


def _figures(a: Attempt) -> dict[str, Any]:
    f: dict[str, Any] = {}
    if "accuracy" in a.figures:
        f.update(accuracy=a.figures["accuracy"], drop_pts=a.figures["drop"])
    if "fidelity" in a.figures:
        f["cosine"] = a.figures["fidelity"]["cosine"]
    return f
