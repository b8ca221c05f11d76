"""``edgekit compile``: a build file or a model → a signed bundle for a device profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..errors import ConfigError
from .exits import handle_errors
from .options import JsonOpt, VerboseOpt, parse_input_shape
from .output import console, err_console, print_json, set_verbosity


_shape = parse_input_shape


@handle_errors
def compile_cmd(
    source: Optional[str] = typer.Argument(None, help="Build file (.yaml), a run folder (runs/NAME), or a model: "
                                           ".onnx, .pt2, module:factory"),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Profile name or YAML path"),
    checkpoint: Optional[Path] = typer.Option(None, help="State dict for a factory model"),
    name: Optional[str] = typer.Option(None, help="Model name in the bundle"),
    version: Optional[str] = typer.Option(None, help="Model version in the bundle"),
    release: Optional[int] = typer.Option(None, help="Anti-rollback release counter"),
    input_shape: Optional[str] = typer.Option(None, help="e.g. 1,3,224,224"),
    calibration: Optional[str] = typer.Option(None, help="Calibration data source"),
    validation: Optional[str] = typer.Option(None, help="Labelled validation data source"),
    preprocess: Optional[str] = typer.Option(None, "--preprocess", help="Preprocessing preset: imagenet, "
                                             "inception, caffe, unit or gray (size and layout from the model)"),
    size: Optional[str] = typer.Option(None, help="Image size the device resizes to: H,W or HxW or one number"),
    mean: Optional[str] = typer.Option(None, help="Per-channel mean after scaling, e.g. 0.485,0.456,0.406"),
    std: Optional[str] = typer.Option(None, help="Per-channel std after scaling, e.g. 0.229,0.224,0.225"),
    layout: Optional[str] = typer.Option(None, help="NCHW or NHWC (default: from the model's input)"),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images",
                                         help="Skip (and count) images that cannot be decoded in data folders"),
    max_accuracy_drop: Optional[float] = typer.Option(None, help="Budget in top-1 points"),
    no_accuracy_check: bool = typer.Option(False, "--no-accuracy-check",
                                           help="Ship INT8 without an accuracy budget (no labelled data)"),
    no_quantize: bool = typer.Option(False, "--no-quantize", help="Ship FP32 (no INT8)"),
    latency_budget_ms: Optional[float] = typer.Option(None, help="p99 latency budget on the device "
                                                      "(limits.latency_budget_ms)"),
    prune_ratio: Optional[str] = typer.Option(None, help="Structured pruning: share of channels removed, or "
                                              "'auto' (the least ratio that meets --latency-budget-ms, measured); "
                                              "adds or updates the build's prune pass"),
    prune_iterations: Optional[int] = typer.Option(None, help="Prune in N steps, fine-tuning between them"),
    finetune_epochs: Optional[int] = typer.Option(None, help="Fine-tuning epochs of the prune pass (0: none)"),
    distill_from: Optional[str] = typer.Option(None, help="Distil from TEACHER: 'self' (the model before "
                                               "pruning), a run folder or module:factory"),
    qat: Optional[str] = typer.Option(None, help="Quantization-aware training: auto (only when post-training "
                                      "INT8 breaks the budget), on or off"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Bundle path (.ekb)"),
    key: Optional[Path] = typer.Option(None, help="Signing key [default: $EDGEKIT_SIGNING_KEY]"),
    keep_work: bool = typer.Option(False, "--keep-work", help="Keep the work folder (intermediate files)"),
    verbose: int = VerboseOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Compile a model for a device profile into a signed bundle.

    Flags override the build file's fields; the result is validated again.
    """
    from .._console import redirect_stdout_to_stderr

    set_verbosity(verbose)  # `compile -v` shows what `edgekit -v compile` would
    from ..build.pipeline import compile_model
    from ..config import load_build
    from ..signing import load_private_key

    from ..train.run_folder import build_settings, is_run_folder

    build_file = Path(source) if source and source.endswith((".yaml", ".yml")) else None
    run_dir = Path(source) if is_run_folder(source) else None
    if source and run_dir is None and Path(source).is_dir():
        raise ConfigError(f"{source} is a folder without model.pt: give a finished run folder (edgekit train "
                          f"--out {source}), a build file or a model file")
    base = build_settings(run_dir) if run_dir is not None else None
    if base is not None:
        # a flag names other data: it replaces the run's split, it is not merged into it
        for section, flag in (("calibration", calibration), ("validation", validation)):
            if flag is not None:
                base.pop(section, None)
        if output is None and target and not target_list(target):
            output = run_dir / f"{base['model']['name']}-{Path(target).stem}.ekb"
    overrides: dict[str, Any] = {
        "model.source": None if build_file or run_dir else source,
        "target": target,
        "model.checkpoint": checkpoint,
        "model.name": name or (Path(source).stem.split(":")[-1] if source and not (build_file or run_dir) else None),
        "model.version": version,
        "model.release": release,
        "model.input_shape": _shape(input_shape),
        "calibration.source": calibration,
        "validation.source": validation,
        "output": output,
        "signing_key": key,
        "keep_work": keep_work or None,
    }
    if max_accuracy_drop is not None and no_accuracy_check:
        raise ConfigError("give --max-accuracy-drop or --no-accuracy-check, not both")
    if max_accuracy_drop is not None:
        overrides["accuracy.max_accuracy_drop"] = max_accuracy_drop
    if no_accuracy_check:
        overrides["accuracy"] = {"max_accuracy_drop": None}
    if no_quantize:
        overrides["quantize.enabled"] = False
    if qat is not None:
        overrides["quantize.qat"] = qat
    if skip_bad_images:
        overrides["skip_bad_images"] = True
    pre = preprocess_flags(preprocess, size, mean, std, layout, source if not (build_file or run_dir) else None,
                           _shape(input_shape))
    if pre:
        if pre.pop("_input_shape", None) is not None and input_shape is None:
            overrides["model.input_shape"] = pre["_shape"]
        pre.pop("_shape", None)
        overrides["preprocess"] = pre
    if latency_budget_ms is not None:
        overrides["limits.latency_budget_ms"] = latency_budget_ms
    prune = {"ratio": _ratio(prune_ratio), "iterations": prune_iterations, "finetune_epochs": finetune_epochs}
    passes = {"prune": prune, "distill": {"teacher": distill_from}}
    if prune_ratio is None and (prune_iterations is not None or finetune_epochs is not None):
        # these flags tune a prune pass: the build file must have one, or --prune-ratio adds it
        from ..config.base import read_yaml

        steps = (read_yaml(build_file).get("optimize") or []) if build_file else []
        if not any(isinstance(s, dict) and "prune" in s for s in steps):
            raise ConfigError("--prune-iterations/--finetune-epochs tune a prune pass: add --prune-ratio R "
                              "(or a '- prune:' entry under optimize: in the build file)")
    many = target_list(target)
    if many:
        compile_many(many, build_file, overrides, base, passes, output, as_json)
        return
    cfg = load_build(build_file, overrides, base=base, passes=passes)
    signing_key = load_private_key(cfg.signing_key)
    # Progress goes to stderr; whatever the compilers' libraries print (NNCF's progress bars) too,
    # so that stdout holds only the result.
    with err_console.status("compiling", spinner="dots") as status, redirect_stdout_to_stderr():
        result = compile_model(cfg, signing_key, on_step=lambda s: status.update(f"[bold]{s}[/]…"))
    if as_json:
        print_json(result.report)
        return
    print_compile_summary(result.report)
    console.print(f"bundle: [bold]{result.bundle}[/]  report: {result.report_path}")


