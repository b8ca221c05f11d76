"""Quantize stage: post-training INT8, held to the quality gates; the backend's fallback when it misses them."""

from __future__ import annotations

from typing import Any


from ..backends.base import Artifact
from ..gates import AccuracyCheck, Attempt, FidelityCheck, RecoveryGoal, cosine_per_sample, refuse
from ..state import BuildState

HINT = ("Options: more or better calibration data, quantize.preset: mixed, a larger quantize.max_excluded_nodes, "
        "a looser accuracy.max_accuracy_drop or fidelity.min_cosine, or quantize.enabled: false to ship FP32")


def quality(state: BuildState, art: Artifact, strategy: str, details: dict[str, Any] | None = None) -> Attempt:
    """Accuracy and fidelity of ``art`` against the FP32 reference, through the device engine."""
    results, figures = [], {}
    ref = state.reference
    if state.val is not None:
        acc = AccuracyCheck(state.profile.accuracy, state.labels)
        value = acc.value(state.measurer.outputs(art, state.val.x, "validation"), state.val.y)
        gate = acc.gate(ref["accuracy"], value)
        figures.update(accuracy=value, drop=gate.value)
        results.append(gate)
    if state.holdout is not None:
        fid = FidelityCheck(state.profile.fidelity)
        figures["fidelity"] = fid.measure(ref["holdout_outputs"], state.measurer.outputs(art, state.holdout, "holdout"))
        results += fid.gates(figures["fidelity"])
    return Attempt(strategy, art, results, figures, dict(details or {}))


def recovery_goal(state: BuildState, failed: Attempt) -> RecoveryGoal:
    """The one object a backend's fallback works towards: the task metric if it failed, else fidelity."""
    names = {r.name for r in failed.results if r.failed}
    ref = state.reference

    def evaluate(art: Artifact, strategy: str, details: dict[str, Any] | None = None) -> Attempt:
        return quality(state, art, strategy, details)

    if "accuracy" in names:
        acc = AccuracyCheck(state.profile.accuracy, state.labels)
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
        art = state.compiler.quantize(state.src, state.calib.x, q, state.workdir)
        attempts = [quality(state, art, "ptq", art.details)]
        if not attempts[0].passed:
            state.progress("quantize: fallback")
            goal = recovery_goal(state, attempts[0])
            attempts += state.compiler.recover(state.src, state.calib.x, q, state.workdir, goal, art)
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


def describe_attempts(attempts: list[Attempt]) -> str:
    parts = []
    for a in attempts:
        kept = a.details.get("excluded_nodes") or a.details.get("ignored") or a.details.get("reverted_layers")
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


