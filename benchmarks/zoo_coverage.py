"""Zoo coverage: every torchvision classification model through every target, the way a user brings one.

For every classification constructor in ``torchvision.models`` (``list_models(module=torchvision.models)``):

1. **Model**: random weights (``weights=None``, ``torch.manual_seed(0)``) at a small input (64×64; the
   ViTs, inception_v3 and maxvit_t at the sizes ``benchmarks/prune_zoo.py`` gives them). BatchNorm
   statistics are re-estimated on real image crops (scikit-learn's two sample photos; no downloads).
   Layers the constructor zero-initializes (ViT's head) get default random weights, else the model
   answers 0 to everything and the fidelity gate compares zeros.
2. **ONNX file**: exported with the build's own exporter (``export_onnx`` + ``check_onnx``) with a dynamic
   batch, or with batch 1 where the dynamic export fails, as a user would hand it to ``edgekit compile``.
3. **Compile** for each target through the build pipeline ``edgekit compile`` runs, with the overrides
   the CLI makes of::

       edgekit compile MODEL.onnx --target T --preprocess imagenet --calibration CROPS/ --no-accuracy-check

   (the preprocessing preset, a folder of JPEG crops written to a temporary folder, INT8 on, no labels:
   the fidelity gate — cosine of INT8 to FP32 on held-back calibration samples — decides INT8, and the
   latency gate decides what ships). Targets: ``x86-openvino-cpu``, ``onnxruntime-cpu``,
   ``android-arm64-tflite`` and ``jetson-orin-nano``. Without TensorRT on this host the Jetson build
   still writes its bundle (Q/DQ ONNX + calibration cache; the engine is built on the device), measured
   with ONNX Runtime on the host CPU: its figures say the bundle builds, not how fast the device runs it.

Per model × target the row says whether a bundle was written, what ships (INT8 within the fidelity
gate, or the strategy the build ended on: mixed precision, FP32 …), the cosine, the host p50 of FP32 and
INT8 and the speed-up from the build report's latency gate, the bundle size, and for every failure the
edgekit error (exit code, type, first line of its message). An exception that is not an
``EdgekitError`` is a bug (a bare traceback for the user): it is recorded with its type and last frame
and counted apart.

The export and each target's compile run in a forked child with a time limit (``--timeout``), so one that
hangs or runs out of memory fails alone. Times are the children's process CPU seconds (the machine may be
shared); the host p50s come from the build's own interleaved latency run and are noisy on a busy machine.
Run from anywhere::

    .venv/bin/python benchmarks/zoo_coverage.py [--models resnet18,vit_b_32] [--quick] [--resume]
    .venv/bin/python benchmarks/zoo_coverage.py --markdown-only

Writes ``--out``/zoo_coverage.json and zoo_coverage.md after every model (a stopped run keeps its rows;
``--resume`` continues it, ``--models`` re-runs a few and merges them).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import resource
import shlex
import shutil
import sys
import tempfile
import traceback
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import log  # noqa: E402
from benchmarks.prune_zoo import QUICK, build_kwargs, images, reestimate_bn, system  # noqa: E402
from benchmarks.prune_zoo import versions as prune_zoo_versions  # noqa: E402

TARGETS = ("x86-openvino-cpu", "onnxruntime-cpu", "android-arm64-tflite", "jetson-orin-nano")
SIDE = 64
BN_IMAGES, CALIB_IMAGES = 64, 96
PRESET = "imagenet"
# Targets whose host figures (latency, speed-up) stand for another engine than the device's.
HOST_CAVEAT = {
    "android-arm64-tflite": "host p50 is the LiteRT interpreter on this x86 CPU, not an arm64 phone",
    "jetson-orin-nano": "no TensorRT on this host: the bundle is built (Q/DQ ONNX + calibration cache, engine "
                        "built on the device) and measured with ONNX Runtime on the host CPU",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="", help="comma-separated constructor names (default: the whole zoo)")
    p.add_argument("--quick", action="store_true", help="one (the smallest) model per family")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated target profiles")
    p.add_argument("--side", type=int, default=SIDE, help="input side for the models that accept it")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    p.add_argument("--timeout", type=float, default=600, help="seconds (wall clock) one export or one compile may take")
    p.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    p.add_argument("--resume", action="store_true", help="run only the cells the JSON lacks (or that timed out or died)")
    p.add_argument("--markdown-only", action="store_true", help="only re-render zoo_coverage.md from the JSON")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- children
def describe_failure(exc: BaseException) -> dict[str, Any]:
    """What a user would see: an edgekit error (code, type, first line), or a bug (a bare traceback)."""
    from edgekit.errors import ExitCode, exit_code_for_runtime_code

    first = common_first_line(str(exc))
    # by class name: the child re-imports edgekit (see _child), so a class captured before is another object
    bases = {c.__name__ for c in type(exc).__mro__}
    if bases & {"EdgekitError", "RuntimeErrorBase"}:
        code = (ExitCode(int(exc.exit_code)) if "EdgekitError" in bases
                else exit_code_for_runtime_code(getattr(exc, "code", None)))
        text = common_first_line(str(exc).replace("\n", " "), 2000)
        # the gates put what to do into the message ("Options: …") rather than into the hint
        todo = getattr(exc, "hint", None) or (text[text.index("Options:"):] if "Options:" in text else None)
        out = {"kind": "error", "exit_code": int(code), "code": code.name, "type": type(exc).__name__,
               "message": first, "hint": todo}
        report = getattr(exc, "report", None)
        if isinstance(report, dict):  # a gate refused: the model converted, and this is how close INT8 came
            fid = report.get("fidelity") or {}
            out.update(best_cosine=fid.get("cosine"), min_cosine=fid.get("min_cosine"),
                       attempts=[{"strategy": a.get("strategy"), "cosine": (a.get("fidelity") or {}).get("cosine")}
                                 for a in (report.get("accuracy") or {}).get("attempts", [])])
        return out
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    where = f"{_short_path(last.filename)}:{last.lineno} in {last.name}" if last else ""
    # the deepest frame inside edgekit: where a fix (or an error translation) belongs
    ours = next((f for f in reversed(frames) if "/edgekit/" in f.filename), None)
    return {"kind": "bug", "type": type(exc).__name__, "message": first, "where": where,
            "edgekit_frame": f"{_short_path(ours.filename)}:{ours.lineno} in {ours.name}" if ours else "",
            "traceback": "".join(traceback.format_exception(exc))[-3000:]}


def common_first_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of a message, without terminal colour codes, at most ``limit`` characters."""
    import re

    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return next((line.strip() for line in plain.splitlines() if line.strip()), "")[:limit]


