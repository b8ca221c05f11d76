"""``edgekit demo``: the built-in example end to end, with its steps and final table printed here."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from .exits import handle_errors
from .options import JsonOpt, VerboseOpt
from .output import console, err_console, print_json, set_verbosity


@handle_errors
def demo_cmd(workdir: Path = typer.Option(Path("build/demo"), help="Where everything is written"),
             epochs: int = typer.Option(15, help="Training epochs"),
             seconds: float = typer.Option(2.0, help="Benchmark seconds per comparison"),
             verbose: int = VerboseOpt,
             as_json: bool = JsonOpt) -> None:
    """Train on digits with edgekit train, compile INT8 for both x86 targets, verify, run and benchmark."""
    from .._console import redirect_stdout_to_stderr

    set_verbosity(verbose)
    from ..demo import run_demo

    steps = err_console if as_json else console
    # with --json, whatever the compilers' libraries print goes to stderr with the steps
    with redirect_stdout_to_stderr() if as_json else contextlib.nullcontext():
        summary = run_demo(workdir, epochs=epochs, seconds=seconds,
                           on_step=lambda text: steps.print(text, highlight=False, markup=False))
    if as_json:
        print_json(summary)
    else:
        print_demo_table(summary)


def print_demo_table(summary: dict[str, Any]) -> None:
    """The demo's FP32 vs INT8 table and how it was measured."""
    table = Table(title="digits (edgekit train, resnet_small): FP32 vs INT8, held-out test split (360 PNGs)")
    for col in ("target", "precision", "top-1 %", "Δ pt", "size KiB", "p50 ms", "p90 ms", "speed-up"):
        table.add_column(col, justify="right" if col not in ("target", "precision") else "left")
    for r in summary["rows"]:
        table.add_row(r["target"], r["precision"].upper(), f"{r['top1']:.2f}",
                      "" if r["drop_pts"] is None else f"{0.0 - r['drop_pts']:+.2f}", f"{r['size_bytes'] / 1024:.1f}",
                      f"{r['p50_ms']:.4f}", f"{r['p90_ms']:.4f}", f"{r['speedup']:.2f}×")
    console.print(table)
    s = summary["system"]
    console.print(f"Latency: batch 1, single stream, FP32/INT8 interleaved in one process; {s['cpu']} "
                  f"({', '.join(s['cpu_flags']) or 'no AVX-512'}), {s['usable_cores']} cores, default threads. "
                  f"Accuracy: the test PNGs through the device runtime (the build's gate used the validation "
                  f"split); FP32 on OpenVINO with "
                  f"INFERENCE_PRECISION_HINT=f32. A model this small (8×8 input) is dominated by per-call "
                  f"overhead, so INT8 gains little in speed here; benchmarks/ has resnet and mobilenet figures.",
                  highlight=False)
    console.print(f"done in {summary['seconds']:.0f} s", highlight=False)
