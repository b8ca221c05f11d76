"""``edgekit``: the host command line (typer + rich).

Every command that produces results takes ``--json`` for scripts. Errors a
user can act on are printed without a traceback and exit non-zero; anything
else is a bug and shows its traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import EdgekitError

app = typer.Typer(help="Compile models for edge devices, ship signed bundles, run and benchmark them.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
targets_app = typer.Typer(help="Device profiles.", no_args_is_help=True)
bundle_app = typer.Typer(help="Inspect, verify and sign bundles.", no_args_is_help=True)
keys_app = typer.Typer(help="Signing keys.", no_args_is_help=True)
app.add_typer(targets_app, name="targets")
app.add_typer(bundle_app, name="bundle")
app.add_typer(keys_app, name="keys")

# Tables stay readable when the output is piped or logged (rich assumes 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON")
KeyringOpt = typer.Option(None, "--keyring", help="Trusted public key (.pub) or a directory of them "
                          "[default: $EDGEKIT_KEYRING or /etc/edgekit/keys]")


def handle_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from edgekit_runtime.contract.errors import RuntimeErrorBase

        try:
            return fn(*args, **kwargs)
        except EdgekitError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except RuntimeErrorBase as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(3) from None

    return wrapper


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _keyring(path: Optional[Path]):
    from edgekit_runtime.keyring import Keyring

    return Keyring.from_paths(path) if path else Keyring.default()


# ----------------------------------------------------------------------------- targets
@targets_app.command("list")
@handle_errors
def targets_list(as_json: bool = JsonOpt) -> None:
    """List the device profiles edgekit knows."""
    from .config.targets import available_targets, load_target

    profiles = [load_target(p) for p in available_targets().values()]
    if as_json:
        print_json([p.model_dump() for p in profiles])
        return
    table = Table("name", "backend", "device", "INT8", "max drop (pt)", "description")
    for p in profiles:
        table.add_row(p.name, p.backend, p.device.family, "yes" if p.quantize.enabled else "no",
                      str(p.accuracy.max_accuracy_drop), p.description)
    console.print(table)


@targets_app.command("show")
@handle_errors
def targets_show(name: str = typer.Argument(..., help="Profile name or YAML path"), as_json: bool = JsonOpt) -> None:
    """Show one profile with every setting."""
    from .config.targets import load_target

    profile = load_target(name)
    if as_json:
        print_json(profile.model_dump())
    else:
        import yaml

        console.print(yaml.safe_dump(profile.model_dump(), sort_keys=False), highlight=False)


# ----------------------------------------------------------------------------- keys
@keys_app.command("generate")
@handle_errors
def keys_generate(
    out: Path = typer.Option(Path("keys"), "--out", help="Directory for NAME.key and NAME.pub"),
    name: str = typer.Option("edgekit", help="File name stem"),
    force: bool = typer.Option(False, help="Overwrite an existing key"),
    as_json: bool = JsonOpt,
) -> None:
    """Create an ed25519 signing key pair; devices trust the .pub file."""
    from .signing import generate_keypair

    priv, pub, key_id = generate_keypair(out, name, overwrite=force)
    if as_json:
        print_json({"private_key": str(priv), "public_key": str(pub), "key_id": key_id})
    else:
        console.print(f"key {key_id}: private {priv} (keep secret), public {pub} (copy to devices' keyring)")


# ----------------------------------------------------------------------------- compile
def _shape(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise EdgekitError(f"--input-shape {text!r} is not like 1,3,224,224") from None


@app.command("compile")
@handle_errors
def compile_cmd(
    source: Optional[str] = typer.Argument(None, help="Build file (.yaml), or a model: .onnx, .pt2, module:factory"),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Profile name or YAML path"),
    checkpoint: Optional[Path] = typer.Option(None, help="State dict for a factory model"),
    name: Optional[str] = typer.Option(None, help="Model name in the bundle"),
    version: Optional[str] = typer.Option(None, help="Model version in the bundle"),
    release: Optional[int] = typer.Option(None, help="Anti-rollback release counter"),
    input_shape: Optional[str] = typer.Option(None, help="e.g. 1,3,224,224"),
    calibration: Optional[str] = typer.Option(None, help="Calibration data source"),
    validation: Optional[str] = typer.Option(None, help="Labelled validation data source"),
    max_accuracy_drop: Optional[float] = typer.Option(None, help="Budget in top-1 points"),
    no_accuracy_check: bool = typer.Option(False, "--no-accuracy-check",
                                           help="Ship INT8 without an accuracy budget (no labelled data)"),
    no_quantize: bool = typer.Option(False, "--no-quantize", help="Ship FP32 (no INT8)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Bundle path (.ekb)"),
    key: Optional[Path] = typer.Option(None, help="Signing key [default: $EDGEKIT_SIGNING_KEY]"),
    as_json: bool = JsonOpt,
) -> None:
    """Compile a model for a device profile into a signed bundle.

    Flags override the build file's fields; the result is validated again.
    """
    from .build.pipeline import compile_model
    from .config import load_build
    from .signing import load_private_key

    build_file = Path(source) if source and source.endswith((".yaml", ".yml")) else None
    overrides: dict[str, Any] = {
        "model.source": None if build_file else source,
        "target": target,
        "model.checkpoint": checkpoint,
        "model.name": name or (Path(source).stem.split(":")[-1] if source and not build_file else None),
        "model.version": version,
        "model.release": release,
        "model.input_shape": _shape(input_shape),
        "calibration.source": calibration,
        "validation.source": validation,
        "output": output,
        "signing_key": key,
    }
    if max_accuracy_drop is not None and no_accuracy_check:
        raise EdgekitError("give --max-accuracy-drop or --no-accuracy-check, not both")
    if max_accuracy_drop is not None:
        overrides["accuracy.max_accuracy_drop"] = max_accuracy_drop
    if no_accuracy_check:
        overrides["accuracy"] = {"max_accuracy_drop": None}
    if no_quantize:
        overrides["quantize.enabled"] = False
    cfg = load_build(build_file, overrides)
    signing_key = load_private_key(cfg.signing_key)
    with console.status("compiling", spinner="dots") as status:
        result = compile_model(cfg, signing_key, on_step=lambda s: status.update(f"[bold]{s}[/]…"))
    if as_json:
        print_json(result.report)
        return
    print_compile_summary(result.report)
    console.print(f"bundle: [bold]{result.bundle}[/]  report: {result.report_path}")


def print_compile_summary(report: dict) -> None:
    acc = report.get("accuracy", {})
    lat = report.get("latency_ms", {})
    table = Table(title=f"{report['target']} ({report['backend']} {report['backend_version']})")
    for col in ("precision", "top-1 %", "size KiB", "p50 ms", "p90 ms"):
        table.add_column(col, justify="right")
    for prec in ("fp32", "int8"):
        if prec in report.get("sizes", {}):
            a = acc.get(prec, acc.get("deployed"))
            table.add_row(prec, f"{a:.2f}" if a is not None else "—", f"{report['sizes'][prec] / 1024:.1f}",
                          f"{lat[prec]['p50_ms']:.3f}" if prec in lat else "—",
                          f"{lat[prec]['p90_ms']:.3f}" if prec in lat else "—")
    console.print(table)
    if "drop_pts" in acc:
        console.print(f"INT8 drop {acc['drop_pts']:.2f} pt (budget {acc.get('budget_pts')} pt) after "
                      f"{len(acc.get('attempts', []))} attempt(s); latency measured on the host "
                      f"({lat.get('measured_on', {}).get('cpu', '?')}), batch 1")


# ----------------------------------------------------------------------------- bundle
@bundle_app.command("inspect")
@handle_errors
def bundle_inspect(bundle: Path, as_json: bool = JsonOpt) -> None:
    """Show a bundle's manifest (without verifying it: use `bundle verify` for that)."""
    from edgekit_runtime.bundle import read_manifest_unverified

    m = read_manifest_unverified(bundle)
    if as_json:
        print_json(m)
        return
    table = Table(show_header=False, title=f"{bundle} (not verified)")
    rows = [
        ("format", m.get("format_version")), ("model", f"{m['model']['name']} {m['model']['version']} "
                                                     f"(release {m['model']['release']})"),
        ("target", m["target"]["name"]), ("backend", f"{m['backend']['name']} {m['backend']['version']}"),
        ("precision", m["backend"]["precision"]), ("engines", ", ".join(m["backend"]["engines"])),
        ("inputs", "; ".join(f"{t['name']} {t['dtype']} {t['shape']}" for t in m["inputs"])),
        ("outputs", "; ".join(f"{t['name']} {t['dtype']} {t['shape']}" for t in m["outputs"])),
        ("accuracy", json.dumps({k: v for k, v in m["metrics"].get("accuracy", {}).items()
                                 if k in ("fp32", "int8", "drop_pts", "budget_pts")})),
        ("calibration", (m.get("calibration") or {}).get("sha256", "—")),
        ("signed by", m["signing"]["key_id"]), ("files", ", ".join(m["files"])),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)


