"""ONNX Runtime: static INT8 quantization to a Q/DQ ONNX model, the recipe chosen by measured speed.

``quant_pre_process`` (shape inference + graph optimization), spatial ReduceMeans rewritten as
GlobalAveragePool (so they run as QLinearGlobalAveragePool, not in float between Q and DQ), then
``quantize_static`` in QDQ format. A few candidate recipes (the profile's own, the other weight
granularity, uint8 activations when the profile asks for int8) are timed interleaved with FP32 on
the target's engine and the fastest one whose output error stays close to the profile's recipe is
kept, if it beats the profile's own by more than timing noise (``SPEED_MARGIN``); every candidate's
figures go into the artifact's details, and the latency gate still ships FP32 when even that one is
slower. The activation ranges are calibrated once per model and calibration set
and cached in the work folder, so every candidate reuses them. Over budget, the fallback is mixed
precision by sensitivity (:mod:`.sensitivity`) on the chosen recipe: the fewest layers, ranked by the
error each adds on its own, are kept in float until every gate passes.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekit_runtime.fileio import sha256_file

from ...config import QuantizeSettings
from ..gates import Attempt, RecoveryGoal
from .attention import WEIGHT_OPS, find_attention
from .base import Artifact, BackendCompiler, SourceModel
from .sensitivity import RANKING_SAMPLES, QdqOptions, rank_isolated, search_fewest, write_qdq

log = logging.getLogger(__name__)


ELEMENTWISE_OPS = frozenset({"Add", "Mul", "Sigmoid", "HardSigmoid", "HardSwish"})
# Candidates are measured this many queries each (interleaved with FP32); fewer for slow models (see _measure)
SPEED_QUERIES = 60
# A faster candidate is taken only if its output error (vs FP32, on calibration samples) stays within this
# factor of the profile's own recipe (plus an absolute slack): speed never buys a visibly worse model
ERROR_TOLERANCE, ERROR_SLACK = 1.5, 0.01
# ... and only if it beats the profile's own recipe by more than this share of its p50: a 2 % difference on a
# model that runs in 75 µs is timing noise, and the profile's recipe (per-channel weights) is the better model
SPEED_MARGIN = 0.05
ERROR_SAMPLES = 16


def recipe_excludes(graph, kind: str | None) -> list[str]:
    """Node names a recipe keeps in float: ``depthwise`` convolutions, or ``elementwise`` ops (SE, hard-swish)."""
    if not kind:
        return []
    if kind == "elementwise":
        return [n.name for n in graph.graph.node if n.op_type in ELEMENTWISE_OPS and n.name]
    shapes = {i.name: list(i.dims) for i in graph.graph.initializer}
    out = []
    for n in graph.graph.node:
        if n.op_type != "Conv" or not n.name:
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        w = shapes.get(n.input[1])
        if group > 1 and w is not None and len(w) > 1 and w[1] == 1:
            out.append(n.name)
    return out


def spatial_means_as_pools(src: Path, dst: Path) -> int:
    """Write ``src`` with every ReduceMean over H and W (keepdims, 4-D) as GlobalAveragePool; returns how many.

    torch's dynamo exporter writes ``adaptive_avg_pool2d(1)`` (SE blocks, classifier heads) as
    ReduceMean. ORT has no INT8 ReduceMean, so each one runs in float between a DequantizeLinear and a
    QuantizeLinear; GlobalAveragePool computes the same and runs as QLinearGlobalAveragePool.
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in list(m.graph.value_info) + list(m.graph.input)
             if v.type.tensor_type.HasField("shape")}
    count = 0
    for n in m.graph.node:
        if n.op_type != "ReduceMean" or ranks.get(n.input[0]) != 4:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        axes = attrs.get("axes")
        if axes is None and len(n.input) > 1 and n.input[1] in inits:
            axes = inits[n.input[1]].tolist()
        if attrs.get("keepdims", 1) != 1 or axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
            continue
        n.op_type = "GlobalAveragePool"
        del n.input[1:]
        del n.attribute[:]
        count += 1
    if count:
        used = {i for n in m.graph.node for i in n.input}
        keep = [i for i in m.graph.initializer if i.name in used]
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)
        onnx.save(m, str(dst))
    return count


def recipe_name(opts: QdqOptions) -> str:
    """``qdq_u8`` / ``qdq_s8`` (+ ``_pt`` for per-tensor weights, ``_transformer`` for weight layers only):
    how the report names a recipe."""
    return ("qdq_" + ("u8" if opts.activation_type == "uint8" else "s8") + ("" if opts.per_channel else "_pt")
            + ("_transformer" if opts.op_types else ""))


