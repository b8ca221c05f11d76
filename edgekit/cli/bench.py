"""``edgekit bench``: MLPerf-style latency and throughput of a bundle, here or on a device of the fleet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..errors import ConfigError
from .exits import handle_errors
from .options import BrokerOpt, CaOpt, JsonOpt, KeyringOpt, PasswordOpt, UserOpt, broker_settings, keyring
from .output import console, err_console, print_json


@handle_errors
def bench_cmd(
    bundle: Path = typer.Argument(..., exists=True, dir_okay=False, help="The bundle (.ekb)"),
    compare: Optional[Path] = typer.Option(None, "--compare", exists=True, dir_okay=False,
                                           help="Second bundle, run interleaved; ratios vs the first"),
    images: Optional[Path] = typer.Option(None, exists=True, help="Image folder: time pre/post-processing too"),
    queries: int = typer.Option(200, help="Minimum single-stream queries"),
    seconds: float = typer.Option(2.0, help="Minimum single-stream duration"),
    batch: int = typer.Option(8, help="Offline batch size (0: skip)"),
    threads: Optional[int] = typer.Option(None, help="Inference threads [default: manifest/engine]"),
    seed: int = typer.Option(0, help="Sample order seed"),
    keyring_path: Optional[Path] = KeyringOpt,
    json_out: Optional[Path] = typer.Option(None, help="Write the JSON result here"),
    device: Optional[str] = typer.Option(None, "--device", help="Run on this device (it must run BUNDLE), over MQTT"),
    fleet: Optional[str] = typer.Option(None, "--fleet", "-f", help="The device's fleet (with --device)"),
    broker: str = BrokerOpt, username: Optional[str] = UserOpt, password: Optional[str] = PasswordOpt,
    cafile: Optional[Path] = CaOpt,
    remote_timeout: float = typer.Option(300.0, "--timeout", help="Seconds to wait for the device's result"),
    as_json: bool = JsonOpt,
) -> None:
    """MLPerf-style benchmark: single-stream p50/p90/p99 and offline throughput (here, or on a --device)."""
    if device is not None:
        from ..flash.remote_bench import RemoteBenchSettings, bench_on_device

        if compare or images:
            raise ConfigError("--compare and --images run on this machine; a --device benchmark uses the "
                              "device's own active model and synthetic inputs")
        settings = RemoteBenchSettings(queries=queries, seconds=seconds, batch=batch, timeout_s=remote_timeout)
        with err_console.status(f"benchmarking on {device}", spinner="dots"):
            result = bench_on_device(bundle, device, fleet, broker_settings(broker, username, password, cafile),
                                     settings)
        _write(json_out, result)
        if as_json:
            print_json(result)
        else:
            print_bench(result)
            console.print(f"measured on {fleet}/{device}", highlight=False)
        return

    import edgekit_runtime
    from edgekit_runtime.bench import BenchSettings, compare as bench_compare, run_benchmark
    from edgekit_runtime.processing import list_images

    ring = keyring(keyring_path)
    settings = BenchSettings(min_queries=queries, min_duration_s=seconds, offline_batch=batch or None, seed=seed)
    samples = list_images(images) if images else None
    if images and not samples:
        raise ConfigError(f"{images} holds no images")
    # Interleaved comparisons turn ONNX Runtime's spin-waiting off (recorded in the result):
    # two spinning sessions in one process steal each other's cores.
    spin = False if compare else None
    models = {bundle.name: edgekit_runtime.load(bundle, keyring=ring, threads=threads, spin_wait=spin)}
    try:
        if compare:
            name = compare.name if compare.name != bundle.name else f"{compare.name} (2)"
            models[name] = edgekit_runtime.load(compare, keyring=ring, threads=threads, spin_wait=spin)
        with err_console.status("benchmarking", spinner="dots"):
            result = (bench_compare(models, samples, settings) if compare
                      else run_benchmark(models[bundle.name], samples, settings))
    finally:
        for m in models.values():
            m.close()
    _write(json_out, result)
    if as_json:
        print_json(result)
        return
    print_bench(result)


def _write(path: Optional[Path], result: dict[str, Any]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


def print_bench(result: dict) -> None:
    """A benchmark result (one model, or an interleaved comparison) as a table and one line of context."""
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
