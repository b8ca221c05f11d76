"""``edgekit train`` and ``edgekit eval``: data → a run folder with a model, metrics and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import ConfigError
from .exits import handle_errors
from .options import JsonOpt, KeyringOpt, VerboseOpt
from .output import console, err_console, print_json, set_verbosity


class EpochProgress:
    """A rich progress bar per epoch on stderr, and one line per finished epoch."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task = None

    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        if self.quiet:
            return
        self.progress = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                                 console=err_console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, loss="—")

    def on_batch(self, step: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step + 1, loss=f"{loss:.4f}")

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.quiet:
            return
        metrics = "  ".join(f"{k[4:]} {v:.4g}" for k, v in row.items() if k.startswith("val_") and k != "val_loss")
        err_console.print(f"epoch {row['epoch']:>3}  train loss {row['train_loss']:.4f}  val loss "
                          f"{row['val_loss']:.4f}  {metrics}  lr {row['lr']:.2e}  {row['seconds']:.1f} s"
                          f"{'  [green]best[/]' if row.get('best') else ''}", highlight=False)


def _overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    from ..config.base import deep_update

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r} is not KEY=VALUE (e.g. --set optim.lr=0.01)")
        parsed = yaml.safe_load(value)
        if parsed is None:  # a None override means "not given": null goes in as a nested section
            *parents, leaf = key.strip().split(".")
            node: dict[str, Any] = {leaf: None}
            for part in reversed(parents[1:]):
                node = {part: node}
            if not parents:
                raise ConfigError(f"--set {pair!r}: only a field inside a section can be null (e.g. optim.ema=null)")
            out[parents[0]] = deep_update(out.get(parents[0]) or {}, node)
        else:
            out[key.strip()] = parsed
    return out


@handle_errors
def train_cmd(
    config: Optional[Path] = typer.Argument(None, help="Training file (YAML); flags override its fields"),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Image folder, .npz, .csv or .parquet"),
    task: Optional[str] = typer.Option(None, "--task", help="classification, regression, forecast, detection or "
                                                            "segmentation"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (runs/NAME)"),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture (default: picked for the data)"),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto, fp32, bf16, fp16"),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="DDP processes on this machine"),
    target: Optional[str] = typer.Option(None, "--target", help="CSV/Parquet: label or value column"),
    time_col: Optional[str] = typer.Option(None, "--time", help="CSV/Parquet: time column"),
    horizon: Optional[int] = typer.Option(None, "--horizon", help="forecast: steps ahead"),
    sets: List[str] = typer.Option([], "--set", help="Any field as KEY=VALUE, e.g. --set loss.name=focal (repeat)"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last.pt"),
    find_lr: bool = typer.Option(False, "--find-lr", help="Run the LR range test, write lr_find.png, and stop"),
    list_archs: bool = typer.Option(False, "--list-archs", help="List the architectures and stop"),
    verbose: int = VerboseOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Train a model on your data into a run folder (model.pt, metrics.json, report.md, TensorBoard events).

    A run folder is a model source: edgekit compile runs/NAME --target T --key K.
    """
    set_verbosity(verbose)
    if list_archs:
        from ..train.models import ARCHS

        if as_json:
            print_json({name: {"kinds": list(a.kinds), "tasks": list(a.tasks), "description": a.description}
                        for name, a in ARCHS.items()})
            return
        table = Table(title="architectures")
        for col in ("name", "data", "tasks", "description"):
            table.add_column(col)
        for name, a in ARCHS.items():
            table.add_row(name, ", ".join(a.kinds), ", ".join(a.tasks), a.description)
        console.print(table)
        return
    from ..config.train import load_train

    overrides: dict[str, Any] = {
        "data.path": data, "data.task": task, "data.target": target, "data.time": time_col, "data.horizon": horizon,
        "out": out, "model.arch": arch, "train.epochs": epochs, "train.batch_size": batch_size, "optim.lr": lr,
        "train.seed": seed, "train.precision": precision, "nproc": nproc,
    }
    overrides.update(_overrides(sets))
    if config is None and data is None:
        raise ConfigError("give a training file (edgekit train train.yaml) or --data DATA --out runs/NAME")
    cfg = load_train(config, overrides)
    if find_lr:
        from ..train.run import find_lr as run_find_lr

        result = run_find_lr(cfg)
        if as_json:
            print_json({k: v for k, v in result.items() if k not in ("lrs", "losses")})
            return
        console.print(f"suggested learning rate [bold]{result['suggested_lr']:.3g}[/] (loss lowest at "
                      f"{result['min_loss_lr']:.3g}); plot: {result['plot']}")
        return
    from ..train.run import train

    result = train(cfg, resume=resume, callbacks=EpochProgress(quiet=as_json))
    m = result.metrics
    if as_json:
        print_json({k: v for k, v in m.items() if k not in ("history", "evaluation")} |
                   {"run": str(result.run_dir), "report": str(result.report)})
        return
    table = Table(title=f"{cfg.run_name}: {m['arch']} on {m['kind']} data ({m['task']})")
    table.add_column("metric")
    table.add_column(m["evaluated_on"], justify="right")
    table.add_column("val", justify="right")
    for k, v in m["test"].items():
        if isinstance(v, (int, float)):
            table.add_row(k, f"{v:.4g}", f"{m['val'][k]:.4g}" if k in m["val"] else "—")
    for name, base in (m["test"].get("baselines") or {}).items():
        table.add_row(f"{name} baseline mae", f"{base['mae']:.4g}", "—")
    console.print(table)
    console.print(f"best epoch {m['best_epoch']} of {m['epochs_run']}, {m['world_size']} process(es), seed "
                  f"{m['seed']}, {m['seconds']:.0f} s")
    console.print(f"run: [bold]{result.run_dir}[/]" + (f"  report: {result.report}" if result.report else ""))


@handle_errors
def eval_cmd(
    source: Path = typer.Argument(..., help="A run folder (runs/NAME) or a bundle (.ekb)"),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data to evaluate on (default for a run: its "
                                        "test split)"),
    compare: List[Path] = typer.Option([], "--compare", help="Another bundle to evaluate side by side (repeat)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for report.md and the PNGs"),
    no_robustness: bool = typer.Option(False, "--no-robustness", help="Skip the perturbation table"),
    keyring_path: Optional[Path] = KeyringOpt,
    verbose: int = VerboseOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Evaluate a run or bundles: metrics, per-class table, calibration, robustness, report.md with PNGs.

    A bundle is evaluated through the device runtime, so FP32 and INT8 bundles compare side by side.
    """
    set_verbosity(verbose)
    from ..evaluate.session import evaluate_source

    result = evaluate_source(source, data=data, compare=list(compare), out=out, robustness=not no_robustness,
                             keyring_path=keyring_path)
    if as_json:
        print_json(result)
        return
    table = Table(title=f"{source.name} on {result['data']} ({result['samples']} samples)")
    names = list(result["evaluation"]["predictors"])
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    keys = [k for k, v in result["evaluation"]["predictors"][names[0]].items() if isinstance(v, (int, float))]
    for k in keys:
        table.add_row(k, *[f"{result['evaluation']['predictors'][n].get(k, float('nan')):.4g}" for n in names])
    console.print(table)
    console.print(f"report: [bold]{result['report']}[/]")
