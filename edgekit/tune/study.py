"""Running a tune study: storage, sampler, one trial (train → compile → measure), workers that share a study.

A study lives in an Optuna RDB storage (SQLite in the study folder by default, PostgreSQL for many
machines). Each worker runs trials until the study holds ``trials`` finished ones (complete, pruned,
or refused by a build gate); a trial whose worker died stops beating, is failed after ``grace_s`` and
queued again (Optuna's heartbeat + :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`), so a
killed worker loses only the trial it was running, and re-running the command continues the study.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, DeviceError, EdgekitError
from .config import TuneConfig, base_train
from .space import TrialSettings, sample

log = logging.getLogger(__name__)

# a trial whose build a gate refused (or that failed with a user-facing error) carries this user attribute
ERROR_ATTR = "error"
VAL_CURVE_ATTR = "val_curve"
WAIT_POLL_S = 1.0
PROGRESS_POLL_S = 2.0
# a worker whose trials fail this many times in a row stops: the cause is shared (data path, pruner.monitor),
# not the sampled settings
MAX_FAILED_IN_ROW = 3


class TuneError(EdgekitError):
    """Every recent trial failed the same way: a setting all trials share is wrong."""


@dataclass(frozen=True)
class RemoteTarget:
    """Latency measured on a real device: each trial's bundle is flashed to it, then benchmarked there."""

    device: str
    fleet: str
    broker: Any  # edgekit.fleet.connection.BrokerSettings
    serve: str = "0.0.0.0:0"  # HOST:PORT the device downloads each trial's bundle from (port 0: a free one)
    advertise_host: str | None = None  # the host name the device reaches ``serve`` by
    queries: int = 200
    seconds: float = 2.0
    timeout_s: float = 600.0


@dataclass
class StudyPlan:
    """Where a study lives and what it measures; the same for every worker of the study."""

    name: str
    out: Path
    storage: str  # an SQLAlchemy URL
    trials: int
    target: str
    config_path: Path | None
    key_path: Path | None = None
    remote: RemoteTarget | None = None
    worker: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- storage
def storage_url(url: str | None, out: Path) -> str:
    """An SQLAlchemy URL: SQLite in the study folder by default; ``postgresql://`` goes through psycopg 3."""
    if url is None:
        return f"sqlite:///{(out / 'study.db').resolve()}"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith(("sqlite:///", "postgresql+", "mysql")):
        return url
    if "://" not in url:  # a plain file name: a SQLite file
        return f"sqlite:///{Path(url).resolve()}"
    raise ConfigError(f"--storage {url!r}: give a SQLite file, sqlite:///PATH or postgresql://USER@HOST/DB")


