"""``edgekit tune``: search training and compression settings for the best metric at each latency, measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..errors import ConfigError, EdgekitError, ExitCode
from .exits import handle_errors
from .options import BrokerOpt, CaOpt, JsonOpt, PasswordOpt, SigningKeyOpt, UserOpt, VerboseOpt, broker_settings
from .output import console, err_console, print_json, set_verbosity


class TuneIncomplete(EdgekitError):
    """The workers stopped before the study held every trial asked for (one died, or was interrupted)."""

    exit_code = ExitCode.INTERRUPTED


class Progress:
    """One line on stderr each time the study's count of finished trials changes (not with --json)."""

    def __init__(self, trials: int, quiet: bool):
        self.trials, self.quiet, self.last = trials, quiet, None

    def __call__(self, c: dict[str, int]) -> None:
        line = (f"{c['finished']}/{self.trials} trials finished ({c['complete']} complete, {c['pruned']} pruned, "
                f"{c['fail']} failed, {c['running']} running)")
        if not self.quiet and line != self.last:
            err_console.print(line, highlight=False)
        self.last = line


@handle_errors
def tune_cmd(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="Tune file (YAML): train, search, "
                                  "objectives"),
    trials: int = typer.Option(..., "--trials", "-n", min=1, help="Finished trials the study should hold "
                               "(complete, pruned or refused by a gate), over all workers and runs"),
    target: str = typer.Option(..., "--target", "-t", help="Target profile each trial compiles for"),
    storage: Optional[str] = typer.Option(None, "--storage", help="Study storage: sqlite:///PATH or "
                                          "postgresql://USER@HOST/DB [default: OUT/study.db]"),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="Worker processes on this machine"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Study folder [default: the tune file's out, "
                                       "or tune/STUDY]"),
    key: Optional[Path] = SigningKeyOpt,
    device: Optional[str] = typer.Option(None, "--device", help="Measure latency on this device (each trial's "
                                         "bundle is flashed to it over MQTT, then benchmarked there)"),
    fleet: Optional[str] = typer.Option(None, "--fleet", "-f", help="The device's fleet (with --device)"),
    broker: str = BrokerOpt, username: Optional[str] = UserOpt, password: Optional[str] = PasswordOpt,
    cafile: Optional[Path] = CaOpt,
    serve: str = typer.Option("0.0.0.0:0", "--serve", help="With --device: HOST:PORT the device downloads each "
                              "trial's bundle from (port 0: a free one)"),
    advertise: Optional[str] = typer.Option(None, "--advertise-host", help="With --device: the host name the "
                                            "device reaches --serve by [default: this machine's address]"),
    worker: Optional[int] = typer.Option(None, "--worker", hidden=True, help="Run as worker N of a study"),
    verbose: int = VerboseOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Optuna search over training and compression settings; objectives: the deployed metric and latency.

    Prints the Pareto front and the best bundle for each latency budget; writes front.json and front.png
    into the study folder. Run it again to continue a study (after a crash too); point several machines'
    --storage at one PostgreSQL database to share a study.
    """
    set_verbosity(verbose)
    from ..signing import load_private_key
    from ..tune.config import load_tune, study_name
    from ..tune.study import RemoteTarget, StudyPlan, create_or_load, open_storage, run_worker, spawn_workers, \
        storage_url

    cfg = load_tune(config)
    name = study_name(cfg, config)
    folder = (out or cfg.out or Path("tune") / name).resolve()
    url = storage_url(storage, folder)
    if (device is None) != (fleet is None):
        raise ConfigError("--device and --fleet go together: the device and the fleet it is in")
    if device is not None and workers > 1:
        raise ConfigError("--device measures on one device, which benchmarks one bundle at a time: use "
                          "--workers 1 (or one device per study)")
    if key is None:
        raise ConfigError("each trial's bundle is signed: give --key (or set $EDGEKIT_SIGNING_KEY); edgekit keys "
                          "generate makes a key pair")
    remote = None
    if device is not None:
        remote = RemoteTarget(device=device, fleet=fleet or "",
                              broker=broker_settings(broker, username, password, cafile), serve=serve,
                              advertise_host=advertise)
    plan = StudyPlan(name=name, out=folder, storage=url, trials=trials, target=target, config_path=config.resolve(),
                     key_path=key, remote=remote, worker=worker or 0)
    if worker is not None:  # one of the processes --workers started: run trials, print nothing
        run_worker(plan, cfg, load_private_key(key))
        return
    signing_key = load_private_key(key)
    study = create_or_load(plan, cfg, open_storage(url, cfg))  # made once, before the workers race to make it
    exits: list[int] = []
    progress = Progress(trials, quiet=as_json)
    if workers == 1:
        run_worker(plan, cfg, signing_key, on_progress=progress)
    else:
        args = [str(config.resolve()), "--trials", str(trials), "--target", target, "--storage", url,
                "--out", str(folder), "--key", str(key.resolve())]
        exits = spawn_workers(plan, workers, args, on_progress=progress, study=study)
    doc = report(study, cfg, trials, folder)
    doc["workers"] = {"count": workers, "exit_codes": exits}
    if as_json:
        print_json(doc)
    else:
        print_front(doc)
    if doc["counts"]["finished"] < trials:
        died = [f"worker {n} exited {code}" for n, code in enumerate(exits) if code]
        raise TuneIncomplete(f"the study holds {doc['counts']['finished']} of {trials} finished trials"
                             f"{' (' + ', '.join(died) + ')' if died else ''}; run the same command again to "
                             f"continue it: finished trials are kept")


def report(study: Any, cfg: Any, trials: int, folder: Path) -> dict[str, Any]:
    """The study's front, budget table and counts; also written as front.json/front.png in the study folder."""
    from ..tune.front import summary, write_outputs
    from ..tune.study import counts

    doc = summary(study, cfg.objectives.direction, cfg.objectives.latency, cfg.objectives.budgets_ms, counts(study))
    doc["trials_asked"] = trials
    doc["files"] = write_outputs(doc, folder, cfg.objectives.direction)
    return doc


