"""Quantize stage: post-training INT8, held to the quality gates; quantization-aware training, then the
backend's fallback, when it misses them.

Order of attempts: PTQ → the backend's other post-training recipes for this architecture, while none
passes (``recipes()``: ``transformer`` for graphs with attention, see ``backends/attention.py``) → QAT
(``quantize.qat``: ``auto`` runs it only when no post-training attempt passes, ``on`` always; it needs the
training run and keeps every layer INT8) → the backend's ``recover()`` (layers back to float), only while
no attempt passes. Every attempt is measured the same way: its exported artifact
through the device engine (:func:`quality`), never the torch fake-quant model.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ...errors import ConfigError, EdgekitError
from ..backends.base import Artifact
from ..gates import AccuracyCheck, Attempt, FidelityCheck, RecoveryGoal, cosine_per_sample, refuse
from ..state import BuildState

log = logging.getLogger(__name__)

HINT = ("Options: more or better calibration data, quantize.preset: mixed, a larger quantize.max_excluded_nodes, "
        "a looser accuracy.max_accuracy_drop or fidelity.min_cosine, or quantize.enabled: false to ship FP32")


def quality(state: BuildState, art: Artifact, strategy: str, details: dict[str, Any] | None = None,
            retrained: bool = False) -> Attempt:
    """Accuracy and fidelity of ``art`` against the FP32 reference, through the device engine.

    ``retrained``: the artifact's weights were fine-tuned (QAT), so it is a different model from the FP32
    reference by design; where the accuracy budget is checked on labelled data it judges the artifact,
    and its fidelity to the original FP32 is reported without gating (a QAT model that recovers the
    accuracy typically agrees with the old weights at cosine 0.94–0.97, not 0.99).
    """
    results, figures = [], {}
    ref = state.reference
    if state.val is not None:
        acc = AccuracyCheck(state.profile.accuracy, state.labels, state.metric_context())
        value = acc.value(state.measurer.outputs(art, state.val.x, "validation"), state.val.y)
        gate = acc.gate(ref["accuracy"], value)
        figures.update(accuracy=value, drop=gate.value)
        results.append(gate)
    if state.holdout is not None:
        fid = FidelityCheck(state.profile.fidelity)
        more = {name: (fp32, state.measurer.outputs(art, state.holdout, "holdout", output=name))
                for name, fp32 in ref.get("holdout_more_outputs", {}).items()}
        first = state.measurer.outputs(art, state.holdout, "holdout")
        figures["fidelity"] = fid.measure(ref["holdout_outputs"], first, more, first=state.sig.output_name)
        gates = fid.gates(figures["fidelity"])
        selected = (state.cfg.postprocess is not None and state.cfg.postprocess.type == "detections")
        if selected:  # rows after the graph's own NMS: their order and count move with any score, so a cosine
            # between FP32 and INT8 rows measures nothing; the map50 budget on labelled data judges the artifact
            gates = [dataclasses.replace(g, status="not_checked", detail=f"{g.detail}; reported, not gated: the "
                                         f"outputs are boxes after the graph's own NMS, the accuracy budget judges")
                     if g.status != "not_checked" else g for g in gates]
        elif retrained and any(r.name == "accuracy" and r.status != "not_checked" for r in results):
            gates = [dataclasses.replace(g, status="not_checked", detail=f"{g.detail}; reported, not gated: QAT "
                                         f"fine-tuned the weights, the accuracy budget judges this artifact")
                     if g.status != "not_checked" else g for g in gates]
        results += gates
    return Attempt(strategy, art, results, figures, dict(details or {}))


def recovery_goal(state: BuildState, failed: Attempt) -> RecoveryGoal:
    """The one object a backend's fallback works towards: the task metric if it failed, else fidelity."""
    names = {r.name for r in failed.results if r.failed}
    ref = state.reference

    def evaluate(art: Artifact, strategy: str, details: dict[str, Any] | None = None) -> Attempt:
        return quality(state, art, strategy, details)

    if "accuracy" in names:
        acc = AccuracyCheck(state.profile.accuracy, state.labels, state.metric_context())
        sign = 1.0 if acc.metric[1] == "higher" else -1.0
        y = state.val.y
        return RecoveryGoal("accuracy", state.val.x, lambda out, idx: sign * acc.value(out, y[idx]),
                            sign * ref["accuracy"], state.profile.accuracy.max_accuracy_drop, evaluate)
    fp32_out = ref["holdout_outputs"]
    fid = state.profile.fidelity
    if "fidelity.cosine" in names:
        return RecoveryGoal("fidelity.cosine", state.holdout,
                            lambda out, idx: float(cosine_per_sample(fp32_out[idx], out).mean()),
                            1.0, 1.0 - fid.min_cosine, evaluate)
    return RecoveryGoal("fidelity.top1_agreement", state.holdout,
                        lambda out, idx: float((fp32_out[idx].reshape(len(out), -1).argmax(1)
                                                == out.reshape(len(out), -1).argmax(1)).mean()),
                        1.0, 1.0 - fid.min_top1_agreement, evaluate)


