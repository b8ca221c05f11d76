"""``edgekit bench``: MLPerf-style latency and throughput of a bundle, here or on a device of the fleet.

Besides latency, a local run reports each bundle's memory (peak RSS of a fresh process that
loads and runs it: :mod:`edgekit_runtime.memory`), draws the single-stream latency CDF of every
model with ``--plot`` and, with ``--profile``, ranks layers by time from the engine's own
profiler in a pass after the timed one (:mod:`edgekit_runtime.profiling`).
"""

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
    memory: bool = typer.Option(True, "--memory/--no-memory",
                                help="Measure each bundle's peak memory (RSS) in a short run in a process of its own"),
    plot: Optional[Path] = typer.Option(None, "--plot", dir_okay=False,
                                        help="Write the single-stream latency CDF of each model to this PNG"),
    profile: bool = typer.Option(False, "--profile",
                                 help="Per-layer timings (OpenVINO, ONNX Runtime profilers), after the timed run"),
    profile_queries: int = typer.Option(50, help="Queries in the --profile pass"),
    profile_top: int = typer.Option(15, help="Layers --profile lists, slowest first"),
    as_json: bool = JsonOpt,
) -> None:
    """MLPerf-style benchmark: single-stream p50/p90/p99, offline throughput, peak memory (here, or on a --device)."""
    if plot is not None and plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot writes a PNG: give a file name ending in .png, not {plot.name!r}")
    if profile and profile_queries < 1:
        raise ConfigError(f"--profile-queries must be at least 1, not {profile_queries}")
    if device is not None:
        from ..flash.remote_bench import RemoteBenchSettings, bench_on_device

        if compare or images or profile:
            raise ConfigError("--compare, --images and --profile run on this machine; a --device benchmark uses "
                              "the device's own active model and synthetic inputs")
        settings = RemoteBenchSettings(queries=queries, seconds=seconds, batch=batch, timeout_s=remote_timeout)
        with err_console.status(f"benchmarking on {device}", spinner="dots"):
            result = bench_on_device(bundle, device, fleet, broker_settings(broker, username, password, cafile),
                                     settings)
        if plot is not None:
            write_latency_plot(result, plot)
        _write(json_out, result)
        if as_json:
            print_json(result)
        else:
            print_bench(result)
            console.print(f"measured on {fleet}/{device} (memory is measured by a local run only)", highlight=False)
        return

    import edgekit_runtime
    from edgekit_runtime.bench import BenchSettings, compare as bench_compare, run_benchmark
    from edgekit_runtime.memory import measure as measure_memory
    from edgekit_runtime.processing import list_images
    from edgekit_runtime.profiling import ProfileSettings, profile_model, profiling_unavailable_reason

    ring = keyring(keyring_path)
    settings = BenchSettings(min_queries=queries, min_duration_s=seconds, offline_batch=batch or None, seed=seed)
    samples = list_images(images) if images else None
    if images and not samples:
        raise ConfigError(f"{images} holds no images")
    # Interleaved comparisons turn ONNX Runtime's spin-waiting off (recorded in the result):
    # two spinning sessions in one process steal each other's cores.
    spin = False if compare else None
    paths = {bundle.name: bundle}
    if compare:
        paths[compare.name if compare.name != bundle.name else f"{compare.name} (2)"] = compare
    models: dict[str, Any] = {}
    profiles: dict[str, dict[str, Any]] = {}
    try:
        for name, path in paths.items():
            models[name] = edgekit_runtime.load(path, keyring=ring, threads=threads, spin_wait=spin)
        if profile:  # say what cannot be profiled before the benchmark, not after it
            reasons = {name: profiling_unavailable_reason(m) for name, m in models.items()}
            if all(reasons.values()):
                raise ConfigError("--profile is not available for " + "; ".join(
                    f"{name}: {reason}" for name, reason in reasons.items()), hint="benchmark without --profile")
            profiles = {name: {"available": False, "reason": reason} for name, reason in reasons.items() if reason}
        with err_console.status("benchmarking", spinner="dots"):
            result = (bench_compare(models, samples, settings) if compare
                      else run_benchmark(models[bundle.name], samples, settings))
        if profile:
            # A profiling session of its own per model, after the timed run: the figures above are unprofiled.
            pset = ProfileSettings(queries=profile_queries, warmup=10, top=profile_top, seed=seed)
            with err_console.status("profiling layers", spinner="dots"):
                for name, m in models.items():
                    if name not in profiles:
                        profiles[name] = {"available": True, **profile_model(m, samples, pset)}
    finally:
        for m in models.values():
            m.close()
    mems: dict[str, dict[str, Any]] = {}
    if memory:
        with err_console.status("measuring memory", spinner="dots"):
            for name, path in paths.items():
                mems[name] = measure_memory(path, ring, threads=threads, warmup=settings.warmup,
                                            offline_batch=settings.offline_batch, images=samples, seed=seed)
    per = result["models"] if compare else {bundle.name: result}
    for name, r in per.items():
        if name in mems:
            r["memory"] = mems[name]
        if name in profiles:
            r["profile"] = profiles[name]
    if plot is not None:
        write_latency_plot(result, plot)
    _write(json_out, result)
    if as_json:
        print_json(result)
        return
    print_bench(result)
    for name, r in per.items():
        if "profile" in r:
            print_profile(name, r["profile"])
    if plot is not None:
        console.print(f"latency CDF: {plot}", highlight=False)