def open_storage(url: str, cfg: TuneConfig) -> Any:
    """The RDB storage with heartbeats: a trial left RUNNING by a dead worker is failed, then queued again."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats and fail_stale_trials are marked experimental since Optuna 2.8/2.9; the warning says nothing
    # a user can act on, on every trial of every worker
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        Path(url.split("sqlite:///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 120}}  # several workers write one file: wait for the lock
    try:
        return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=cfg.heartbeat_s, grace_period=cfg.grace_s,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry))
    except ImportError as exc:
        raise ConfigError(f"the study storage {url.split('://')[0]} needs a driver that is not installed ({exc})") \
            from None
    except Exception as exc:  # sqlalchemy's OperationalError and friends: the database is not reachable
        raise ConfigError(f"cannot open the study storage {_redact(url)}: {str(exc).splitlines()[0]}") from None


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def make_sampler(cfg: TuneConfig, worker: int, trials: int) -> Any:
    """Workers sample with different seeds, and TPE pretends running trials finished badly (constant liar)
    so that parallel workers do not all try the same point."""
    import optuna

    s = cfg.sampler
    seed = s.seed + worker
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.type == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, trials // 2)))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.startup_trials, multivariate=True,
                                      constant_liar=True)


def create_or_load(plan: StudyPlan, cfg: TuneConfig, storage: Any, worker: int = 0) -> Any:
    """The study (created on first use); a resumed study must measure the same target and latency."""
    import optuna

    directions = [cfg.objectives.direction, "minimize"]
    study = optuna.create_study(study_name=plan.name, storage=storage, directions=directions, load_if_exists=True,
                                sampler=make_sampler(cfg, worker, plan.trials))
    where = f"{plan.remote.fleet}/{plan.remote.device}" if plan.remote else "local"
    wanted = {"target": plan.target, "latency": cfg.objectives.latency, "measured_on": where}
    have = study.user_attrs
    if not have:
        for k, v in wanted.items():
            study.set_user_attr(k, v)
    else:
        changed = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(f"study {plan.name!r} was started with other settings ({what}); its trials would "
                              f"not compare: keep them, or give another study name (study: in the tune file)")
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"study {plan.name!r} optimises {[d.name.lower() for d in study.directions]}, this tune "
                          f"file {directions}: give another study name")
    return study


# ----------------------------------------------------------------------------- counting
def finished(trial: Any) -> bool:
    """Complete, pruned, or failed by a user-facing error (a gate refused the build): it will not run again.

    A trial failed by the heartbeat (its worker died) is not finished: its retry is.
    """
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and ERROR_ATTR in trial.user_attrs)


def counts(study: Any) -> dict[str, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    out = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    out["finished"] = sum(finished(t) for t in trials)
    return out


# ----------------------------------------------------------------------------- one trial
class EpochReporter:
    """The training loop's per-epoch hook: stores the validation curve on the trial and prunes bad trials.

    The rule is Optuna's percentile pruner, applied by hand: Optuna 5.1 refuses ``Trial.report`` and
    ``Trial.should_prune`` in multi-objective studies (NotImplementedError).
    """

    def __init__(self, trial: Any, cfg: TuneConfig):
        self.trial, self.cfg = trial, cfg
        self.curve: dict[str, float] = {}

    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def on_batch(self, step: int, loss: float) -> None:
        pass

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        import optuna
        from optuna.trial import TrialState

        p = self.cfg.pruner
        key = f"val_{p.monitor}"
        if key not in row:
            have = ", ".join(k[4:] for k in row if k.startswith("val_"))
            raise ConfigError(f"pruner.monitor {p.monitor!r}: the training loop reports {have}; name one of them")
        epoch = int(row["epoch"])
        self.curve[str(epoch)] = float(row[key])
        self.trial.set_user_attr(VAL_CURVE_ATTR, self.curve)
        if p.type == "none" or epoch < max(1, p.warmup_epochs):
            return
        # as Optuna's PercentilePruner: compared with the complete trials only (pruned ones stopped early
        # because they were bad; counting them would lower the bar)
        others = [t.user_attrs[VAL_CURVE_ATTR][str(epoch)]
                  for t in self.trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if str(epoch) in (t.user_attrs.get(VAL_CURVE_ATTR) or {})]
        if should_prune(list(self.curve.values()), others, p.type, p.percentile, p.startup_trials,
                        p.monitor_direction):
            self.trial.set_user_attr("pruned_at_epoch", epoch)
            raise optuna.TrialPruned(f"val {p.monitor} {self.curve[str(epoch)]:.4g} at epoch {epoch} is below the "
                                     f"{'median' if p.type == 'median' else f'top {p.percentile:g} %'} of "
                                     f"{len(others)} complete trials")


def should_prune(curve: list[float], others: list[float], kind: str, percentile: float, startup: int,
                 direction: str) -> bool:
    """Whether the best value so far is outside the top ``percentile`` % of the others at this epoch."""
    if kind == "none" or len(others) < max(1, startup) or not curve:
        return False
    keep = 50.0 if kind == "median" else percentile
    if direction == "maximize":
        return max(curve) < float(np.percentile(others, 100.0 - keep))
    return min(curve) > float(np.percentile(others, keep))


def deployed_figures(report: dict[str, Any], percentile: str) -> dict[str, Any]:
    """The shipped artifact's metric (measured through the device engine) and latency from a compile report."""
    acc = report.get("accuracy") or {}
    precision = report.get("precision")
    metric = acc.get("deployed", acc.get("int8" if precision == "int8" else "fp32"))
    if metric is None:
        raise ConfigError("the compile measured no task metric (no labelled validation data): a tune study needs "
                          "one; compile from a run folder (the trials do) with a validation split")
    lat = (report.get("latency_ms") or {}).get(precision) or {}
    return {"metric": float(metric), "metric_name": acc.get("metric"), "precision": precision,
            "latency_ms": float(lat[f"{percentile}_ms"]), "latency_engine": report["latency_ms"].get("engine"),
            "fp32_metric": acc.get("fp32"), "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms")}


