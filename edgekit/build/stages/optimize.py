"""Optimize stage: compression passes (pruning, distillation) from the torch model to a smaller torch model.

Runs only when the build names passes (``optimize:`` or ``--prune-ratio``/``--distill-from``). Each
pass changes ``state.src``; the pruned model is exported to ONNX again (checked against torch),
saved whole as ``<output stem>.optimized.pt2`` next to the bundle, and the rest of the build
(export, INT8, gates, package) runs on it as on any model. The report records, per pass, what it
did and measured: parameters, MACs, ONNX size, the task metric on the run's validation split and
FP32 p50 latency on the target's evaluation engine, before and after.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

from ...compress.prune import save_program
from ...config.build import DistillPass, PrunePass
from ...errors import ConfigError, GateError
from ...models.importer import check_onnx, compare_with_torch, export_onnx
from ..backends.base import SourceModel, onnx_signature
from ..measure import Measurer
from ..state import BuildState
from .export import evaluation_engine

log = logging.getLogger(__name__)


def optimized_program_path(output: Path) -> Path:
    """``build/model.ekb`` → ``build/model.optimized.pt2``: the optimized model, kept after the build."""
    return output.with_name(f"{output.stem}.optimized.pt2")


class OptimizeStage:
    name = "optimize"

    def run(self, state: BuildState) -> dict[str, Any]:
        cfg = state.cfg
        if not cfg.optimize:
            return {"passes": []}
        import torch

        model = state.src.torch if state.src is not None else None
        if model is None:
            raise ConfigError(f"the optimize passes ({', '.join(p.kind for p in cfg.optimize)}) need the torch model; "
                              f"{cfg.model.source} is an ONNX file: compile the run folder, a module:factory or "
                              f"the model's .pt2 instead")
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"the optimize passes need a trainable torch module; {cfg.model.source} is a "
                              f"torch.export program: compile the run folder or a module:factory instead")
        work = state.workdir / "optimize"
        work.mkdir(parents=True, exist_ok=True)
        original = copy.deepcopy(model).eval()  # "self" teacher, and the before-figures of the first pass
        model = copy.deepcopy(model)  # the user's module (a factory's) stays as it was
        example = torch.zeros(list(cfg.model.input_shape), dtype=torch.float32)
        ctx = self._context(state, work)
        passes = []
        src = state.src
        for i, step in enumerate(cfg.optimize):
            t0 = time.perf_counter()
            state.progress(f"optimize: {step.kind}")
            before = self._figures(state, model, example, src.onnx, ctx)
            if step.kind == "prune":
                did = self._prune(state, model, example, step.prune, ctx, work / f"pass{i}")
            else:
                did = self._distill(state, model, original, step.distill, ctx, work / f"pass{i}")
            onnx_path = work / f"pass{i}" / "model.onnx"
            export_onnx(model, cfg.model, onnx_path)
            check_onnx(onnx_path)
            diff = compare_with_torch(model, onnx_path, state.probe, cfg.export.atol)
            new_src = SourceModel(onnx_path, model, list(cfg.model.input_shape))
            after = self._figures(state, model, example, onnx_path, ctx)
            latency = self._latency(state, {"before": src, "after": new_src}, work / f"pass{i}")
            passes.append({"pass": step.kind, "settings": step.settings.model_dump(mode="json", by_alias=True),
                           **did, "before": {**before, **latency["before"]}, "after": {**after, **latency["after"]},
                           "latency_measured_with": latency["engine"],
                           "max_abs_diff_vs_torch": diff, "seconds": round(time.perf_counter() - t0, 3)})
            src = new_src
        pt2 = save_program(model, example, optimized_program_path(cfg.output), cfg.model.dynamic_batch)
        state.src = src
        state.sig = onnx_signature(src.onnx)
        first, last = passes[0]["before"], passes[-1]["after"]
        summary = {
            "passes": passes, "program": str(pt2),
            "macs_reduction": round(first["macs"] / max(1, last["macs"]), 3),
            "params_reduction": round(first["params"] / max(1, last["params"]), 3),
        }
        state.report["optimize"] = {"passes": [{"pass": p["pass"], **p["settings"]} for p in passes],
                                    "program": str(pt2), "macs_reduction": summary["macs_reduction"],
                                    "params_reduction": summary["params_reduction"],
                                    "metric": {"name": first.get("metric_name"), "before": first.get("metric"),
                                               "after": last.get("metric")}}
        return summary

    # ------------------------------------------------------------------ passes
    def _context(self, state: BuildState, work: Path):
        """The run to fine-tune with, when some pass needs it (None otherwise)."""
        from ...compress.finetune import FinetuneContext

        needs = []
        for step in state.cfg.optimize:
            s = step.settings
            if isinstance(s, PrunePass) and (s.finetune_epochs > 0 or s.importance == "taylor"):
                needs.append("prune (finetune_epochs > 0" + (", importance: taylor)" if s.importance == "taylor"
                                                             else ")"))
            elif isinstance(s, DistillPass):
                needs.append("distill")
        if not needs:
            return FinetuneContext.load(state.cfg.finetune, work) if state.cfg.finetune.run else None
        if state.cfg.finetune.run is None:
            raise ConfigError(f"{', '.join(needs)} fine-tunes with the training run: add 'finetune: {{run: "
                              f"runs/NAME}}' to the build file (compiling a run folder sets it), or set "
                              f"finetune_epochs: 0")
        return FinetuneContext.load(state.cfg.finetune, work)

    def _prune(self, state: BuildState, model, example, s: PrunePass, ctx, work: Path) -> dict[str, Any]:
        from ...compress.finetune import finetune
        from ...compress.prune import channel_counts, prune

        round_to = s.round_to or state.profile.optimize.round_to
        search = None
        if s.ratio == "auto":
            search = self._search_ratio(state, model, example, s, round_to, work / "search")
            if search["chosen"] == 0:  # the unpruned model meets the budget: nothing to remove
                return {"round_to": round_to, "search": search, "skipped": search["why"],
                        "channels": channel_counts(model)}
            s = s.model_copy(update={"ratio": search["chosen"]})
        epochs = _split(s.finetune_epochs, s.iterations)

        def between(step: int, steps: int) -> dict[str, Any] | None:
            if ctx is None or epochs[step] == 0:
                return None
            return finetune(ctx, model, epochs[step], name=f"{work.name}-step{step + 1}")

        result = prune(model, example, s, round_to,
                       gradients=ctx.accumulate_gradients if ctx is not None else None, between_steps=between)
        return {"round_to": round_to, "ratio": s.ratio, **({"search": search} if search else {}),
                "head": result.head, "ignored": result.ignored, "notes": result.notes,
                "finetune_epochs": epochs, "steps": result.steps, "channels": channel_counts(model)}

    def _search_ratio(self, state: BuildState, model, example, s: PrunePass, round_to: int,
                      work: Path) -> dict[str, Any]:
        """The least prune ratio whose deployed artifact meets ``limits.latency_budget_ms``, by measurement.

        ``search_points`` ratios from 0 to ``max_ratio`` are pruned (one step, no fine-tuning: latency
        depends on the channel counts, not on the weights), exported, quantized as the build will
        quantize them (INT8 PTQ, or FP32 when quantize is off), and timed in one interleaved run on the
        target's engine, so that every ratio sees the same machine. The budget is a p99, as the device's
        health check holds it; a ratio is chosen when it and every larger ratio measured meet it (one
        noisy fast run does not pick a ratio that a larger one contradicts).
        """
        from ...compress.prune import count, prune

        budget = state.profile.limits.latency_budget_ms
        if budget is None:
            raise ConfigError("prune ratio 'auto' searches for the least ratio that meets the latency budget: set "
                              "limits.latency_budget_ms in the build file or the target profile "
                              "(or --latency-budget-ms), or give a ratio")
        n = s.search_points
        ratios = [round(s.max_ratio * k / (n - 1), 4) for k in range(n)]
        candidates: dict[str, SourceModel] = {}
        shapes: dict[str, dict[str, Any]] = {}
        for r in ratios:
            name = f"r{r:g}"
            state.progress(f"optimize: latency search, ratio {r:g}")
            m = copy.deepcopy(model)
            if r > 0:
                prune(m, example, s.model_copy(update={"ratio": r, "iterations": 1}), round_to)
            path = work / name / "model.onnx"
            export_onnx(m, state.cfg.model, path)
            candidates[name] = SourceModel(path, m, list(state.cfg.model.input_shape))
            shapes[name] = count(m, example)
        measured = self._measure(state, candidates, work, queries=200)
        timed = measured["figures"][measured["precision"]]
        probes = [{"ratio": r, **shapes[f"r{r:g}"], **timed[f"r{r:g}"],
                   "meets_budget": timed[f"r{r:g}"]["p99_ms"] <= budget} for r in ratios]
        chosen = least_ratio(probes)
        result = {"budget_ms": budget, "percentile": "p99", "precision": measured["precision"],
                  "engine": measured["engine"], "probes": probes, "chosen": chosen}
        if chosen is None:
            best = probes[-1]
            state.report.setdefault("optimize", {})["search"] = result
            raise GateError(
                f"no prune ratio up to {s.max_ratio} meets the latency budget: at ratio {best['ratio']} the "
                f"{measured['precision']} p99 is {best['p99_ms']:.3f} ms on {measured['engine']} "
                f"(limits.latency_budget_ms {budget})", state.report,
                hint="raise max_ratio, relax limits.latency_budget_ms, or compile a smaller model")
        result["why"] = (f"the unpruned model's {measured['precision']} p99 {probes[0]['p99_ms']:.3f} ms meets "
                         f"the budget of {budget} ms" if chosen == 0 else
                         f"least ratio whose {measured['precision']} p99 meets {budget} ms")
        log.info("prune ratio search: %s (ratio %s)", result["why"], chosen)
        return result

    def _distill(self, state: BuildState, model, original, s: DistillPass, ctx, work: Path) -> dict[str, Any]:
        from ...compress.finetune import finetune
        from ...train.distill import KD, freeze, load_teacher

        meta = ctx.setup.meta
        if s.teacher == "self":  # the model before the optimize passes: a pruned student learns from its unpruned self
            teacher = freeze(copy.deepcopy(original))
        else:
            teacher = load_teacher(s.teacher, list(state.cfg.model.input_shape[1:]), meta["out_dim"],
                                   labels=meta["labels"] if ctx.setup.task.classifies else None,
                                   preprocess=meta["preprocess"])
        kd = KD(temperature=s.temperature, alpha=s.alpha, features=s.features)
        ran = finetune(ctx, model, s.epochs, teacher=teacher, distill=kd, name=work.name)
        return {"teacher": s.teacher, "finetune": ran}

    # ------------------------------------------------------------------ figures
    def _figures(self, state: BuildState, model, example, onnx_path: Path, ctx) -> dict[str, Any]:
        from ...compress.prune import count

        figures: dict[str, Any] = {**count(model, example), "onnx_bytes": Path(onnx_path).stat().st_size}
        if ctx is not None:
            figures.update(metric_name=ctx.metric, metric=round(ctx.evaluate(model), 4),
                           metric_on=f"{ctx.run.name} validation split (torch)")
        elif state.val is not None and state.profile.accuracy.metric == "top1":
            import torch

            with torch.no_grad():
                out = model.eval()(torch.from_numpy(state.val.x)).numpy()
            figures.update(metric_name="accuracy", metric=round(float((out.argmax(1) == state.val.y).mean() * 100), 4),
                           metric_on=f"{state.val.source} (torch)")
        return figures

    def _latency(self, state: BuildState, models: dict[str, SourceModel], work: Path) -> dict[str, Any]:
        """FP32 and deployed-precision (INT8) p50 of each model on the target's engine, in one interleaved run."""
        precisions = ("fp32", "int8") if state.quantize else ("fp32",)
        measured = self._measure(state, models, work, queries=50, precisions=precisions)
        out: dict[str, Any] = {k: {f"{p}_p50_ms": measured["figures"][p][k]["p50_ms"] for p in precisions}
                               for k in models}
        out["engine"] = measured["engine"]
        return out

    def _measure(self, state: BuildState, models: dict[str, SourceModel], work: Path, queries: int,
                 precisions: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Each model compiled for the target in each of ``precisions`` (default: the one the build ships; INT8
        is PTQ as the build quantizes) and timed single-stream on the target's evaluation engine, all of them
        interleaved in one run. ``figures[precision][model]`` holds p50 and p99."""
        compiler, profile = state.compiler, state.profile
        precisions = precisions or (("int8" if state.quantize else "fp32"),)
        engine = evaluation_engine(profile, state.backend.engine)
        arts = {}
        for precision in precisions:
            for name, src in models.items():
                folder = _fresh(work / f"{precision}-{name}")
                # FP32 with the reference options (OpenVINO: f32 even on bf16 CPUs), INT8 with the bundle's
                arts[(precision, name)] = (compiler.fp32(src, folder) if precision == "fp32" else
                                           compiler.quantize(src, state.calib.x, profile.quantize, folder),
                                           precision == "fp32")
        sig = onnx_signature(next(iter(models.values())).onnx)
        measurer = Measurer(compiler, sig, engine, compiler.reference_options(profile.runtime),
                            compiler.deploy_options(profile.runtime, sig))
        res = measurer.latency({f"{p}:{n}": v for (p, n), v in arts.items()}, state.probe, queries=queries)
        figures = {p: {n: {"p50_ms": round(res[f"{p}:{n}"]["p50_ms"], 4), "p99_ms": round(res[f"{p}:{n}"]["p99_ms"], 4)}
                       for n in models} for p in precisions}
        return {"figures": figures, "engine": engine, "precision": precisions[0] if len(precisions) == 1 else None}


def least_ratio(probes: list[dict[str, Any]]) -> float | None:
    """The least ratio (probes in increasing ratio) that meets the budget together with every larger ratio."""
    for i, probe in enumerate(probes):
        if all(p["meets_budget"] for p in probes[i:]):
            return probe["ratio"]
    return None


def _split(total: int, steps: int) -> list[int]:
    """``total`` epochs over ``steps`` steps, the remainder to the last ones (5 over 2: [2, 3])."""
    base, extra = divmod(total, steps)
    return [base + (1 if i >= steps - extra else 0) for i in range(steps)]


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