class QuantizeStage:
    name = "quantize"

    def run(self, state: BuildState) -> dict[str, Any]:
        if not state.quantize:
            return {"enabled": False}
        q = state.profile.quantize
        art = self._ptq(state, q)
        attempts = [quality(state, art, "ptq", art.details)]
        if not attempts[0].passed:
            attempts += self._recipes(state)
        if q.qat == "on" or (q.qat == "auto" and not any(a.passed for a in attempts)):
            attempts += self._qat(state, attempts[0])
        if not any(a.passed for a in attempts):
            state.progress("quantize: fallback")
            goal = recovery_goal(state, attempts[0])
            attempts += state.compiler.recover(state.src, state.calib.x, q, state.workdir, goal, art)
            # a fallback that could not run at all says why on the artifact it started from: shown with PTQ's attempt
            attempts[0].details.update({k: v for k, v in art.details.items() if k.endswith("_failed")})
        best = max(attempts, key=lambda a: a.score)  # max keeps the first of equals: plain PTQ wins ties
        state.attempts = attempts
        state.chosen = best.artifact
        record_quality(state, best)
        if not best.passed:
            refuse(best.results, state.report,
                   f"Tried {len(attempts)} artifact(s): {describe_attempts(attempts)}. Report: see "
                   f"{state.cfg.output.with_suffix('.report.json')}. {HINT}")
        return {"attempts": len(attempts), "chosen": best.strategy, "passed": best.passed,
                **({"fidelity_cosine": best.figures["fidelity"]["cosine"]} if "fidelity" in best.figures else {})}

    def _ptq(self, state: BuildState, q) -> Any:
        """Post-training INT8. A graph with NMS inside (postprocess: detections) keeps its tail in float: box
        decoding in pixels and the scores NMS ranks lose whole boxes to 8-bit steps (a detector's mAP50 fell
        3.7 points with them quantized, 0.2 without), and nothing after the last weight layer is worth INT8."""
        post = state.cfg.postprocess
        if post is not None and post.type == "detections" and state.src.onnx is not None:
            tail = float_tail(state.src.onnx)
            try:
                art = state.compiler.quantize(state.src, state.calib.x, q, state.workdir, exclude=tail)
                art.details["kept_in_float"] = f"the {len(tail)} nodes after the last weight layer (decode and NMS)"
                return art
            except NotImplementedError:  # TFLite has no per-node exclusion: the gate judges the whole graph
                log.info("the %s compiler cannot keep the NMS tail in float; quantizing the whole graph",
                         state.compiler.name)
        return state.compiler.quantize(state.src, state.calib.x, q, state.workdir)

    def _recipes(self, state: BuildState) -> list[Attempt]:
        """The backend's post-training recipes for this architecture, in order, until one passes every gate."""
        out: list[Attempt] = []
        for recipe in state.compiler.recipes(state.src):
            state.progress(f"quantize: {recipe} recipe")
            art = state.compiler.quantize(state.src, state.calib.x, state.profile.quantize, state.workdir,
                                          recipe=recipe)
            out.append(quality(state, art, f"ptq_{recipe}", {**art.details, "post_training_recipe": recipe}))
            log.info("INT8 recipe %s: %s", recipe, "passes" if out[-1].passed else "fails too")
            if out[-1].passed:
                break
        return out

    def _qat(self, state: BuildState, ptq: Attempt) -> list[Attempt]:
        """Quantization-aware training, measured like PTQ; the report's ``qat`` section puts both side by side.

        ``auto`` without what QAT needs records why it was skipped and lets the fallback run; ``on`` refuses.
        """
        q = state.profile.quantize
        why = "post-training INT8 failed " + ", ".join(r.name for r in ptq.results if r.failed) \
            if not ptq.passed else "quantize.qat: on"
        section: dict[str, Any] = {"mode": q.qat, "why": why, "ptq": summarize(ptq)}
        state.report["qat"] = section
        blocker = qat_blocker(state)
        if blocker is not None:
            if q.qat == "on":
                raise ConfigError(f"quantize.qat: on, but {blocker}. Compile the run folder (edgekit compile "
                                  f"runs/NAME), or set finetune.run: runs/NAME in the build file; or --qat off")
            log.warning("quantization-aware training skipped: %s", blocker)
            section.update(ran=False, skipped=blocker)
            return []
        from ...compress.finetune import FinetuneContext
        from ...compress.qat import QATJob, quantization_aware_training

        state.progress("quantize: qat")
        work = state.workdir / "qat"
        work.mkdir(parents=True, exist_ok=True)
        job = QATJob(state.src.torch, FinetuneContext.load(state.cfg.finetune, work), state.calib.x, q, work, state.sig)
        try:
            art = quantization_aware_training(state.compiler.name, job)
        except EdgekitError:
            raise  # the user's to fix or their interruption: the build stops
        except Exception as exc:  # a library that cannot trace, quantize or convert this model
            if q.qat == "on":
                raise
            # auto: QAT is one of the ways to a passing artifact; its failure is reported, and the fallback runs
            log.warning("quantization-aware training failed (%s: %s); trying the backend's fallback",
                        type(exc).__name__, exc)
            section.update(ran=False, failed=f"{type(exc).__name__}: {exc}")
            return []
        attempt = quality(state, art, "qat", art.details, retrained=True)
        section.update(ran=True, qat=summarize(attempt), epochs=art.details["epochs"],
                       seconds=art.details["seconds"], method=art.details.get("method"),
                       finetune=art.details.get("finetune"))
        return [attempt]