@bundle_app.command("verify")
@handle_errors
def bundle_verify(bundle: Path, keyring: Optional[Path] = KeyringOpt,
                  health: bool = typer.Option(True, help="Also load it and run the health check"),
                  as_json: bool = JsonOpt) -> None:
    """Verify signature and every member's sha256, as a device does; then health-check it."""
    import edgekit_runtime

    ring = _keyring(keyring)
    vb = edgekit_runtime.open_bundle(bundle, ring)
    result: dict[str, Any] = {"ok": True, "bundle": str(bundle), "key_id": vb.key_id, "files": len(vb.members)}
    if health:
        with edgekit_runtime.load(bundle, keyring=ring) as model:
            result["health_check"] = model.health_check()
            result["ok"] = result["health_check"]["ok"]
    if as_json:
        print_json(result)
    else:
        console.print(f"[green]verified[/] {bundle}: signed by {vb.key_id}, {len(vb.members)} files match"
                      + (f"; health check {'passed' if result['ok'] else 'FAILED'}" if health else ""))
    if not result["ok"]:
        raise typer.Exit(3)


@bundle_app.command("sign")
@handle_errors
def bundle_sign(bundle: Path, key: Optional[Path] = typer.Option(None, help="Signing key"),
                out: Optional[Path] = typer.Option(None, help="Write here instead of in place"),
                keyring: Optional[Path] = typer.Option(None, "--keyring",
                                                       help="Verify the current signature with these keys first")) -> None:
    """(Re-)sign a bundle, e.g. after rotating keys; refuses a bundle whose files do not match."""
    from .build.bundle_writer import resign_bundle
    from .signing import load_private_key

    path = resign_bundle(bundle, load_private_key(key), out, keyring=_keyring(keyring) if keyring else None)
    console.print(f"signed {path}")