def transformer_recipe(opts: QdqOptions, pre: Path) -> tuple[QdqOptions, list[str]]:
    """The Q/DQ transformer recipe on top of ``opts`` (see :mod:`.attention`): weight layers only, and the
    activation × activation MatMuls of attention (by node name in ``pre``, the graph quantized) in float."""
    att = find_attention(pre)
    if att.unnamed_matmuls:
        log.warning("%d attention MatMul(s) of %s have no node name: they stay INT8", att.unnamed_matmuls, pre.name)
    return replace(opts, op_types=WEIGHT_OPS), list(att.dynamic_matmuls)


class OnnxRuntimeCompiler(BackendCompiler):
    name = "onnxruntime"
    engine = "onnxruntime"

    def __init__(self, speed_options: dict[str, Any] | None = None, choose_by_speed: bool = True):
        # engine options the INT8 recipes are timed with: the bundle's backend.options where the build
        # passes them (ORT's defaults otherwise: all physical cores)
        self.speed_options: dict[str, Any] = dict(speed_options or {})
        self.choose_by_speed = choose_by_speed
        # pre-processed model -> the recipe (options, graph) quantize() chose, for the fallback
        self._chosen: dict[str, tuple[QdqOptions, Path]] = {}

    def library_version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def use_deploy_options(self, options: dict[str, Any]) -> None:
        """INT8 recipes are timed with the bundle's engine options (threads, spin-wait) from here on."""
        self.speed_options = dict(options)

    def fp32(self, src: SourceModel, workdir: Path) -> Artifact:
        out = workdir / "fp32"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(src.onnx, out / "model.onnx")
        return Artifact(out, "model.onnx", ["model.onnx"], "fp32")

    def _preprocessed(self, onnx_path: Path, workdir: Path) -> Path:
        """``onnx_path`` after ORT's ``quant_pre_process``, or after the fallback that worked.

        ORT's symbolic shape inference asserts on some exporters' graphs; plain static
        quantization works on them, so a failure falls back (without symbolic inference,
        ONNX shape inference only, the model as is) rather than ending the build. The
        fallbacks taken are kept beside the file (``.fallbacks.json``) and logged.
        """
        import json

        from ...models.onnx_normalize import optimize_with_fallbacks

        # keyed by the model's hash: a kept work folder must never hand a retrained model the old graph
        pre = workdir / f"model_pre.{sha256_file(onnx_path)[:12]}.onnx"
        if not pre.exists():
            fallbacks = optimize_with_fallbacks(onnx_path, pre)
            if fallbacks:
                pre.with_suffix(".fallbacks.json").write_text(json.dumps(fallbacks, indent=2))
        return pre

    @staticmethod
    def preprocess_fallbacks(pre: Path) -> list:
        """The fallbacks ``_preprocessed`` took for ``pre`` (none: ORT's pre-processing ran as it is)."""
        import json

        fb = pre.with_suffix(".fallbacks.json")
        return json.loads(fb.read_text()) if fb.exists() else []

    def _pooled(self, pre: Path) -> Path | None:
        """``pre`` with spatial ReduceMeans as GlobalAveragePool, or None when it has none."""
        pooled = pre.with_name(pre.stem + ".pools.onnx")
        if pooled.exists() or spatial_means_as_pools(pre, pooled):
            return pooled
        return None

    def qdq_options(self, settings: QuantizeSettings) -> QdqOptions:
        """This backend's Q/DQ rules: the profile's activation type, per-channel int8 weights."""
        return QdqOptions(settings.activation_type, settings.per_channel, settings.calibrate_method,
                          {"ActivationSymmetric": settings.activation_type == "int8"})

    def recipes(self, src: SourceModel) -> list[str]:
        """``transformer`` where the graph has attention (:func:`.attention.find_attention`)."""
        return ["transformer"] if find_attention(src.onnx) else []

    def _base(self, settings: QuantizeSettings, pre: Path, recipe: str | None) -> tuple[QdqOptions, list[str]]:
        """The profile's Q/DQ options under ``recipe``, and the nodes the recipe itself keeps in float."""
        if recipe is None:
            return self.qdq_options(settings), []
        if recipe == "transformer":
            return transformer_recipe(self.qdq_options(settings), pre)
        raise ValueError(f"unknown INT8 recipe {recipe!r} for {self.name}")

    def candidates(self, settings: QuantizeSettings, pre: Path, pooled: Path | None,
                   own: QdqOptions | None = None) -> list[tuple[QdqOptions, Path]]:
        """The INT8 recipes worth measuring (at most 3) as (options, graph), the profile's own first.

        Measured on AVX-512 VNNI/AMX (benchmarks/results/ort_int8.md): what decides ORT's INT8 speed is
        which kernels its Q/DQ fusion can use. uint8 activations run every convolution as QLinearConv;
        int8 activations leave the depthwise (and some pointwise) convolutions as DequantizeLinear → float
        Conv → QuantizeLinear, 1.3-3x *slower* than FP32 — so a profile asking for int8 also gets uint8
        measured. torch's dynamo exporter writes SE-block and head pooling as ReduceMean, which ORT runs
        in float between Q/DQ pairs; the same graph with GlobalAveragePool (``spatial_means_as_pools``)
        runs QLinearGlobalAveragePool. Per-tensor weights were as fast or faster on hard-swish nets and
        within noise elsewhere, and are cheap to make (same calibration), so the other granularity is
        measured when there is room. QOperator format (ORT fuses QDQ into the same QLinear kernels),
        excluding depthwise convs (ORT's fusion still ran them as QLinearConv) or SE/hard-swish ops (more
        float ops and Q/DQ pairs), and ORT_ENABLE_EXTENDED (no NCHWc/NHWC layout) never paid, so they are
        not candidates.
        """
        own = own or self.qdq_options(settings)
        out = [(own, pre)]
        if pooled is not None:
            out.append((own, pooled))
        if own.activation_type == "int8":
            out.append((replace(own, activation_type="uint8", extra_options={"ActivationSymmetric": False}),
                        pooled or pre))
        else:
            out.append((replace(own, per_channel=not own.per_channel), pooled or pre))
        return out

    def quantize(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                 exclude: list[str] | None = None, recipe: str | None = None) -> Artifact:
        """Q/DQ INT8; without ``exclude`` the fastest candidate recipe on the target's engine is chosen.

        Every candidate is measured interleaved with the FP32 model (single stream, ``speed_options``:
        the bundle's engine options) and its output error to FP32 on calibration samples is taken; the
        fastest one whose error stays within ``ERROR_TOLERANCE`` of the profile's own recipe wins if it is
        more than ``SPEED_MARGIN`` faster than that recipe (else the profile's own stays), even when slower
        than FP32 — the latency gate then ships FP32. Every candidate's figures go to the artifact's
        ``recipe`` detail. The fallback (``exclude``) reuses the chosen recipe's options.
        ``recipe="transformer"``: the candidates are built on :func:`transformer_recipe`.
        """
        pre = self._preprocessed(src.onnx, workdir)
        x = calib[: settings.calibration_count]
        key = str(pre) + (f"#{recipe}" if recipe else "")
        base, kept = self._base(settings, pre, recipe)
        if exclude or not self.choose_by_speed:
            # the fallback keeps the chosen options on the exporter's graph: its layer names and the
            # sensitivity ranking are those of the model as given (see ``recover``)
            opts = self._chosen.get(key, (base, pre))[0]
            return self._write(pre, x, opts, workdir, exclude, settings, recipe_kept=kept)
        options = self.candidates(settings, pre, self._pooled(pre), own=base)
        arts = [self._write(g, x, o, workdir, None, settings, suffix=self._recipe(o, g), recipe_kept=kept)
                for o, g in options]
        figures = self._measure(src, pre, arts, x)
        own_err = figures[0]["output_error"]
        eligible = [i for i, f in enumerate(figures)
                    if f["output_error"] <= ERROR_TOLERANCE * own_err + ERROR_SLACK]
        own_p50 = figures[0]["p50_ms"]
        faster = [i for i in eligible if figures[i]["p50_ms"] < own_p50 * (1 - SPEED_MARGIN)]
        best = min(faster, key=lambda i: figures[i]["p50_ms"]) if faster else 0
        for i, f in enumerate(figures):
            f["chosen"] = i == best
            f["within_error_tolerance"] = i in eligible
        self._chosen[key] = options[best]
        log.info("ONNX Runtime INT8 recipe: %s", ", ".join(
            f"{f['recipe']} {f['ratio_int8_over_fp32']:.2f}x FP32 time{' (chosen)' if f['chosen'] else ''}"
            for f in figures))
        art = arts[best]
        art.details["recipe"] = {"chosen": figures[best]["recipe"], "candidates": figures,
                                 "measured_with": {"engine": self.engine, **self.speed_options},
                                 "rule": "fastest single-stream p50 whose output error to FP32 is within "
                                         f"{ERROR_TOLERANCE}x (+{ERROR_SLACK}) of {figures[0]['recipe']}'s, if "
                                         f"more than {SPEED_MARGIN:.0%} faster than {figures[0]['recipe']}"}
        return art

    @staticmethod
    def _recipe(opts: QdqOptions, graph: Path) -> str:
        return recipe_name(opts) + ("_pool" if graph.name.endswith(".pools.onnx") else "")

    def _write(self, pre: Path, x: np.ndarray, opts: QdqOptions, workdir: Path, exclude: list[str] | None,
               settings: QuantizeSettings, suffix: str = "", recipe_kept: list[str] | None = None) -> Artifact:
        tag = "-transformer" if opts.op_types else ""
        out = workdir / (f"int8{tag}-x{len(exclude)}" if exclude else f"int8-{suffix}" if suffix else f"int8{tag}")
        write_qdq(pre, out / "model.onnx", x, opts, workdir, exclude=[*(recipe_kept or []), *(exclude or [])])
        return Artifact(out, "model.onnx", ["model.onnx"], "int8",
                        {"format": "QDQ", "per_channel": opts.per_channel, "activation_type": opts.activation_type,
                         "recipe_name": self._recipe(opts, pre),
                         **({"quantized_op_types": list(opts.op_types), "recipe_float_nodes": list(recipe_kept or [])}
                            if opts.op_types else {}),
                         "calibrate_method": settings.calibrate_method, "excluded_nodes": list(exclude or []),
                         "preprocess_fallbacks": self.preprocess_fallbacks(self._preprocessed_of(pre)),
                         "spatial_means_as_pools": pre.name.endswith(".pools.onnx")})

    @staticmethod
    def _preprocessed_of(pre: Path) -> Path:
        return pre.with_name(pre.name.replace(".pools.onnx", ".onnx"))

    def _measure(self, src: SourceModel, pre: Path, arts: list[Artifact], x: np.ndarray) -> list[dict[str, Any]]:
        """p50 of each candidate interleaved with FP32 on this backend's engine, and its output error to FP32."""
        from ..measure import Measurer
        from .base import onnx_signature
        from .sensitivity import _outputs, relative_error

        sig = onnx_signature(src.onnx)
        fp32 = Artifact(src.onnx.parent, src.onnx.name, [src.onnx.name], "fp32")  # what ships as FP32
        m = Measurer(self, sig, self.engine, dict(self.speed_options), dict(self.speed_options))
        models = {"fp32": (fp32, True), **{a.details["recipe_name"]: (a, False) for a in arts}}
        lat = m.latency(models, x, queries=SPEED_QUERIES)
        samples = x[:ERROR_SAMPLES]
        ref = _outputs(pre, samples)
        out = []
        for a in arts:
            name = a.details["recipe_name"]
            out.append({"recipe": name, "p50_ms": round(lat[name]["p50_ms"], 4),
                        "fp32_p50_ms": round(lat["fp32"]["p50_ms"], 4),
                        "ratio_int8_over_fp32": round(lat[name]["p50_ms"] / lat["fp32"]["p50_ms"], 3),
                        "output_error": round(relative_error(ref, _outputs(a.directory / a.main, samples)), 5)})
        return out

    # -- fallback -------------------------------------------------------------
    def recover(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                goal: RecoveryGoal, first: Artifact) -> list[Attempt]:
        """Mixed precision by sensitivity: the fewest layers kept in float (by ONNX node name) that pass the gates."""
        pre = self._preprocessed(src.onnx, workdir)
        x = calib[: settings.calibration_count]
        # the chosen recipe's options, on the exporter's graph (not the pooled rewrite): a quantized pool
        # that reads an outlier tensor would take a place in the ranking that belongs to the layers around it
        opts = self._chosen.get(str(pre), (self.qdq_options(settings), pre))[0]
        ranking = rank_isolated(pre, x, opts, workdir, x[:RANKING_SAMPLES])
        return search_fewest(ranking, settings.max_excluded_nodes,
                             lambda names: self.quantize(src, calib, settings, workdir, exclude=names), goal)