def print_front(doc: dict[str, Any]) -> None:
    c = doc["counts"]
    lat = doc["objectives"]["latency"].split(" ")[0]
    table = Table(title=f"Pareto front: {doc['study']} on {doc['target']} (latency {lat}, measured "
                        f"{doc['measured_on']})")
    for col in ("trial", "metric", f"{lat} ms", "precision", "settings", "bundle"):
        table.add_column(col, justify="right" if col in ("trial", "metric", f"{lat} ms") else "left")
    for r in doc["front"]:
        settings = ", ".join(f"{k}={_short(v)}" for k, v in r["params"].items())
        table.add_row(str(r["trial"]), f"{r['metric']:.4g}", f"{r['latency_ms']:.4g}", str(r["precision"]),
                      settings, str(r["bundle"]))
    console.print(table)
    if doc["budgets"]:
        bt = Table(title="best bundle for each latency budget")
        for col in ("budget ms", "trial", "metric", f"{lat} ms", "bundle"):
            bt.add_column(col)
        for b in doc["budgets"]:
            best = b["best"]
            if best is None:
                bt.add_row(f"{b['budget_ms']:g}", "—", "—", "—", f"none fits (fastest {b['fastest_ms']:.4g} ms)"
                           if b["fastest_ms"] is not None else "no complete trial")
            else:
                bt.add_row(f"{b['budget_ms']:g}", str(best["trial"]), f"{best['metric']:.4g}",
                           f"{best['latency_ms']:.4g}", str(best["bundle"]))
        console.print(bt)
    console.print(f"{c['finished']} finished trials ({c['complete']} complete, {c['pruned']} pruned, "
                  f"{c['fail']} failed); front: {doc['files']['png']}, {doc['files']['json']}", highlight=False)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