# ----------------------------------------------------------------------------- run / bench
@app.command("run")
@handle_errors
def run_cmd(bundle: Path, inputs: list[Path] = typer.Argument(..., help="Images or folders"),
            keyring: Optional[Path] = KeyringOpt, top_k: int = typer.Option(3), as_json: bool = JsonOpt) -> None:
    """Predict on images with the device runtime."""
    import edgekit_runtime
    from edgekit_runtime.processing import list_images

    files = [f for p in inputs for f in (list_images(p) if p.is_dir() else [p])]
    with edgekit_runtime.load(bundle, keyring=_keyring(keyring)) as model:
        model.manifest["postprocess"] = dict(model.manifest["postprocess"] or {"type": "classification"}, top_k=top_k)
        results = model.predict(files)
    rows = [{"input": str(f), **r} for f, r in zip(files, results)]
    if as_json:
        print_json(rows)
        return
    table = Table("input", "prediction")
    for row in rows:
        table.add_row(row["input"], ", ".join(f"{t['label']} ({t['score']:.3f})" for t in row.get("top_k", [])))
    console.print(table)


@app.command("bench")
@handle_errors
def bench_cmd(
    bundle: Path,
    compare: Optional[Path] = typer.Option(None, "--compare", help="Second bundle, run interleaved; ratios vs the first"),
    images: Optional[Path] = typer.Option(None, help="Image folder: time pre/post-processing too"),
    queries: int = typer.Option(200, help="Minimum single-stream queries"),
    seconds: float = typer.Option(2.0, help="Minimum single-stream duration"),
    batch: int = typer.Option(8, help="Offline batch size (0: skip)"),
    threads: Optional[int] = typer.Option(None, help="Inference threads [default: manifest/engine]"),
    seed: int = typer.Option(0, help="Sample order seed"),
    keyring: Optional[Path] = KeyringOpt,
    json_out: Optional[Path] = typer.Option(None, help="Write the JSON result here"),
    device: Optional[str] = typer.Option(None, "--device", help="Run on this device (it must run BUNDLE), over MQTT"),
    fleet: Optional[str] = typer.Option(None, "--fleet", "-f", help="The device's fleet (with --device)"),
    broker: str = typer.Option("mqtt://127.0.0.1:1883", "--broker", "-b", envvar="EDGEKIT_BROKER",
                               help="MQTT broker (with --device)"),
    username: Optional[str] = typer.Option(None, "--username", "-u", envvar="EDGEKIT_MQTT_USERNAME"),
    password: Optional[str] = typer.Option(None, "--password", envvar="EDGEKIT_MQTT_PASSWORD"),
    cafile: Optional[Path] = typer.Option(None, "--cafile", help="Broker CA (mqtts://)"),
    remote_timeout: float = typer.Option(300.0, "--timeout", help="Seconds to wait for the device's result"),
    as_json: bool = JsonOpt,
) -> None:
    """MLPerf-style benchmark: single-stream p50/p90/p99 and offline throughput (here, or on a --device)."""
    import edgekit_runtime
    from edgekit_runtime.bench import BenchSettings, compare as bench_compare, run_benchmark
    from edgekit_runtime.processing import list_images

    if device is not None:
        from .cli_fleet import _settings
        from .cli_flash import remote_bench

        if compare or images:
            raise EdgekitError("--compare and --images run on this machine; a --device benchmark uses the "
                               "device's own active model and synthetic inputs")
        settings = _settings(broker, username, password, cafile, None, None).with_password_from_env()
        with console.status(f"benchmarking on {device}", spinner="dots"):
            result = remote_bench(bundle, device, fleet, settings, queries=queries, seconds=seconds, batch=batch,
                                  timeout=remote_timeout)
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result, indent=2))
        if as_json:
            print_json(result)
        else:
            print_bench(result)
            console.print(f"measured on {fleet}/{device}", highlight=False)
        return

    ring = _keyring(keyring)
    settings = BenchSettings(min_queries=queries, min_duration_s=seconds, offline_batch=batch or None, seed=seed)
    samples = list_images(images) if images else None
    if images and not samples:
        raise EdgekitError(f"{images} holds no images")
    # Interleaved comparisons turn ONNX Runtime's spin-waiting off (recorded in the result):
    # two spinning sessions in one process steal each other's cores.
    spin = False if compare else None
    models = {bundle.name: edgekit_runtime.load(bundle, keyring=ring, threads=threads, spin_wait=spin)}
    if compare:
        name = compare.name if compare.name != bundle.name else f"{compare.name} (2)"
        models[name] = edgekit_runtime.load(compare, keyring=ring, threads=threads, spin_wait=spin)
    try:
        with console.status("benchmarking", spinner="dots"):
            result = (bench_compare(models, samples, settings) if compare
                      else run_benchmark(models[bundle.name], samples, settings))
    finally:
        for m in models.values():
            m.close()
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
    if as_json:
        print_json(result)
        return
    print_bench(result)