def qat_blocker(state: BuildState) -> str | None:
    """Why quantization-aware training cannot run on this build (None: it can)."""
    import torch

    if state.cfg.finetune.run is None:
        return "QAT fine-tunes with the training run and no run is known (finetune.run is not set)"
    model = state.src.torch if state.src is not None else None
    if not isinstance(model, torch.nn.Module):
        return (f"QAT trains the torch module, and {state.cfg.model.source} "
                f"{'is an ONNX file' if model is None else 'is a torch.export program'}")
    return None


def summarize(a: Attempt) -> dict[str, Any]:
    """An attempt's figures for the report's ``qat`` section: accuracy, drop, fidelity, verdict."""
    out: dict[str, Any] = {"passed": a.passed}
    if "accuracy" in a.figures:
        out.update(accuracy=a.figures["accuracy"], drop_pts=a.figures["drop"])
    if "fidelity" in a.figures:
        out["fidelity"] = {k: a.figures["fidelity"][k] for k in ("cosine", "cosine_min", "top1_agreement")}
    out["failed_gates"] = [r.name for r in a.results if r.failed]
    return out


def describe_attempts(attempts: list[Attempt]) -> str:
    parts = []
    for a in attempts:
        kept = (a.details.get("excluded_layers") or a.details.get("excluded_nodes") or a.details.get("ignored")
                or a.details.get("reverted_layers"))  # excluded_layers: a backend's readable form of its node names
        parts.append(a.strategy + (f" (kept in float: {', '.join(map(str, kept))})" if kept else ""))
    return "; ".join(parts)


def record_quality(state: BuildState, best: Attempt) -> None:
    """The report's accuracy/fidelity sections for the artifact the quantize stage settled on."""
    acc = state.report["accuracy"]
    acc["attempts"] = [a.to_dict() for a in state.attempts]
    if "accuracy" in best.figures:
        acc.update(int8=best.figures["accuracy"], drop_pts=best.figures["drop"],
                   int8_measured_with={"engine": state.measurer.engine, **state.measurer.deploy_options})
    if "fidelity" in best.figures:
        state.report["fidelity"] = {**best.figures["fidelity"], "source": "held-back calibration samples"}
    state.gates = list(best.results)


WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def float_tail(onnx_path) -> list[str]:
    """The nodes from which no weight layer can be reached: a detector's head reshapes, box decoding, score
    selection and NMS — what follows the last Conv/Gemm/MatMul."""
    import onnx

    nodes = list(onnx.load(str(onnx_path), load_external_data=False).graph.node)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    feeds_weights = [False] * len(nodes)
    for i in reversed(range(len(nodes))):  # ONNX nodes are topologically sorted: consumers come later
        feeds_weights[i] = any(nodes[c].op_type in WEIGHT_OPS or feeds_weights[c]
                               for out in nodes[i].output for c in consumers.get(out, []))
    return [n.name for i, n in enumerate(nodes) if n.name and n.op_type not in WEIGHT_OPS and not feeds_weights[i]]