def _short_path(path: str) -> str:
    for marker in ("/site-packages/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _child(fn: Callable[[], dict[str, Any]], conn) -> None:
    import logging

    # edgekit as it is on disk now, not as the parent imported it hours ago (a long run on a working tree)
    for name in [m for m in sys.modules if m.split(".")[0] in ("edgekit", "edgekit_runtime")]:
        del sys.modules[name]
    logging.basicConfig(level=logging.WARNING)
    try:
        out = {"ok": True, **fn()}
    except BaseException as exc:  # the parent records why and goes on
        out = {"ok": False, "failure": describe_failure(exc)}
    conn.send(out)
    conn.close()


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_isolated(fn: Callable[[], dict[str, Any]], timeout: float) -> dict[str, Any]:
    """``fn()`` in a forked child within ``timeout`` seconds; its result plus the child's CPU seconds."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    cpu0 = _children_cpu()
    proc = ctx.Process(target=_child, args=(fn, child))
    proc.start()
    child.close()
    out, answered = None, parent.poll(timeout)
    if answered:
        try:
            out = parent.recv()
        except EOFError:  # the child died without a word
            out = None
        proc.join(10)  # a child that answered but hangs on its way out gets 10 s
    if proc.is_alive():
        proc.kill()
        proc.join()
    if not answered:
        out = {"ok": False, "failure": {"kind": "timeout", "message": f"not finished in {timeout:.0f} s"}}
    if out is None:
        out = {"ok": False, "failure": {"kind": "died", "message": f"the child died (exit code {proc.exitcode}: "
                                                                   f"out of memory?)"}}
    out["cpu_s"] = round(_children_cpu() - cpu0, 1)
    return out


# ----------------------------------------------------------------------------- export
def reinit_zero_layers(model) -> list[str]:
    """Linear/conv layers whose weights the constructor sets to zero (ViT's classification head), reset to
    torch's default random init: with random weights elsewhere such a model answers 0 for every input, and
    the fidelity gate would compare zeros with zeros (cosine 1.0, INT8 "within the gate" by construction)."""
    import torch

    names = []
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and weight is not None and not torch.count_nonzero(weight):
            m.reset_parameters()
            names.append(name)
    return names


def build_model(name: str, side_arg: int, threads: int):
    """The random-weight model with re-estimated BatchNorm statistics, its constructor arguments and input
    side, and the zero-initialized layers it re-drew."""
    import torch
    import torchvision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kwargs, side = build_kwargs(name, side_arg)
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    zeroed = reinit_zero_layers(model)
    reestimate_bn(model, images(BN_IMAGES, 2, side))
    return model, kwargs, side, zeroed


def int8_reference(model, side: int) -> dict[str, Any]:
    """:func:`simulate_int8` on the crops ``write_calibration`` saves (in float), held back as the build does."""
    from edgekit.config.target import FidelityGate

    x = images(CALIB_IMAGES, 1, side)
    held = min(FidelityGate().samples, len(x) // 5)  # what the build's fidelity gate holds back: the last ones
    return simulate_int8(model, x[: len(x) - held], x[len(x) - held:])


def reference_only(name: str, side_arg: int, threads: int) -> dict[str, Any]:
    """The INT8 reference of a model whose row predates it (no export, no compile)."""
    model, _, side, _ = build_model(name, side_arg, threads)
    return {"int8_reference": int8_reference(model, side)}


def export_model(name: str, side_arg: int, threads: int, work: Path) -> dict[str, Any]:
    """The model with re-estimated BatchNorm statistics as ``work``/NAME.onnx (dynamic batch, else batch 1)."""
    from edgekit.config.build import ModelSource
    from edgekit.errors import ModelImportError
    from edgekit.models.importer import check_onnx, export_onnx

    model, kwargs, side, zeroed = build_model(name, side_arg, threads)
    src = ModelSource(source=f"torchvision.models:{name}", name=name, input_shape=[1, 3, side, side])
    path = work / f"{name}.onnx"
    notes = [f"zero-initialized {', '.join(zeroed)} given default random weights (else every output is 0)"] \
        if zeroed else []
    try:
        export_onnx(model, src, path)
        dynamic = True
    except ModelImportError as exc:
        export_onnx(model, src.model_copy(update={"dynamic_batch": False}), path)
        dynamic = False
        notes.append(f"batch 1: the dynamic-batch export fails ({common_first_line(str(exc))[:80]}…)")
    check_onnx(path)
    return {"onnx": str(path), "side": side, "kwargs": kwargs, "dynamic_batch": dynamic,
            "onnx_bytes": path.stat().st_size, "params": sum(p.numel() for p in model.parameters()), "notes": notes,
            "int8_reference": int8_reference(model, side)}


def simulate_int8(model, calib: np.ndarray, held: np.ndarray, batch: int = 16) -> dict[str, Any]:
    """Textbook INT8 in torch: the floor a backend's post-training quantization starts from.

    Every Conv/Linear weight (and an attention block's packed input projection) fake-quantized per output
    channel, symmetric int8; the input of every Conv/Linear/attention module call fake-quantized per tensor,
    asymmetric uint8, over its min–max on ``calib`` (torch.ao's observers and ``torch.fake_quantize_*``). The
    mean and lowest cosine of the logits to FP32 on ``held``, for weights alone (W8) and for both (W8A8).
    When even this reference misses the fidelity gate, the random-weight model amplifies rounding noise
    (deep BatchNorm networks at initialization are chaotic: weight-only INT8 of ResNet-50 keeps cosine 0.91),
    and a backend's gate refusal says that, not that its quantizer fell short."""
    import copy

    import torch
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    layers = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear, torch.nn.MultiheadAttention)

    def logits(m, x: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            outs = [m(torch.from_numpy(x[i : i + batch])) for i in range(0, len(x), batch)]
        return torch.cat([o if isinstance(o, torch.Tensor) else o[0] for o in outs]).flatten(1).float()

    def quantize_weights(m) -> None:
        for mod in m.modules():
            if not isinstance(mod, layers):
                continue
            for pname in ("weight", "in_proj_weight"):
                w = getattr(mod, pname, None)
                if not isinstance(w, torch.Tensor) or w.dim() < 2:
                    continue
                obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
                obs(w.detach())
                scale, zero = obs.calculate_qparams()
                w.data = torch.fake_quantize_per_channel_affine(w.detach(), scale, zero.to(torch.int32), 0, -128, 127)

    def quantize_activations(m) -> None:
        observers: dict[Any, Any] = {}

        def observe(mod, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                observers.setdefault(mod, MinMaxObserver(dtype=torch.quint8))(args[0].detach())

        hooks = [mod.register_forward_pre_hook(observe) for mod in m.modules() if isinstance(mod, layers)]
        logits(m, calib)
        for h in hooks:
            h.remove()
        for mod, obs in observers.items():
            scale, zero = obs.calculate_qparams()

            def fake(mod, args, s=float(scale), z=int(zero)):
                return tuple(torch.fake_quantize_per_tensor_affine(a, s, z, 0, 255)
                             if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

            mod.register_forward_pre_hook(fake)

    ref = logits(model, held)
    w8 = copy.deepcopy(model)
    quantize_weights(w8)
    w8_cos = torch.nn.functional.cosine_similarity(logits(w8, held), ref, dim=1)
    quantize_activations(w8)  # calibrated with the weights already in INT8, as a backend's PTQ sees them
    w8a8_cos = torch.nn.functional.cosine_similarity(logits(w8, held), ref, dim=1)
    return {"w8_cosine": float(w8_cos.mean()), "w8a8_cosine": float(w8a8_cos.mean()),
            "w8a8_min_cosine": float(w8a8_cos.min()), "samples": len(held)}


# ----------------------------------------------------------------------------- compile
def cli_overrides(onnx: Path, target: str, calibration: Path, output: Path) -> tuple[dict[str, Any], dict]:
    """What ``edgekit compile ONNX --target T --preprocess imagenet --calibration DIR --no-accuracy-check -o OUT``
    hands to ``load_build`` (edgekit/cli/compile.py's compile_cmd, the same flags → the same overrides)."""
    from edgekit.cli.compile import preprocess_flags

    source = str(onnx)
    overrides: dict[str, Any] = {
        "model.source": source, "target": target, "model.checkpoint": None, "model.name": Path(source).stem,
        "model.version": None, "model.release": None, "model.input_shape": None, "calibration.source": str(calibration),
        "validation.source": None, "output": output, "signing_key": None, "keep_work": None,
        "accuracy": {"max_accuracy_drop": None},
    }
    pre = preprocess_flags(PRESET, None, None, None, None, source, None)
    if pre.pop("_input_shape", None) is not None:
        overrides["model.input_shape"] = pre["_shape"]
    pre.pop("_shape", None)
    overrides["preprocess"] = pre
    passes = {"prune": {"ratio": None, "iterations": None, "finetune_epochs": None}, "distill": {"teacher": None}}
    return overrides, passes


def compile_target(onnx: Path, target: str, calibration: Path, output: Path, key: Path) -> dict[str, Any]:
    """One ``edgekit compile`` for one target; the report's figures as one row."""
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build
    from edgekit.signing import load_private_key

    overrides, passes = cli_overrides(onnx, target, calibration, output)
    cfg = load_build(None, overrides, passes=passes)
    result = compile_model(cfg, load_private_key(key))
    return target_row(result.report)


def target_row(report: dict[str, Any]) -> dict[str, Any]:
    """A build report → what the table shows: what ships, why, its fidelity, host latency and size."""
    lat = report.get("latency_ms", {})
    fid = report.get("fidelity") or {}
    quant = next((s for s in report.get("stages", []) if s.get("name") == "quantize"), {})
    attempts = report.get("accuracy", {}).get("attempts", [])
    precision = report.get("precision")
    chosen = quant.get("chosen")
    int8_passed = bool(quant.get("passed")) and chosen is not None
    if precision == "int8":
        strategy = "INT8" if chosen in (None, "ptq") else f"INT8 ({chosen})"
    elif int8_passed:
        strategy = "FP32 (INT8 within the gate but not faster)"
    elif attempts:
        strategy = "FP32 (no INT8 attempt within the fidelity gate)"
    else:
        strategy = "FP32 (INT8 not attempted)"
    normalize = (report.get("steps", {}).get("export", {}) or {}).get("normalize") or {}
    return {
        "result": "converted", "precision": precision, "strategy": strategy, "chosen": chosen,
        "int8_within_gate": precision == "int8" and int8_passed,
        "attempts": [{"strategy": a.get("strategy"), "passed": a.get("passed"),
                      "cosine": (a.get("fidelity") or {}).get("cosine")} for a in attempts],
        "cosine": fid.get("cosine"), "top1_agreement": fid.get("top1_agreement"), "fidelity_samples": fid.get("samples"),
        "min_cosine": fid.get("min_cosine"),
        "p50_fp32_ms": (lat.get("fp32") or {}).get("p50_ms"), "p50_int8_ms": (lat.get("int8") or {}).get("p50_ms"),
        "speedup": lat.get("speedup"), "engine": lat.get("engine"), "host_note": lat.get("not_gated_reason"),
        "bundle_bytes": report.get("bundle_bytes"), "import_fallbacks": normalize.get("fallbacks", []),
        "backend_version": report.get("backend_version"),
    }


def run_model(name: str, targets: list[str], args: argparse.Namespace, calibration: Path, key: Path) -> dict[str, Any]:
    """Export in one child, then each target's compile in its own child; one row with a cell per target."""
    if not targets:  # --resume on a row from before the INT8 reference: only that
        ref = run_isolated(lambda: reference_only(name, args.side, args.threads), args.timeout)
        return {"model": name, "targets": {}, **({"int8_reference": ref["int8_reference"]} if ref["ok"] else {})}
    work = Path(tempfile.mkdtemp(prefix=f"zoo_{name}_"))
    try:
        exp = run_isolated(lambda: export_model(name, args.side, args.threads, work), args.timeout)
        row: dict[str, Any] = {"model": name, "export_cpu_s": exp["cpu_s"], "targets": {}}
        if not exp["ok"]:
            row["export_failure"] = exp["failure"]
            return row
        row.update({k: exp[k] for k in ("side", "kwargs", "dynamic_batch", "onnx_bytes", "params", "notes",
                                         "int8_reference")})
        onnx = Path(exp["onnx"])
        for target in targets:
            out = work / "bundles" / f"{name}-{target}.ekb"
            res = run_isolated(lambda t=target, o=out: compile_target(onnx, t, calibration, o, key), args.timeout)
            cell = ({k: v for k, v in res.items() if k != "ok"} if res["ok"]
                    else {"result": res["failure"]["kind"], "failure": res["failure"], "cpu_s": res["cpu_s"]})
            row["targets"][target] = {**cell, "machine": system().get("cpu")}  # a resumed run may be elsewhere
            shutil.rmtree(out.parent, ignore_errors=True)  # bundles and work folders: GBs over the zoo
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _load_target(name: str) -> str:
    from edgekit.config.targets import load_target

    return load_target(name).name


RETRY = ("timeout", "died")


def pending(row: dict[str, Any] | None, targets: list[str]) -> list[str]:
    """The targets ``--resume`` still runs for a model: those without a final answer in its row (a timeout
    or a child that died is tried again, e.g. with a longer ``--timeout`` on a quiet machine)."""
    if not row:
        return list(targets)
    if "export_failure" in row:
        return list(targets) if row["export_failure"].get("kind") in RETRY else []
    cells = row.get("targets", {})
    return [t for t in targets if t not in cells or cells[t]["result"] in RETRY]


def merge_row(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A re-run's row over the previous one: its targets replace theirs, the others' cells stay
    (``--models M --targets T`` re-runs one cell)."""
    if not old or "export_failure" in new:
        return new
    return {**old, **new, "targets": {**old.get("targets", {}), **new["targets"]}}


# ----------------------------------------------------------------------------- data
def write_calibration(folder: Path, count: int = CALIB_IMAGES, seed: int = 1) -> Path:
    """``count`` random crops of the sample photos as JPEG files: the folder a user points --calibration at."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, crop in enumerate(common.random_crops(common.sample_photos(), count, seed)):
        Image.fromarray(crop).save(folder / f"crop_{i:03d}.jpg", quality=95)
    return folder


def model_order(names: list[str]) -> list[str]:
    """Smallest first (parameters, counted on the meta device): a stopped run has covered the most models."""
    import torch
    import torchvision

    def size(name: str) -> float:
        try:
            with torch.device("meta"):
                m = getattr(torchvision.models, name)(weights=None, **build_kwargs(name, SIDE)[0])
            return float(sum(p.numel() for p in m.parameters())) * (4 if name.startswith("maxvit") else 1)
        except Exception:  # noqa: BLE001  (ordering only; the run itself reports what fails)
            return float("inf")

    return sorted(names, key=size)


# ----------------------------------------------------------------------------- report
def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Per target: converted, INT8 within the gate, failures by kind, median speed-up; bugs over all."""
    rows, zoo = doc["rows"], doc.get("zoo", [])
    out: dict[str, Any] = {"targets": {}, "bugs": 0, "export_failures": sum("export_failure" in r for r in rows)}
    for t in doc["settings"]["targets"]:
        pairs = [(r, r["targets"][t]) for r in rows if t in r.get("targets", {})]
        cells = [c for _, c in pairs]
        hostile = sum(outcome(c) == "gate" and reference_misses(r, c) for r, c in pairs)
        conv = [c for c in cells if c["result"] == "converted"]
        int8 = [c for c in conv if c.get("int8_within_gate")]
        speed = [c["speedup"] for c in int8 if c.get("speedup")]
        kinds: dict[str, int] = {}
        for c in cells:
            if c["result"] != "converted":
                kinds[outcome(c)] = kinds.get(outcome(c), 0) + 1
        out["targets"][t] = {"run": len(cells), "converted": len(conv), "int8_within_gate": len(int8),
                             "converts": len(conv) + kinds.get("gate", 0),
                             "other_strategy": len(conv) - len(int8), "failures": kinds,
                             "gate_reference_misses": hostile,
                             "median_speedup": float(np.median(speed)) if speed else None,
                             "share_of_zoo": len(conv) / len(zoo) if zoo else None}
        out["bugs"] += kinds.get("bug", 0)
    out["bugs"] += sum(r.get("export_failure", {}).get("kind") == "bug" for r in rows)
    return out


def reference_misses(row: dict[str, Any], cell: dict[str, Any]) -> bool:
    """Whether torch's textbook W8A8 (:func:`simulate_int8`) of the model also misses the cell's cosine gate."""
    ref = (row.get("int8_reference") or {}).get("w8a8_cosine")
    failure = cell.get("failure") or {}
    gate = cell.get("min_cosine") or failure.get("min_cosine")
    if gate is None and (m := re.search(r"\(at least ([0-9.]+)\)", failure.get("message", ""))):
        gate = float(m.group(1))  # a cell from before the failure carried the threshold: its message has it
    return ref is not None and gate is not None and ref < gate


def outcome(cell: dict[str, Any]) -> str:
    """converted; gate (a gate refused: the model converts, INT8 missed the budget); error (an edgekit error);
    bug (a bare traceback); timeout; died."""
    if cell["result"] == "error" and cell.get("failure", {}).get("code") == "GATE":
        return "gate"
    return cell["result"]


def _cell_failure(c: dict[str, Any]) -> str:
    f = c.get("failure", {})
    if f.get("kind") == "error":
        msg = f["message"] if len(f["message"]) <= 200 else f["message"][:200] + "…"
        return f"{f['code']} ({f['exit_code']}) {f['type']}: {msg}"
    if f.get("kind") == "bug":
        return f"**bare traceback** {f['type']}: {f['message']} [{f['where']}; edgekit: {f.get('edgekit_frame') or '–'}]"
    return f.get("message", "?")


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def markdown(doc: dict[str, Any]) -> str:
    s = summarize(doc)
    rows, targets, zoo = doc["rows"], doc["settings"]["targets"], doc.get("zoo", [])
    quick = doc["settings"].get("quick")
    v = doc["versions"]
    lines = [
        "# Zoo coverage: torchvision classification models through every target"
        + (" — quick set (one model per family)" if quick else ""), "",
        f"{doc['generated_at']} · `{doc['command']}` · torch {v.get('torch')}, torchvision {v.get('torchvision')}, "
        f"OpenVINO {v.get('openvino')}, NNCF {v.get('nncf')}, ONNX Runtime {v.get('onnxruntime')}, "
        f"litert-torch {v.get('litert_torch')}, onnx2torch {v.get('onnx2torch')}", "",
        f"**Bare tracebacks (bugs: an exception that is not an edgekit error): {s['bugs']}.** "
        f"ONNX export failures: {s['export_failures']}. Models run: {len(rows)} of the zoo's {len(zoo)}"
        + (" (the quick set: the full zoo is for a quiet machine, `--resume` continues it)." if quick else "."), "",
        "Each model: random weights, BatchNorm statistics re-estimated on sample-photo crops, exported to ONNX "
        "(dynamic batch, else batch 1), then compiled as `edgekit compile MODEL.onnx --target T --preprocess "
        f"imagenet --calibration CROPS/ --no-accuracy-check` ({doc['settings']['calib_images']} JPEG crops; no "
        "labels, so the fidelity gate — INT8 vs FP32 cosine on held-back calibration samples — decides INT8, and "
        "the latency gate what ships).", "",
        "Failed: **gate** — a gate refused the build (no bundle; with random weights INT8 often misses cosine 0.99 "
        "where a trained model would not), **error** — an edgekit error (the model does not convert), **bug** — a bare "
        "traceback, **timeout** — not finished within the time limit on this shared machine.", "",
        "**Reference** — torch's textbook INT8 of the same model (per-channel int8 weights, per-tensor min–max "
        "uint8 inputs of every Conv/Linear/attention module; mean cosine to FP32 on the crops the gate holds "
        "back): where it misses the gate too, the random-weight model itself amplifies rounding noise (deep "
        "BatchNorm networks at initialization are chaotic), and the refusal is no shortfall of the backend's "
        "quantizer; where it passes and a backend is refused, that backend's INT8 falls short of the textbook.", "",
        "| target | run | bundle written | INT8 within gate | other strategy | converts (bundle or "
        "gate refusal) | failed | gate refusals where the reference misses too | median INT8 speed-up |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for t in targets:
        st = s["targets"][t]
        share = (f" ({st['converted'] / st['run']:.0%} of run" if st["run"] else " (") + \
            (f", {st['share_of_zoo']:.0%} of zoo)" if st["share_of_zoo"] is not None else ")")
        fails = ", ".join(f"{n} {k}" for k, n in sorted(st["failures"].items())) or "0"
        lines.append(f"| {t} | {st['run']} | {st['converted']}{share} | {st['int8_within_gate']} | "
                     f"{st['other_strategy']} | {st['converts']} | {fails} | "
                     f"{st.get('gate_reference_misses', 0)} of {st['failures'].get('gate', 0)} | "
                     f"{_fmt(st['median_speedup'], '.2f', '×')} |")
    lines += ["", "Host latency (p50, batch 1) and speed-up come from each build's own latency gate (FP32 and INT8 "
                  "timed interleaved) on a shared 2-core machine: **noisy**, for orientation only; take speed-ups from "
                  "a quiet machine (`edgekit bench`)."]
    lines += [f"- {t}: {HOST_CAVEAT[t]}." for t in targets if t in HOST_CAVEAT]
    lines += ["", "## Per model and target", "",
              "| model | input | ONNX batch | reference W8A8 cosine | target | result | ships | cosine / top-1 agr. | "
              "FP32 p50 ms | INT8 p50 ms | speed-up | bundle MB | CPU s |",
              "|---|---:|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["model"]):
        inp = r.get("side", "?")
        refc = _fmt((r.get("int8_reference") or {}).get("w8a8_cosine"), ".4f")
        batch = "–" if "export_failure" in r else ("dynamic" if r.get("dynamic_batch") else "1")
        if "export_failure" in r:
            lines.append(f"| {r['model']} | {inp} | ✗ | – | all | export failed | – | – | – | – | – | – | "
                         f"{r['export_cpu_s']:.0f} |")
            continue
        for t in targets:
            c = r["targets"].get(t)
            if c is None:
                continue
            if c["result"] != "converted":
                best = c.get("failure", {}).get("best_cosine")
                lines.append(f"| {r['model']} | {inp} | {batch} | {refc} | {t} | **{outcome(c)}** | – | "
                             f"{_fmt(best, '.4f')}{' (best try)' if best is not None else ''} | – | – | – | – | "
                             f"{c.get('cpu_s', 0):.0f} |")
                continue
            fid = (f"{c['cosine']:.4f} / {c['top1_agreement']:.2f}" if c.get("cosine") is not None else "–")
            lines.append(
                f"| {r['model']} | {inp} | {batch} | {refc} | {t} | converted | {c['strategy']} | {fid} | "
                f"{_fmt(c.get('p50_fp32_ms'), '.2f')} | {_fmt(c.get('p50_int8_ms'), '.2f')} | "
                f"{_fmt(c.get('speedup'), '.2f', '×')} | {_fmt((c.get('bundle_bytes') or 0) / 1e6, '.1f')} | "
                f"{c.get('cpu_s', 0):.0f} |")
    fails = [(r["model"], "export", {"failure": r["export_failure"]}) for r in rows if "export_failure" in r]
    fails += [(r["model"], t, c) for r in rows for t, c in r.get("targets", {}).items() if c["result"] != "converted"]
    if fails:
        lines += ["", "## Failures", ""]
        lines += [f"- **{m}** · {t}: {_cell_failure(c)}".replace("|", "/") for m, t, c in sorted(fails)]
        hints = {(c["failure"].get("type"), c["failure"].get("hint")) for _, _, c in fails
                 if c.get("failure", {}).get("kind") == "error" and c["failure"].get("hint")}
        if hints:
            lines += ["", "What the errors tell the user to do:", ""]
            lines += [f"- {typ}: {hint}".replace("|", "/") for typ, hint in sorted(hints)]
    missing = [n for n in zoo if n not in {r["model"] for r in rows}]
    if missing:
        lines += ["", f"Not run ({len(missing)} of {len(zoo)}): {', '.join(missing)}."]
    cpu = [r.get("export_cpu_s", 0) + sum(c.get("cpu_s", 0) for c in r.get("targets", {}).values()) for r in rows]
    if cpu:
        machines = Counter(c.get("machine") or doc["system"].get("cpu", "?")
                           for r in rows for c in r.get("targets", {}).values())
        lines += ["", f"CPU seconds per model (children: export + every target's compile): median "
                      f"{np.median(cpu):.0f}, total {sum(cpu):.0f}. Machine: "
                      + "; ".join(f"{m} ({n} cells)" for m, n in machines.most_common())
                      + f", {doc['system'].get('usable_cores', '?')} usable cores (resumed runs may land on "
                        f"another machine: speed-ups compare within a cell only)."]
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = prune_zoo_versions()
    for pkg, dist in (("onnxruntime", "onnxruntime"), ("onnx", "onnx"), ("litert_torch", "litert-torch"),
                      ("onnx2torch", "onnx2torch")):
        try:
            out[pkg] = md.version(dist)
        except md.PackageNotFoundError:
            out[pkg] = "?"
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    out_json, out_md = args.out / "zoo_coverage.json", args.out / "zoo_coverage.md"
    if args.markdown_only:
        if not out_json.is_file():
            raise SystemExit(f"--markdown-only re-renders {out_json}, which does not exist: run the benchmark first")
        out_md.write_text(markdown(json.loads(out_json.read_text())))
        return 0
    import torch  # noqa: F401  (imported once in the parent, inherited by the forked children)
    import torchvision

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    known = run_isolated(lambda: {"names": [_load_target(t) for t in targets]}, 120)
    if not known["ok"]:
        raise SystemExit(f"--targets: {known['failure'].get('message')}")
    zoo = sorted(torchvision.models.list_models(module=torchvision.models))
    names = [n.strip() for n in args.models.split(",") if n.strip()] or (list(QUICK) if args.quick else zoo)
    unknown = [n for n in names if n not in zoo]
    if unknown:
        raise SystemExit(f"not torchvision classification models: {', '.join(unknown)}")
    previous: dict[str, Any] = {}
    if out_json.is_file() and (args.models or args.resume):
        old = json.loads(out_json.read_text())
        previous = {r["model"]: r for r in old["rows"]}
        targets_shown = list(dict.fromkeys([*old["settings"]["targets"], *targets]))
        history = old.get("commands", [old["command"]])
        quick = bool(args.quick and not args.models) or (bool(args.models) and old["settings"].get("quick", False))
    else:
        targets_shown, history, quick = targets, [], bool(args.quick and not args.models)
    command = " ".join(shlex.quote(a) for a in ["benchmarks/zoo_coverage.py", *(argv or sys.argv[1:])])
    todo = {n: list(targets) for n in names}
    if args.resume:  # a model runs only the targets its row lacks (or that timed out): hours saved on big models
        todo = {n: pending(previous.get(n), targets) for n in names}
        names = [n for n in names if todo[n]]
    if not names:
        log(f"nothing to run: every model asked for is in {out_json}")
        return 0
    names = model_order(names)
    key = common.ensure_keys()["private"]
    args.out.mkdir(parents=True, exist_ok=True)
    calib_dir = Path(tempfile.mkdtemp(prefix="zoo_calib_"))
    try:
        calibration = write_calibration(calib_dir / "crops")
        rows: list[dict[str, Any]] = []
        for i, name in enumerate(names, 1):
            row = run_model(name, todo[name], args, calibration, key)
            cells = row.get("targets", {})
            log(f"[{i}/{len(names)}] {name}: " + ("export failed: " + row["export_failure"].get("message", "")
                                                  if "export_failure" in row else
                                                  ", ".join(f"{t} {c.get('strategy', c['result'])}" for t, c in cells.items()))
                + f" · {row.get('export_cpu_s', 0) + sum(c.get('cpu_s', 0) for c in cells.values()):.0f} CPU s")
            rows.append(row)
            merged = {**previous, **{r["model"]: merge_row(previous.get(r["model"]), r) for r in rows}}
            doc = {
                "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": command, "commands": [*history, command],
                "settings": {"targets": targets_shown, "side": args.side, "preset": PRESET, "bn_images": BN_IMAGES,
                             "calib_images": CALIB_IMAGES, "threads": args.threads, "timeout_s": args.timeout,
                             "quick": quick},
                "versions": versions(), "system": system(), "provenance": common.provenance(),
                "zoo": zoo, "rows": [merged[n] for n in sorted(merged)],
            }
            doc["summary"] = summarize(doc)
            out_json.write_text(json.dumps(doc, indent=1, default=str))  # after every model: a stopped run keeps its rows
            out_md.write_text(markdown(doc))
    finally:
        shutil.rmtree(calib_dir, ignore_errors=True)
    log(f"wrote {out_json} and {out_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