def print_bench(result: dict) -> None:
    per = result["models"] if result["kind"] == "compare" else {"model": result}
    table = Table("model", "precision", "p50 ms", "p90 ms", "p99 ms", "QPS", "offline items/s", "speed-up")
    for name, r in per.items():
        inf = r["single_stream"]["inference"]
        off = r.get("offline") or {}
        ratio = next(iter(result.get("ratios", {}).get(name, {}).values()), None)
        table.add_row(name, r["system"]["model"]["precision"], f"{inf['p50_ms']:.3f}", f"{inf['p90_ms']:.3f}",
                      f"{inf['p99_ms']:.3f}", f"{r['single_stream']['qps']:.0f}",
                      f"{off['items_per_s']:.0f}" if "items_per_s" in off else "—",
                      f"{ratio:.2f}×" if ratio else "—")
    console.print(table)
    sysd = next(iter(per.values()))["system"]
    console.print(f"{sysd['cpu']}, {sysd['usable_cores']} cores, engine {sysd['model']['engine']} "
                  f"{sysd['model']['version']}, threads {sysd['model']['threads'] or 'default'}, "
                  f"{'interleaved' if result['kind'] == 'compare' else 'single run'}", highlight=False)


# ----------------------------------------------------------------------------- demo
@app.command("demo")
@handle_errors
def demo_cmd(workdir: Path = typer.Option(Path("build/demo"), help="Where everything is written"),
             epochs: int = typer.Option(15, help="Training epochs"),
             seconds: float = typer.Option(2.0, help="Benchmark seconds per comparison"),
             as_json: bool = JsonOpt) -> None:
    """Train the digits CNN, compile INT8 for both x86 targets, verify, run and benchmark."""
    from .demo import run_demo

    summary = run_demo(workdir, epochs=epochs, seconds=seconds, console=None if as_json else console)
    if as_json:
        print_json(summary)


# ----------------------------------------------------------------------------- fleet (edgekit/cli_fleet.py)
from .cli_fleet import broker_cmd, fleet_app  # noqa: E402  (mounted after the commands above)
from .cli_flash import flash_cmd, rollback_cmd, serve_cmd  # noqa: E402
app.add_typer(fleet_app, name="fleet")
app.command("broker")(broker_cmd)
app.command("flash")(handle_errors(flash_cmd))
app.command("serve")(handle_errors(serve_cmd))
app.command("rollback")(handle_errors(rollback_cmd))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