def _write(path: Optional[Path], result: dict[str, Any]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


def _mib(mem: Optional[dict], key: str) -> str:
    return f"{mem[key]:.1f}" if mem and mem.get(key) is not None else "—"


def print_bench(result: dict) -> None:
    """A benchmark result (one model, or an interleaved comparison) as a table and one line of context."""
    per = result["models"] if result["kind"] == "compare" else {"model": result}
    table = Table("model", "precision", "p50 ms", "p90 ms", "p99 ms", "QPS", "offline items/s", "speed-up",
                  "RSS base MiB", "RSS loaded MiB", "RSS peak MiB")
    for name, r in per.items():
        inf = r["single_stream"]["inference"]
        off = r.get("offline") or {}
        mem = r.get("memory")
        ratio = next(iter(result.get("ratios", {}).get(name, {}).values()), None)
        table.add_row(name, r["system"]["model"]["precision"], f"{inf['p50_ms']:.3f}", f"{inf['p90_ms']:.3f}",
                      f"{inf['p99_ms']:.3f}", f"{r['single_stream']['qps']:.0f}",
                      f"{off['items_per_s']:.0f}" if "items_per_s" in off else "—",
                      f"{ratio:.2f}×" if ratio else "—",
                      _mib(mem, "baseline_mib"), _mib(mem, "after_load_mib"), _mib(mem, "peak_mib"))
    console.print(table)
    for name, r in per.items():  # --images: the photo's way through the device, stage by stage
        stages = {k: r["single_stream"][k]["p50_ms"] for k in ("preprocess", "inference", "postprocess", "end_to_end")
                  if isinstance(r["single_stream"].get(k), dict)}
        if "preprocess" in stages:
            console.print(f"{name} p50 per stage: " + " · ".join(
                f"{k.replace('_', ' ')} {v:.3f} ms" for k, v in stages.items()), highlight=False)
    sysd = next(iter(per.values()))["system"]
    console.print(f"{sysd['cpu']}, {sysd['usable_cores']} cores, engine {sysd['model']['engine']} "
                  f"{sysd['model']['version']}, threads {sysd['model']['threads'] or 'default'}, "
                  f"{'interleaved' if result['kind'] == 'compare' else 'single run'}", highlight=False)
    if any(r.get("memory") for r in per.values()):
        console.print("RSS: a fresh process per bundle (runtime imported → bundle loaded → peak over warm-up, "
                      "queries and offline batches); host memory only", highlight=False)


def print_profile(name: str, prof: dict) -> None:
    """One model's ``--profile`` result: its slowest layers as a table, or why the engine cannot be profiled."""
    if not prof.get("available", True):
        console.print(f"{name}: per-layer profile not available for this engine: {prof['reason']}", highlight=False)
        return
    table = Table("share", "mean µs", "op type", "precision", "kernel", "layer",
                  title=f"{name}: slowest layers ({prof['engine']}, {prof['queries']} profiled queries)")
    for row in prof["layers"]:
        table.add_row(f"{row['share']:.1%}", f"{row['mean_us']:.1f}", row["op_type"], row["precision"] or "?",
                      row["kernel"] or "", row["name"])
    console.print(table)
    console.print(f"layers account for {prof['coverage']:.0%} of a profiled query ({prof['latency_ms']['mean']:.3f} ms "
                  f"with the profiler on); the rest is per-call overhead", highlight=False)


def latency_figure(result: dict):
    """The single-stream inference latency CDF of every model in ``result``, one curve each (matplotlib Figure).

    Drawn from the 101 latency quantiles the result carries (schema 2); a CDF rather than a
    histogram because quantiles give it exactly, with no binning to choose.
    """
    from matplotlib.figure import Figure

    per = result["models"] if result["kind"] == "compare" else {"model": result}
    missing = [name for name, r in per.items() if "inference_quantiles_ms" not in r["single_stream"]]
    if missing:
        raise ConfigError(f"the result has no latency quantiles for {', '.join(missing)} (result schema "
                          f"{result.get('schema_version', 1)}): the edgekit-runtime that measured it predates "
                          f"them", hint="upgrade edgekit-runtime where the benchmark runs, or leave out --plot")
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, r in per.items():
        q = r["single_stream"]["inference_quantiles_ms"]
        inf = r["single_stream"]["inference"]
        ax.plot(q, [i / (len(q) - 1) for i in range(len(q))],
                label=f"{name} (p50 {inf['p50_ms']:.3f} ms, p99 {inf['p99_ms']:.3f} ms)")
    lo = min(min(r["single_stream"]["inference_quantiles_ms"]) for r in per.values())
    hi = max(max(r["single_stream"]["inference_quantiles_ms"]) for r in per.values())
    if lo > 0 and hi / lo > 20:  # a long tail squeezes the body of the curve into one pixel column
        ax.set_xscale("log")
    ax.set_xlabel("inference latency (ms)")
    ax.set_ylabel("share of queries ≤ latency")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    engines = sorted({f"{r['system']['model']['engine']} {r['system']['model']['version']}" for r in per.values()})
    ax.set_title(f"single-stream latency CDF ({'interleaved' if result['kind'] == 'compare' else 'single run'}, "
                 f"{', '.join(engines)})\n{next(iter(per.values()))['system']['cpu']}", fontsize="small")
    return fig


def write_latency_plot(result: dict, path: Path) -> Path:
    """Write :func:`latency_figure` of ``result`` to ``path`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = latency_figure(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path
