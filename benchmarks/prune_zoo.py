"""Pruning coverage of the torchvision classification zoo: prune 50 % → export → INT8 within budget.

For every classification constructor in ``torchvision.models`` (``list_models(module=torchvision.models)``):

1. **Model**: random weights (``weights=None``, ``torch.manual_seed(0)``) at a small input (64×64; the
   ViTs get ``image_size`` 64 — 56 for the /14 patch of vit_h_14 —, inception_v3 96, maxvit_t 224, the
   smallest its partitioned attention accepts). BatchNorm statistics are re-estimated on real images
   (random crops of scikit-learn's two sample photos, ImageNet-normalized; no downloads): with random
   weights the default statistics make deep layers degenerate and INT8 fidelity meaningless.
2. **Prune** with edgekit's ``prune()`` (``edgekit.compress.prune``): ratio 0.5, magnitude importance, one
   step, ``round_to`` from the x86-openvino-cpu profile (16: VNNI blocks). The pruned model must run,
   keep its output shape and its head, and its MACs must fall. BatchNorm statistics are re-estimated
   again on the pruned model (what fine-tuning would do first).
3. **Export** the pruned model to ONNX with the build's exporter (``export_onnx`` + ``check_onnx``,
   dynamic batch), and check it against torch.
4. **INT8** with the x86-openvino-cpu compiler (NNCF post-training quantization, the profile's settings)
   calibrated on 64 crops; **fidelity** (mean cosine and top-1 agreement) of the INT8 artifact against
   the pruned FP32 artifact, both run through the device runtime's OpenVINO engine, on 48 held-out crops.
   The budget is the profile's fidelity gate (cosine ≥ 0.99). Random weights have no accuracy:
   fidelity stands in for it. Where INT8 misses the budget, the unpruned model is quantized the same way,
   to tell a pruning problem from a model that does not quantize at random weights.

Each model runs in a forked child with a time limit (``--timeout``), so one that hangs or runs out of
memory fails alone, with the reason. Run from anywhere::

    .venv/bin/python benchmarks/prune_zoo.py [--models resnet18,vit_b_32] [--quick]

``--quick``: the smallest model of each family. Writes ``--out``/prune_zoo.json and prune_zoo.md
(``--models`` runs merge into the existing JSON, so a re-run of a few models updates their rows).
Times are process CPU seconds of the child (the machine may be shared; wall-clock is not reported).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shlex
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import log  # noqa: E402

TARGET = "x86-openvino-cpu"
SIDE = 64
RATIO = 0.5
BN_IMAGES, CALIB_IMAGES, EVAL_IMAGES = 64, 64, 48
# Random weights give flat logits that quantize worse than a trained model's: where the unpruned model
# itself misses the profile's cosine budget, the pruned one passes if it stays within this of it.
COSINE_SLACK = 0.01
# family → its smallest member (--quick)
QUICK = ("alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
         "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
         "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t",
         "swin_v2_t", "vgg11_bn", "vit_b_32", "wide_resnet50_2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="", help="comma-separated constructor names (default: the whole zoo)")
    p.add_argument("--quick", action="store_true", help="one (the smallest) model per family")
    p.add_argument("--ratio", type=float, default=RATIO)
    p.add_argument("--side", type=int, default=SIDE, help="input side for the models that accept it")
    p.add_argument("--threads", type=int, default=2, help="torch and inference threads in each child")
    p.add_argument("--timeout", type=float, default=600, help="seconds one model may take (wall clock)")
    p.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    p.add_argument("--resume", action="store_true", help="skip the models the JSON already has")
    p.add_argument("--prune-only", action="store_true", help="stop after pruning (quick checks of edgekit's pruner)")
    p.add_argument("--merge-prune-only", type=Path, default=None,
                   help="with --markdown-only: a --prune-only run's JSON, for the models the full run did not reach")
    p.add_argument("--markdown-only", action="store_true", help="only re-render prune_zoo.md from the JSON")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- models and data
def build_kwargs(name: str, side: int) -> tuple[dict[str, Any], int]:
    """Constructor keyword arguments and the input side the model is run at."""
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        img = side if side % patch == 0 else patch * max(1, round(side / patch))
        return {"image_size": img}, img
    if name == "inception_v3":
        return {"aux_logits": False, "init_weights": True}, max(side, 96)
    if name == "googlenet":
        return {"aux_logits": False, "init_weights": True}, side
    if name.startswith("maxvit"):
        return {}, 224  # partition size 7 on every stage: 224 is the smallest input it accepts
    return {}, side


def images(count: int, seed: int, side: int) -> np.ndarray:
    """``count`` ImageNet-normalized crops of the two sample photos, resized to side×side (float32 NCHW)."""
    import torch
    import torch.nn.functional as F

    x = common.normalize(common.random_crops(common.sample_photos(), count, seed))
    if side != common.SIZE:
        x = F.interpolate(torch.from_numpy(x), size=(side, side), mode="bilinear", antialias=True).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def has_batchnorm(model) -> bool:
    import torch

    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def reestimate_bn(model, x: np.ndarray, batch: int = 16) -> None:
    if has_batchnorm(model):
        common.reestimate_bn(model, [x[i : i + batch] for i in range(0, len(x), batch)], log=lambda _m: None)


# ----------------------------------------------------------------------------- one model
def run_model(name: str, args: argparse.Namespace, row: dict[str, Any]) -> dict[str, Any]:
    """Everything about one model, filled into ``row``; ``stage`` and ``reason`` say where it stopped."""
    import torch
    import torchvision

    from edgekit.compress.prune import channel_counts, prune
    from edgekit.config.build import PrunePass
    from edgekit.config.targets import load_target

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    profile = load_target(TARGET)
    round_to = profile.optimize.round_to
    kwargs, side = build_kwargs(name, args.side)
    row.update({"model": name, "side": side, "kwargs": kwargs, "round_to": round_to, "stage": "build",
                "cpu_s": {}})
    clock = time.process_time()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.process_time()
        row["cpu_s"][stage] = round(now - clock, 2)
        clock = now

    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    x_bn, calib, held = images(BN_IMAGES, 2, side), images(CALIB_IMAGES, 1, side), images(EVAL_IMAGES, 3, side)
    reestimate_bn(model, x_bn)
    example = torch.from_numpy(held[:1])
    with torch.no_grad():
        out_before = model(example)
    channels_before = channel_counts(model)
    lap("build")

    row["stage"] = "prune"
    result = prune(model, example, PrunePass(ratio=args.ratio), round_to)
    row.update(before=result.before, after=result.after, head=result.head, ignored=result.ignored,
               notes=list(getattr(result, "notes", [])))
    with torch.no_grad():
        out_after = model(example)
    if tuple(out_after.shape) != tuple(out_before.shape):
        return {**row, "reason": f"pruned output shape {tuple(out_after.shape)} ≠ {tuple(out_before.shape)}"}
    channels_after = channel_counts(model)
    changed = {k: (channels_before[k], c) for k, c in channels_after.items()
               if k in channels_before and c != channels_before[k]}
    row["layers_pruned"] = len(changed)
    row["layers"] = len(channels_before)
    off_grid = [k for k, (_, c) in changed.items() if c % round_to]
    row["off_grid"] = off_grid[:10]
    row["macs_ratio"] = result.before["macs"] / max(result.after["macs"], 1)
    if result.after["macs"] >= result.before["macs"]:
        return {**row, "reason": "nothing pruned: every channel group was ignored or unprunable"}
    reestimate_bn(model, x_bn)
    lap("prune")
    if args.prune_only:
        return {**row, "stage": "prune", "passed": True, "reason": "stopped after pruning (--prune-only)"}

    row["stage"] = "export"
    from edgekit.build.backends.base import SourceModel, make_engine, onnx_signature, predict_logits
    from edgekit.build.backends.registry import load_compiler
    from edgekit.build.gates import FidelityCheck
    from edgekit.config.build import ModelSource
    from edgekit.errors import ModelImportError
    from edgekit.models.importer import check_onnx, export_onnx

    work = Path(tempfile.mkdtemp(prefix=f"prune_zoo_{name}_"))
    try:
        src = ModelSource(source=f"torchvision.models:{name}", name=name, input_shape=[1, 3, side, side])
        onnx_path = work / "model.onnx"
        try:
            export_onnx(model, src, onnx_path)
        except ModelImportError as exc:  # the build's default; does a fixed batch export?
            src = src.model_copy(update={"dynamic_batch": False})
            export_onnx(model, src, onnx_path)
            row["notes"].append("exported with batch 1: the build's dynamic-batch export fails "
                                f"({_plain(str(exc)).splitlines()[0][:60]}…)")
        check_onnx(onnx_path)
        row["onnx_bytes"] = onnx_path.stat().st_size
        lap("export")

        row["stage"] = "int8"
        compiler = load_compiler(profile.backend)
        runtime = profile.runtime.model_copy(update={"threads": args.threads})
        sig = onnx_signature(onnx_path)
        settings = profile.quantize.model_copy(update={"calibration_count": CALIB_IMAGES})

        def fidelity(onnx: Path, torch_model, sub: str) -> dict[str, Any]:
            s = SourceModel(onnx=onnx, torch=torch_model, input_shape=[1, 3, side, side])
            fp32 = compiler.fp32(s, work / sub)
            int8 = compiler.quantize(s, calib, settings, work / sub)
            ref = predict_logits(make_engine(fp32, compiler.engine, sig, compiler.reference_options(runtime)), sig, held)
            got = predict_logits(make_engine(int8, compiler.engine, sig, compiler.deploy_options(runtime, sig)), sig, held)
            with torch.no_grad():
                torch_out = torch_model(torch.from_numpy(held)).numpy()
            return {**FidelityCheck(profile.fidelity).measure(ref, got),
                    "fp32_vs_torch_max_abs": float(np.abs(ref - torch_out).max())}

        row["fidelity"] = fid = fidelity(onnx_path, model, "pruned")
        lap("int8")
        if fid["fp32_vs_torch_max_abs"] > 1e-2 * max(1.0, float(np.abs(out_after.numpy()).max())):
            return {**row, "stage": "export",
                    "reason": f"ONNX/OpenVINO FP32 differs from torch by {fid['fp32_vs_torch_max_abs']:.3g}"}
        budget = profile.fidelity.min_cosine
        if budget is not None and fid["cosine"] < budget:
            # Is it the pruning? Quantize the unpruned model the same way.
            torch.manual_seed(0)
            base = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
            reestimate_bn(base, x_bn)
            base_onnx = work / "unpruned.onnx"
            export_onnx(base, src, base_onnx)
            row["fidelity_unpruned"] = fu = fidelity(base_onnx, base, "unpruned")
            lap("int8_unpruned")
            if fid["cosine"] < fu["cosine"] - COSINE_SLACK:
                return {**row, "reason": f"INT8 cosine {fid['cosine']:.4f} < {budget}, and below the unpruned "
                                         f"model's {fu['cosine']:.4f} by more than {COSINE_SLACK}"}
            row["budget"] = f"unpruned INT8 cosine {fu['cosine']:.4f} − {COSINE_SLACK}"
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return {**row, "stage": "done", "passed": True, "reason": ""}


def _child(name: str, args: argparse.Namespace, conn) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    row: dict[str, Any] = {"model": name, "stage": "build"}
    try:
        row = run_model(name, args, row)
    except BaseException as exc:  # the row records why; the parent goes on with the next model
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb)), "")
        row = {**row, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
               "where": where, "traceback": traceback.format_exc()[-3000:]}
    conn.send(row)
    conn.close()


def run_isolated(name: str, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, args, child))
    proc.start()
    child.close()
    row = None
    if parent.poll(args.timeout):
        try:
            row = parent.recv()
        except EOFError:
            row = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
        row = row or {"model": name, "stage": "?", "reason": f"timed out after {args.timeout:.0f} s"}
    if row is None:
        row = {"model": name, "stage": "?", "reason": f"the child died (exit code {proc.exitcode}: out of memory?)"}
    row.setdefault("passed", False)
    return row


# ----------------------------------------------------------------------------- report
def _m(v: float) -> str:
    return f"{v / 1e6:.1f}" if v < 1e10 else f"{v / 1e9:.0f}G"


def _plain(text: str) -> str:
    """Terminal colour codes out (torch.export's messages carry them)."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _stopped_after_pruning(r: dict[str, Any]) -> bool:
    return r.get("reason", "").startswith("stopped after pruning")


def markdown(doc: dict[str, Any]) -> str:
    full = doc["rows"]
    passed = [r for r in full if r.get("passed")]
    prune_only = bool(full) and all(_stopped_after_pruning(r) for r in passed)
    # models only the --prune-only run reached (merged with --merge-prune-only)
    extra = [r for r in doc.get("prune_only_rows", []) if r["model"] not in {f["model"] for f in full}]
    rows = sorted(full + extra, key=lambda r: r["model"])
    lines = [
        "# Pruning coverage: the torchvision classification zoo" + (" (pruning step only)" if prune_only else ""),
        "", f"{doc['generated_at']} · `{doc['command']}` · torch {doc['versions']['torch']}, torchvision "
        f"{doc['versions']['torchvision']}, Torch-Pruning {doc['versions']['torch_pruning']}, OpenVINO "
        f"{doc['versions'].get('openvino', '?')}", "",
    ]
    if prune_only:
        lines += [f"**{len(passed)} of {len(rows)} prune** {doc['settings']['ratio']:.0%} (magnitude, round_to "
                  f"{doc['settings']['round_to']}) and still run with their output shape and head, MACs fewer "
                  f"(random weights, BatchNorm re-estimated on sample-photo crops). Export and INT8 not run "
                  f"(`--prune-only`).", ""]
    else:
        lines += [
            f"**{len(passed)} of {len(full)} pass** prune {doc['settings']['ratio']:.0%} (magnitude, round_to "
            f"{doc['settings']['round_to']}) → ONNX export → {doc['settings']['target']} INT8 within budget: cosine "
            f"≥ {doc['settings']['min_cosine']} against the pruned FP32 model, or, where the unpruned model misses "
            f"that too at random weights, within {doc['settings'].get('cosine_slack', COSINE_SLACK)} of the "
            f"unpruned model's INT8 cosine (random weights, BatchNorm re-estimated on sample-photo crops; "
            f"{EVAL_IMAGES} held-out crops through the OpenVINO engine).", ""]
    if extra:
        pruned_all = [r for r in rows if r.get("passed") or r.get("stage") in ("export", "int8")]
        lines += [f"**{len(pruned_all)} of {len(rows)} prune** and still run with their output shape and head, "
                  f"MACs fewer: the {len(extra)} models the full run did not reach in its time come from the "
                  f"`--prune-only` run (`{doc.get('prune_only_command', '')}`), export and INT8 not measured.", ""]
    lines += [
        "Torch-Pruning's own torchvision example reports 77 of 85 (its 85 include detection and segmentation "
        "models; it fails Swin and ShuffleNet).", "",
        "| model | input | params M before → after | MMACs before → after | MACs ÷ | pruned | export | "
        "INT8 cosine / top-1 agr. | result | notes |",
        "|---|---:|---:|---:|---:|---|---|---:|---|---|",
    ]
    for r in rows:
        b, a = r.get("before"), r.get("after")
        stage = r.get("stage", "?")
        pruned = ("✓" if stage in ("export", "int8", "done") or (stage == "prune" and r.get("passed"))
                  else ("✗" if stage == "prune" else "–"))
        exported = "✓" if stage in ("int8", "done") else ("✗" if stage == "export" else "–")
        fid = r.get("fidelity")
        fid_s = f"{fid['cosine']:.4f} / {fid['top1_agreement']:.2f}" if fid else "–"
        notes = "; ".join(_plain(n) for n in r.get("notes") or [])
        lines.append(
            f"| {r['model']} | {r.get('side', '?')} | "
            + (f"{b['params'] / 1e6:.1f} → {a['params'] / 1e6:.1f} | {_m(b['macs'])} → {_m(a['macs'])} | "
               f"{r.get('macs_ratio', 0):.2f} |" if b and a else "– | – | – |")
            + f" {pruned} | {exported} | {fid_s} | "
            + ("pruned; export and INT8 not run" if _stopped_after_pruning(r) else
               ("pass" + (f" ({r['budget']})" if r.get("budget") else "")) if r.get("passed")
               else f"**fail** ({stage}): {r.get('reason', '')}".replace("|", "/"))
            + f" | {notes.replace('|', '/')} |")
    missing = [n for n in doc.get("zoo", []) if n not in {r["model"] for r in rows}]
    if missing:
        lines += ["", f"Not run ({len(missing)} of the zoo's {len(doc['zoo'])}; the run was stopped or limited "
                      f"with --models/--quick): {', '.join(missing)}."]
    failed = [r for r in rows if not r.get("passed")]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- **{r['model']}** ({r.get('stage')}): {_plain(str(r.get('reason')))}" + (f" [{r['where']}]" if r.get("where")
                  else "") for r in failed]
    lines += ["", f"CPU seconds per model (child process, all stages): median "
                  f"{np.median([sum(r.get('cpu_s', {}).values()) for r in rows]):.0f}, total "
                  f"{sum(sum(r.get('cpu_s', {}).values()) for r in rows):.0f}. Machine: {doc['system'].get('cpu', '?')}."]
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg, dist in (("torch", "torch"), ("torchvision", "torchvision"), ("torch_pruning", "torch-pruning"),
                      ("openvino", "openvino"), ("nncf", "nncf")):
        try:
            out[pkg] = md.version(dist)
        except md.PackageNotFoundError:
            out[pkg] = "?"
    return out