class Objective:
    """One trial: train a run folder with the sampled settings, compile it, measure, keep the bundle."""

    def __init__(self, plan: StudyPlan, cfg: TuneConfig, key: Any):
        self.plan, self.cfg, self.key = plan, cfg, key
        self.base = base_train(cfg, plan.config_path)

    def __call__(self, trial: Any) -> tuple[float, float]:
        from edgekit_runtime.contract.errors import RuntimeErrorBase

        settings = sample(trial, self.cfg)
        tdir = self.plan.out / "trials" / f"{trial.number:04d}"
        if tdir.exists():  # a study started afresh in an old folder: this number's files are stale
            shutil.rmtree(tdir)
        tdir.mkdir(parents=True)
        trial.set_user_attr("worker", self.plan.worker)
        trial.set_user_attr("trial_dir", str(tdir))
        trial.set_user_attr("settings", {"train": settings.train, "passes": settings.passes,
                                         "build": settings.build})
        from ..train.run import TrainingInterrupted

        t0 = time.perf_counter()
        try:
            run_dir = self._train(trial, settings, tdir)
            trial.set_user_attr("train_seconds", round(time.perf_counter() - t0, 2))
            figures = self._compile(settings, run_dir, tdir)
            if self.plan.remote is not None:
                figures["local_latency_ms"] = figures["latency_ms"]  # the compile's, kept beside the device's
                figures.update(self._remote(Path(figures["bundle"]), tdir))
        except TrainingInterrupted:
            # Ctrl-C, not a verdict on the settings: the trial is failed without an error (not finished) and
            # the worker stops; the next run samples a new trial in its place
            raise KeyboardInterrupt from None
        except (EdgekitError, RuntimeErrorBase) as exc:
            trial.set_user_attr(ERROR_ATTR, f"{type(exc).__name__}: {exc}")
            raise
        figures["seconds"] = round(time.perf_counter() - t0, 2)
        for k, v in figures.items():
            trial.set_user_attr(k, v)
        return figures["metric"], figures["latency_ms"]

    def _train(self, trial: Any, s: TrialSettings, tdir: Path) -> Path:
        from ..config.base import apply_overrides, parse
        from ..config.train import TrainConfig
        from ..train.run import train

        data = apply_overrides(self.base, {**s.train, "out": tdir / "run",
                                           "name": self.base.get("name") or self.plan.name})
        cfg = parse(TrainConfig, data, f"trial {trial.number}'s training settings")
        train(cfg, callbacks=EpochReporter(trial, self.cfg))
        return tdir / "run"

    def _compile(self, s: TrialSettings, run_dir: Path, tdir: Path) -> dict[str, Any]:
        from ..build.pipeline import compile_model
        from ..config.build import load_build
        from ..train.run_folder import build_settings

        bundle = tdir / f"{self.plan.name}.ekb"
        cfg = load_build(None, {"target": self.plan.target, "output": bundle, **s.build},
                         base=build_settings(run_dir), passes=s.passes)
        result = compile_model(cfg, self.key)
        figures = deployed_figures(result.report, self.cfg.objectives.latency)
        opt = result.report.get("optimize") or {}
        figures.update(bundle=str(result.bundle), report=str(result.report_path),
                       bundle_bytes=result.report.get("bundle_bytes"), macs_reduction=opt.get("macs_reduction"),
                       latency_measured_on="local")
        return figures

    def _remote(self, bundle: Path, tdir: Path) -> dict[str, Any]:
        """Install the trial's bundle on the device (a one-device rollout), then benchmark it there."""
        from ..flash.fleet_flash import BundleSource, FleetFlashSettings, flash_fleet, rollout_failed
        from ..flash.remote_bench import RemoteBenchSettings, bench_on_device

        r = self.plan.remote
        assert r is not None  # only called with a remote target
        flash = FleetFlashSettings(fleet=r.fleet, devices=r.device, canary="1", allow_downgrade=True,
                                   rollback_on_halt=False, device_timeout_s=r.timeout_s, record_dir=tdir)
        summary = flash_fleet(bundle, flash, r.broker, self.key,
                              source=BundleSource(serve=r.serve, advertise_host=r.advertise_host))
        if rollout_failed(summary):
            raise DeviceError(f"installing the trial's bundle on {r.fleet}/{r.device} failed "
                              f"({summary.get('counts')}); see the rollout record in {tdir}")
        result = bench_on_device(bundle, r.device, r.fleet, r.broker,
                                 RemoteBenchSettings(queries=r.queries, seconds=r.seconds, batch=0,
                                                     timeout_s=r.timeout_s))
        inf = result["single_stream"]["inference"]
        return {"latency_ms": float(inf[f"{self.cfg.objectives.latency}_ms"]), "p50_ms": inf.get("p50_ms"),
                "p99_ms": inf.get("p99_ms"), "latency_measured_on": f"{r.fleet}/{r.device}"}