def target_list(target: str | None) -> list[str] | None:
    """``--target all`` (every profile) or ``a,b,c``; None for one target."""
    from ..config.targets import available_targets

    if target == "all":
        return list(available_targets())
    if target and "," in target:
        return [t.strip() for t in target.split(",") if t.strip()]
    return None


def compile_many(targets: list[str], build_file: Path | None, overrides: dict[str, Any], base: dict | None,
                 passes: dict, output: Path | None, as_json: bool) -> None:
    """One build per target, each bundle beside the others; one matrix at the end, failures included.

    A target that fails (a gate, a converter that cannot take the model) is a row with its reason;
    the others still build. Exit status: 0 when every target built, else the first failure's.
    """
    from edgekit_runtime.contract.errors import RuntimeErrorBase

    from .._console import redirect_stdout_to_stderr
    from ..build.pipeline import compile_model
    from ..config import load_build
    from ..config.targets import load_target
    from ..errors import EdgekitError
    from ..signing import load_private_key

    for t in targets:
        load_target(t)  # an unknown name is refused before any build starts
    if output is not None and output.suffix == ".ekb":
        raise ConfigError(f"-o {output} names one bundle; with several targets give a folder (each bundle is "
                          f"NAME-TARGET.ekb in it)")
    rows, first_failure = [], None
    for t in targets:
        data = {**overrides, "target": t, "output": None}
        cfg = load_build(build_file, data, base=base, passes=passes)
        folder = output or cfg.output.parent
        cfg = cfg.model_copy(update={"output": Path(folder) / f"{cfg.model.name}-{Path(t).stem}.ekb"})
        signing_key = load_private_key(cfg.signing_key)
        try:
            with err_console.status(f"compiling for {t}", spinner="dots") as status, redirect_stdout_to_stderr():
                result = compile_model(cfg, signing_key, on_step=lambda s, t=t: status.update(f"[bold]{t}: {s}[/]…"))
            rows.append(matrix_row(t, result.report))
        except (EdgekitError, RuntimeErrorBase) as exc:
            code = int(getattr(exc, "exit_code", 2))
            first_failure = first_failure or code
            rows.append({"target": t, "result": "failed", "exit_code": code, "error": str(exc).split("\n")[0],
                         "report": str(cfg.output.with_suffix(".report.json"))})
    doc = {"targets": rows, "built": sum(r["result"] == "ok" for r in rows), "failed": sum(r["result"] != "ok"
                                                                                           for r in rows)}
    if as_json:
        print_json(doc)
    else:
        print_matrix(rows)
    if first_failure:
        raise typer.Exit(first_failure)


