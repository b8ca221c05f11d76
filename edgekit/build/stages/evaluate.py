"""Evaluate stage: latency of INT8 and FP32 on the target's engine, the latency and size gates, what ships."""

from __future__ import annotations

import logging
import os
from typing import Any

from edgekit_runtime.bench import system_description

from ..gates import AccuracyCheck, GateResult, LatencyCheck, latency_not_representative, refuse, size_gate
from ..state import BuildState

log = logging.getLogger(__name__)

# INT8 this much slower than FP32 on a host that does not represent the device is worth a warning (the
# latency gate cannot judge it there): a difference of kernels, not of hosts (TFLite's int16-activation
# kernels are reference code: a ViT-B/32 with int16 activations ran 18x slower than FP32 on x86)
UNGATED_SLOWDOWN_WARNING = 2.0


class EvaluateStage:
    name = "evaluate"

    def run(self, state: BuildState) -> dict[str, Any]:
        profile, m = state.profile, state.measurer
        x = (state.val or state.calib).x if (state.val or state.calib) else state.probe
        check = LatencyCheck(profile.latency, profile.limits,
                             latency_not_representative(profile.device.arch, profile.device.family,
                                                        state.backend.engine, m.engine))
        arts = {state.chosen.precision: (state.chosen, False)}
        if state.chosen is not state.fp32:
            arts["fp32"] = (state.fp32, True)
        figures = m.latency(arts, x)
        results: list[GateResult] = []
        if "fp32" in arts:
            speed = check.speedup_gate(figures["fp32"], figures[state.chosen.precision])
            if speed.failed:
                # one slow run on a busy host is not a verdict: measure again, interleaved, and use that
                figures = m.latency(arts, x)
                speed = check.speedup_gate(figures["fp32"], figures[state.chosen.precision])
            results.append(speed)
            if speed.ships_fp32:
                state.chosen = state.fp32
        chosen = figures[state.chosen.precision]
        for gate in (check.budget_gate(chosen), size_gate(profile.limits, state.chosen.size_bytes())):
            if gate is not None:
                results.append(gate)
        state.gates += results
        state.latency = {
            "measured_on": system_description(), "engine": m.engine, "batch": 1,
            "threads": profile.runtime.threads or f"engine default ({os.cpu_count()} cores)",
            "interleaved": len(arts) > 1, **figures,
            "speedup": (figures["fp32"]["p50_ms"] / figures["int8"]["p50_ms"]) if "int8" in figures else None,
            "gated": check.not_representative is None and len(arts) > 1,
            "not_gated_reason": check.not_representative,
        }
        if (warning := slow_ungated_warning(state.latency, state.chosen.details)) is not None:
            state.latency["warning"] = warning
            log.warning("%s", warning)
        state.report["latency_ms"] = state.latency
        if state.chosen is state.fp32 and state.val is not None:
            acc = AccuracyCheck(profile.accuracy, state.labels, state.metric_context())
            state.report["accuracy"]["deployed"] = acc.value(m.outputs(state.fp32, state.val.x, "validation"),
                                                             state.val.y)
        state.report["gates"] = [g.to_dict() for g in state.gates]
        refuse(results, state.report, "Change the profile's latency/limits settings, or compile for another target.")
        return {"ships": state.chosen.precision, "p50_ms": chosen["p50_ms"],
                **({"int8_speedup": state.latency["speedup"]} if state.latency["speedup"] else {})}


def slow_ungated_warning(latency: dict[str, Any], details: dict[str, Any]) -> str | None:
    """A warning when INT8 ships, the latency gate could not judge it (this host is not the device), and INT8
    ran :data:`UNGATED_SLOWDOWN_WARNING` times slower than FP32 here or worse."""
    speedup = latency.get("speedup")
    if latency.get("gated") or not latency.get("not_gated_reason") or not speedup \
            or 1 / speedup < UNGATED_SLOWDOWN_WARNING or "int8" not in latency:
        return None
    activations = details.get("activations")
    why = (f" (its activations are {activations}: such kernels are often unoptimized reference code)"
           if activations and activations != "int8" else "")
    return (f"INT8 ran {1 / speedup:.1f}x slower than FP32 on this host{why}; the host does not represent the "
            f"device, so the latency gate did not judge it: time both on the device (edgekit bench) before "
            f"shipping, or ship FP32 (quantize.enabled: false)")