# ----------------------------------------------------------------------------- workers
def run_worker(plan: StudyPlan, cfg: TuneConfig, key: Any,
               on_progress: Callable[[dict[str, int]], None] | None = None) -> dict[str, int]:
    """Run trials until the study holds ``plan.trials`` finished ones; returns the study's counts.

    Before each trial the worker fails trials whose worker stopped beating (they are queued again);
    when the remaining trials are all running elsewhere it waits for them rather than starting more.
    """
    from edgekit_runtime.contract.errors import RuntimeErrorBase
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    storage = open_storage(plan.storage, cfg)
    study = create_or_load(plan, cfg, storage, plan.worker)
    objective = Objective(plan, cfg, key)
    _write_pid(plan)
    failed_in_row = 0
    while True:
        fail_stale_trials(study)
        c = counts(study)
        if c["finished"] >= plan.trials:
            return c
        if c["waiting"] == 0 and c["finished"] + c["running"] >= plan.trials:
            time.sleep(WAIT_POLL_S)  # the last trials run elsewhere; take one over if its worker dies
            continue
        before = {t.number for t in study.get_trials(deepcopy=False)}
        study.optimize(objective, n_trials=1, catch=(EdgekitError, RuntimeErrorBase), gc_after_trial=True)
        mine = [t for t in study.get_trials(deepcopy=False)
                if t.number not in before and t.user_attrs.get("worker") == plan.worker]
        if mine and mine[-1].state == TrialState.FAIL and ERROR_ATTR in mine[-1].user_attrs:
            failed_in_row += 1
            log.warning("trial %d failed: %s", mine[-1].number, mine[-1].user_attrs[ERROR_ATTR])
            if failed_in_row >= MAX_FAILED_IN_ROW:
                raise TuneError(f"{failed_in_row} trials in a row failed; the last: "
                                f"{mine[-1].user_attrs[ERROR_ATTR]}. Fix the tune file (the settings every trial "
                                f"shares) and run the command again: finished trials are kept")
        elif mine:
            failed_in_row = 0
        if on_progress is not None:
            on_progress(counts(study))


def _write_pid(plan: StudyPlan) -> None:
    """``<out>/workers/<n>.pid``: which process runs worker n (what a test kills, what a user inspects)."""
    d = plan.out / "workers"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{plan.worker}.pid").write_text(str(os.getpid()))


def spawn_workers(plan: StudyPlan, workers: int, worker_args: list[str],
                  on_progress: Callable[[dict[str, int]], None] | None = None, study: Any = None) -> list[int]:
    """Run ``workers`` worker processes (``edgekit tune ... --worker N``) on the plan's storage; their exit codes.

    Each gets an equal share of this machine's cores for torch and the inference engines. With
    ``on_progress`` and ``study``, the study's counts are read every few seconds while they run.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    procs = []
    for n in range(workers):
        cmd = [sys.executable, "-m", "edgekit.cli", "tune", *worker_args, "--worker", str(n)]
        log.info("worker %d: %s", n, " ".join(cmd))
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        while any(p.poll() is None for p in procs):
            if on_progress is not None and study is not None:
                on_progress(counts(study))
            time.sleep(PROGRESS_POLL_S)
        return [p.wait() for p in procs]
    except KeyboardInterrupt:  # Ctrl-C reached the workers too; their running trials are retried on resume
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