def matrix_row(target: str, report: dict) -> dict[str, Any]:
    """One target's line of the matrix: size, metric or fidelity, host p50, speed-up, and the caveat."""
    acc, lat, prec = report.get("accuracy", {}), report.get("latency_ms", {}), report.get("precision")
    shipped = lat.get(prec, {})
    metric = acc.get("int8") if prec == "int8" else acc.get("deployed", acc.get("fp32"))
    return {"target": target, "result": "ok", "bundle": report.get("bundle"), "precision": prec,
            "bundle_bytes": report.get("bundle_bytes"), "metric": acc.get("metric"), "value": metric,
            "drop": acc.get("drop_pts"), "fidelity_cosine": (report.get("fidelity") or {}).get("cosine"),
            "p50_ms": shipped.get("p50_ms"), "speedup": lat.get("speedup"), "engine": lat.get("engine"),
            "note": lat.get("warning") or lat.get("not_gated_reason")}


def print_matrix(rows: list[dict[str, Any]]) -> None:
    table = Table(title="targets")
    names = {r.get("metric") for r in rows if r["result"] == "ok" and r.get("metric")}
    metric_col = {"top1_percent": "top-1 %"}.get(next(iter(names)), next(iter(names))) if len(names) == 1 else "metric"
    for col in ("target", "result", "precision", "size KiB", metric_col, "cosine", "host p50 ms", "speed-up"):
        table.add_column(col, justify="right" if col not in ("target", "result") else "left")
    notes = []
    for r in rows:
        if r["result"] != "ok":
            table.add_row(r["target"], "[red]failed[/]", "", "", "", "", "", "")
            notes.append(f"{r['target']}: {r['error']}")
            continue
        metric = "—" if r["value"] is None else f"{r['value']:.2f}" + (f" ({-r['drop']:+.2f})" if r["drop"] is not None
                                                                       else "")
        table.add_row(r["target"], "ok", r["precision"], f"{r['bundle_bytes'] / 1024:.0f}", metric,
                      "—" if r["fidelity_cosine"] is None else f"{r['fidelity_cosine']:.4f}",
                      "—" if r["p50_ms"] is None else f"{r['p50_ms']:.3f}",
                      "—" if r["speedup"] is None else f"{r['speedup']:.2f}×")
        if r["note"]:
            notes.append(f"{r['target']}: host figures do not represent the device: {r['note']}")
    console.print(table)
    for n in notes:
        console.print(f"  {n}", highlight=False, markup=False)


def preprocess_flags(name: str | None, size: str | None, mean: str | None, std: str | None, layout: str | None,
                     model: str | None, input_shape: list[int] | None) -> dict[str, Any]:
    """The ``preprocess`` fields the flags set: a preset's, then --size/--mean/--std/--layout over it.

    Size and layout come from the model's input where it fixes them (an ONNX file, or --input-shape).
    An ONNX input with open height and width takes ``--size`` as its shape: ``_input_shape`` then
    carries the input shape to set (batch 1, the batch stays dynamic).
    """
    from ..config.presets import layout_and_size, parse_floats, parse_size, preset

    if not any((name, size, mean, std, layout)):
        return {}
    out: dict[str, Any] = preset(name) if name else {}
    given = parse_size(size)
    dims = input_shape
    if dims is None and model and model.endswith(".onnx") and Path(model).is_file():
        import onnx

        from ..models.onnx_normalize import graph_inputs, raw_input_shape

        ins = graph_inputs(onnx.load(model, load_external_data=False))
        dims = raw_input_shape(ins[0]) if len(ins) == 1 else None
    model_layout, model_size = layout_and_size(dims)
    if layout is not None and layout.upper() not in ("NCHW", "NHWC"):
        raise ConfigError(f"--layout takes NCHW or NHWC; got {layout!r}")
    out["layout"] = layout.upper() if layout else (model_layout or out.get("layout", "NCHW"))
    if given is not None:
        out["size"] = given
        if model_size is None and dims is not None and len(dims) == 4 and input_shape is None:
            c = dims[1] if out["layout"] == "NCHW" else dims[3]
            if isinstance(c, int) and c > 0:  # open height/width: --size settles the model input too
                shape = [1, c, *given] if out["layout"] == "NCHW" else [1, *given, c]
                out.update(_input_shape=True, _shape=shape)
    elif model_size is not None:
        out["size"] = model_size
    elif name and out.get("type", "image") == "image" and "size" not in out:
        raise ConfigError(f"preset {name!r} needs the image size and the model does not fix it",
                          hint="add --size H,W (or --input-shape with the height and width)")
    for key, text in (("mean", mean), ("std", std)):
        values = parse_floats(text, f"--{key}")
        if values is not None:
            out[key] = values
    return out