def system() -> dict[str, Any]:
    import platform

    cpu = platform.processor() or "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "usable_cores": common.usable_cores(), "python": platform.python_version()}


def main(argv=None) -> int:
    args = parse_args(argv)
    out_json, out_md = args.out / "prune_zoo.json", args.out / "prune_zoo.md"
    if args.markdown_only:
        doc = json.loads(out_json.read_text())
        if args.merge_prune_only:
            po = json.loads(args.merge_prune_only.read_text())
            doc["prune_only_rows"], doc["prune_only_command"] = po["rows"], po["command"]
            out_json.write_text(json.dumps(doc, indent=1, default=str))
        out_md.write_text(markdown(doc))
        return 0
    import torch  # noqa: F401  (imported once in the parent, inherited by the forked children)
    import torchvision

    zoo = sorted(torchvision.models.list_models(module=torchvision.models))
    names = [n.strip() for n in args.models.split(",") if n.strip()] or (list(QUICK) if args.quick else zoo)
    unknown = [n for n in names if n not in zoo]
    if unknown:
        raise SystemExit(f"not torchvision classification models: {', '.join(unknown)}")
    from edgekit.config.targets import load_target

    profile = load_target(TARGET)
    previous, carried = {}, {}
    if (args.models or args.quick or args.resume) and out_json.is_file():
        old = json.loads(out_json.read_text())
        previous = {r["model"]: r for r in old["rows"]}
        # a merged --prune-only run stays with the document (its rows fill what the full run has not reached)
        carried = {k: old[k] for k in ("prune_only_rows", "prune_only_command") if k in old}
    if args.resume:
        names = [n for n in names if n not in previous]
    if not args.models and not args.quick:  # the family representatives first, then the rest by size
        names = [n for n in QUICK if n in names] + [n for n in names if n not in QUICK]
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names, 1):
        row = run_isolated(name, args)
        cpu = sum(row.get("cpu_s", {}).values())
        log(f"[{i}/{len(names)}] {name}: {'pass' if row['passed'] else 'FAIL (' + row.get('stage', '?') + '): ' + row.get('reason', '')}"
            f" · MACs ÷{row.get('macs_ratio', 0):.2f}"
            + (f" · cosine {row['fidelity']['cosine']:.4f}" if row.get("fidelity") else "") + f" · {cpu:.0f} CPU s")
        rows.append(row)
        merged = {**previous, **{r["model"]: r for r in rows}}
        doc = {
            "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(shlex.quote(a) for a in ["benchmarks/prune_zoo.py", *(argv or sys.argv[1:])]),
            "settings": {"ratio": args.ratio, "side": args.side, "target": TARGET,
                         "round_to": profile.optimize.round_to, "min_cosine": profile.fidelity.min_cosine,
                         "cosine_slack": COSINE_SLACK, "bn_images": BN_IMAGES, "calib_images": CALIB_IMAGES,
                         "eval_images": EVAL_IMAGES, "threads": args.threads},
            "versions": versions(), "system": system(), "provenance": common.provenance(),
            "zoo": zoo, "rows": [merged[n] for n in sorted(merged)], **carried,
        }
        out_json.write_text(json.dumps(doc, indent=1, default=str))  # after every model: a stopped run keeps its rows
        out_md.write_text(markdown(doc))
    passed = sum(bool(r.get("passed")) for r in doc["rows"])
    log(f"{passed} of {len(doc['rows'])} pass; wrote {out_json} and {out_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