def _ratio(text: str | None) -> float | str | None:
    """``--prune-ratio``: a number between 0 and 1, or 'auto'."""
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--prune-ratio takes a share of channels (e.g. 0.5) or 'auto'; got {text!r}") from None


def print_compile_summary(report: dict) -> None:
    """The build report for people: size, accuracy and latency per precision, then every gate."""
    acc = report.get("accuracy", {})
    lat = report.get("latency_ms", {})
    table = Table(title=f"{report['target']} ({report['backend']} {report['backend_version']})")
    metric = {"top1_percent": "top-1 %"}.get(acc.get("metric", "top1_percent"), acc.get("metric"))
    for col in ("precision", metric, "size KiB", "p50 ms", "p90 ms"):
        table.add_column(col, justify="right")
    for prec in ("fp32", "int8"):
        if prec in report.get("sizes", {}):
            a = acc.get(prec, acc.get("deployed"))
            table.add_row(prec + (" (ships)" if prec == report.get("precision") else ""),
                          f"{a:.2f}" if a is not None else "—", f"{report['sizes'][prec] / 1024:.1f}",
                          f"{lat[prec]['p50_ms']:.3f}" if prec in lat else "—",
                          f"{lat[prec]['p90_ms']:.3f}" if prec in lat else "—")
    console.print(table)
    gates = Table(title="gates")
    for col in ("gate", "status", "value", "threshold", "detail"):
        gates.add_column(col, justify="left" if col in ("gate", "detail") else "right")
    style = {"passed": "green", "failed": "red", "not_checked": "dim"}
    for g in report.get("gates", []):
        value = "—" if g["value"] is None else f"{g['value']:.4g}{(' ' + g['unit']) if g['unit'] else ''}"
        threshold = "—" if g["threshold"] is None else f"{g['threshold']:g}"
        gates.add_row(g["name"], f"[{style[g['status']]}]{g['status']}[/]", value, threshold, g["detail"])
    console.print(gates)
    opt = report.get("optimize")
    if opt:
        passes = ", ".join(f"{p['pass']} {p.get('ratio', p.get('teacher', ''))}" for p in opt["passes"])
        metric = opt.get("metric") or {}
        figure = (f"; {metric['name']} {metric['before']:.4g} → {metric['after']:.4g} (validation, torch)"
                  if metric.get("before") is not None else "")
        console.print(f"optimized ({passes}): {opt['macs_reduction']:.2f}× fewer MACs, "
                      f"{opt['params_reduction']:.2f}× fewer parameters{figure}; program: {opt['program']}")
    fid = report.get("fidelity")
    if fid:
        console.print(f"fidelity: cosine {fid['cosine']:.4f} (min {fid['cosine_min']:.4f}), top-1 agreement "
                      f"{fid['top1_agreement']:.3f} on {fid['samples']} held-back calibration samples")
    if report.get("accuracy_not_checked"):
        console.print(f"[yellow]{report['accuracy_not_checked']}[/]")
    for g in report.get("gates", []):
        if g["status"] == "failed":  # gates that failed without refusing changed what ships: say so
            err_console.print(f"[yellow]warning:[/] {g['name']}: {g['detail']}")
    if "drop_pts" in acc:
        top1 = acc.get("metric", "top1_percent") == "top1_percent"
        what, unit = ("drop", " pt") if top1 else (f"{acc.get('metric', '').upper()} increase", "")
        budget = acc.get("budget_pts")
        console.print(f"INT8 {what} {acc['drop_pts']:.4g}{unit} (budget "
                      f"{'none' if budget is None else f'{budget:.4g}'}{unit}) after "
                      f"{len(acc.get('attempts', []))} attempt(s); latency measured on the host "
                      f"({lat.get('measured_on', {}).get('cpu', '?')}), batch 1")
