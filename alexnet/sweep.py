"""Optuna sweeps: a thin layer that calls the same `tracked_train(cfg)` once per trial.

Where things live:
  - Optuna storage (default `sqlite:///<project>/mlruns/optuna.db`, its own file: Optuna and MLflow
    both keep an `alembic_version` table): the study, its trials, params, per-epoch reports,
    heartbeats, and in the study's user attributes the MLflow parent run id and the resolved base.
  - MLflow: one parent run per study (`sweep.role=parent`), one child run per trial
    (`sweep.study`, `sweep.trial`), whose status mirrors the trial: COMPLETE -> FINISHED,
    PRUNED -> KILLED (tags `sweep.state=PRUNED`, `sweep.pruned_epoch`), FAIL -> FAILED (reason in tags).

Workers: `alexnet sweep FILE --workers N` sets everything up once (databases, study, parent run,
the base trial), then starts N processes `python -m alexnet.sweep SLOT`, each with its own sampler
seed (`seed + slot`; the same seed in two workers proposed duplicate configs), its share of the CPU
threads and, with several GPUs, its own GPU. The launching process only watches the study: one line
per finished trial, a progress bar with the best value so far.

Exactly N trials, whatever dies (field notes: heartbeats and `MaxTrialsCallback` alone overshoot
and leave a killed trial RUNNING): a worker takes a lock (a file lock next to the study; a
PostgreSQL advisory lock on a PostgreSQL storage), fails stale trials (no heartbeat for
`grace_seconds`: their MLflow run ends FAILED and a WAITING copy with the same params is queued),
counts finished + running trials, and then starts one more trial (a queued copy first), waits for
the running ones, or exits. The lock is released once the new trial is RUNNING with its params.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alexnet import UsageError
from alexnet.config import FIELDS, MIN_RESIZE, Config, _f, check_keys, parse_sets, read_toml

SPEC_ENV = "ALEXNET_SWEEP_SPEC"  # the resolved sweep, as JSON, handed to worker processes
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")


# --- Sweep files ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sweep:
    # --- Keys of a sweep file (sweeps/*.toml), besides the tables [space] and [set] ---
    study: str = _f("", "study name (Optuna) and parent run name (MLflow); empty: the file's name")
    base: str = _f("", "experiment file every trial starts from, relative to the sweep file; empty: the defaults")
    n_trials: int = _f(20, "trials to finish in all, across workers and resumes; 0: no count, only the time budget")
    timeout_minutes: float = _f(0.0, "stop starting new trials after this many minutes of this command; 0: none")
    objective: str = _f("test/best_acc", "the per-epoch metric reported to the pruner; its last value is the trial's")
    direction: str = _f("maximize", "maximize or minimize the objective")
    sampler: str = _f("tpe", "tpe (multivariate, constant liar) or random; both seeded")
    seed: int = _f(0, "sampler seed of the study's first worker; each later worker gets the next one")
    pruner: str = _f("median", "median, hyperband or none")
    pruner_startup_trials: int = _f(5, "median pruner: trials that must finish before any is pruned")
    pruner_warmup_epochs: int = _f(1, "epochs every trial trains before it may be pruned")
    keep_top: int = _f(3, "keep the checkpoints and models of this many best trials; params, metrics, plots always stay")
    enqueue_base: bool = _f(True, "run the base experiment's own values as the first trial (the baseline to beat)")
    heartbeat_seconds: int = _f(10, "a running trial writes a heartbeat this often")
    grace_seconds: int = _f(60, "a trial silent this long is failed (its worker died) and retried with the same params")
    max_retry: int = _f(3, "times a trial whose worker died is retried")
    # --- Resolved by load_sweep, not keys of the file ---
    space: dict = field(default_factory=dict)   # config field -> {low, high, log, step} or {choices}
    config: dict = field(default_factory=dict)  # the base config every trial starts from, checked
    source: str = ""                            # the sweep file
    storage: str = ""                           # Optuna RDB URL


FILE_KEYS = {f.name for f in dataclasses.fields(Sweep) if "help" in f.metadata}
SPEC_KEYS = ("low", "high", "log", "step", "choices")
SAMPLERS, PRUNERS, DIRECTIONS = ("tpe", "random"), ("median", "hyperband", "none"), ("maximize", "minimize")


def default_storage() -> str:
    from alexnet.tracking import mlruns_dir

    return f"sqlite:///{mlruns_dir() / 'optuna.db'}"


# The keys of `EpochRecord.metrics()` (listed here so that checking a sweep file needs no torch;
# tests/test_sweep.py checks the two agree).
OBJECTIVES = ("train/loss", "train/acc", "test/acc", "test/best_acc", "perf/examples_per_sec",
              "perf/wall_examples_per_sec", "perf/epoch_seconds")


def load_sweep(path: str | Path, sets: list[str] = (), n_trials: int | None = None,
               storage: str | None = None) -> Sweep:
    """Read and check a sweep file; `--set` fixes config fields for every trial (a searched field
    that is `--set` leaves the search space)."""
    path = Path(path)
    where = f"sweep {path}"
    table = read_toml(path)
    unknown = sorted(set(table) - FILE_KEYS - {"space", "set"})
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(FILE_KEYS))}, [space], [set])")
    space, fixed = table.pop("space", {}), table.pop("set", {})
    if not isinstance(space, dict) or not isinstance(fixed, dict):
        raise UsageError(f"{where}: space and set must be tables ([space] / [set])")
    check_keys(fixed, f"{where} [set]")
    both = sorted(set(space) & set(fixed))
    if both:
        raise UsageError(f"{where}: {both[0]!r} is both searched ([space]) and fixed ([set]): keep one")
    for f in dataclasses.fields(Sweep):  # TOML types against the field types
        if f.name in table:
            if f.type == "float" and type(table[f.name]) is int:
                table[f.name] = float(table[f.name])
            elif type(table[f.name]).__name__ != f.type:
                raise UsageError(f"{where}: {f.name} must be {f.type}, got {table[f.name]!r}")
    sweep = Sweep(**table)
    cli = parse_sets(list(sets))

    # The base config: defaults, the base experiment file, the file's [set], then --set.
    base_file = (path.parent / sweep.base) if sweep.base else None
    values = {}
    if base_file is not None:
        values = read_toml(base_file)
        check_keys(values, str(base_file))
    values.update(fixed)
    values.update(cli)
    try:
        config = Config(**values)
    except UsageError as e:
        raise UsageError(f"{where}: base config: {e}") from None
    for name in cli:
        space.pop(name, None)  # --set fixes a searched field for every trial

    checks = {
        "study": (sweep.study == "" or sweep.study.strip() != "", "a name"),
        "n_trials": (sweep.n_trials >= 0, ">= 0"),
        "timeout_minutes": (sweep.timeout_minutes >= 0, ">= 0"),
        "objective": (sweep.objective in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}"),
        "direction": (sweep.direction in DIRECTIONS, " or ".join(DIRECTIONS)),
        "sampler": (sweep.sampler in SAMPLERS, " or ".join(SAMPLERS)),
        "pruner": (sweep.pruner in PRUNERS, ", ".join(PRUNERS)),
        "seed": (sweep.seed >= 0, ">= 0"),
        "pruner_startup_trials": (sweep.pruner_startup_trials >= 0, ">= 0"),
        "pruner_warmup_epochs": (sweep.pruner_warmup_epochs >= 0, ">= 0"),
        "keep_top": (sweep.keep_top >= 0, ">= 0"),
        "heartbeat_seconds": (sweep.heartbeat_seconds >= 1, ">= 1"),
        "grace_seconds": (sweep.grace_seconds > sweep.heartbeat_seconds, "more than heartbeat_seconds"),
        "max_retry": (sweep.max_retry >= 0, ">= 0"),
    }
    for name, (ok, allowed) in checks.items():
        if not ok:
            raise UsageError(f"{where}: {name} = {getattr(sweep, name)!r} is not allowed (use {allowed})")
    if n_trials is not None:
        if n_trials < 0:
            raise UsageError(f"sweep: --n-trials must be >= 0, got {n_trials}")
        sweep = dataclasses.replace(sweep, n_trials=n_trials)
    if sweep.n_trials == 0 and sweep.timeout_minutes == 0:
        raise UsageError(f"{where}: neither n_trials nor timeout_minutes is set: the sweep would never end")

    space = {name: _check_space(where, name, spec, config, sweep.enqueue_base) for name, spec in space.items()}
    if not space:
        raise UsageError(f"{where}: [space] searches nothing: add e.g. lr = {{ low = 0.001, high = 0.1, log = true }}")
    return dataclasses.replace(sweep, study=sweep.study or path.stem, space=space, config=asdict(config),
                               source=str(path), storage=storage or default_storage())


def _check_space(where: str, name: str, spec, config: Config, enqueue_base: bool) -> dict:
    """One [space] entry, checked: every value it can take must make a valid config."""
    check_keys([name], f"{where} [space]")
    where = f"{where}: space.{name}"
    if not isinstance(spec, dict):
        raise UsageError(f"{where}: want a table like {{ low = 0.001, high = 0.1, log = true }} or {{ choices = [...] }}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (use {', '.join(SPEC_KEYS)})")
    kind = FIELDS[name].type

    def valid(value, what):
        try:
            return getattr(Config(**{**asdict(config), name: value}), name)
        except UsageError as e:
            hint = f" (the network needs resize >= {MIN_RESIZE})" if name == "resize" else ""
            raise UsageError(f"{where}: {what} {value!r}: {str(e).removeprefix('config: ')}{hint}") from None

    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise UsageError(f"{where}: choices = [...] is a non-empty list and goes alone")
        out = {"choices": [valid(v, "choice") for v in spec["choices"]]}
        inside = getattr(config, name) in out["choices"]
    else:
        if kind not in ("int", "float"):
            raise UsageError(f"{where}: {name} is {kind}: search it with choices = [...]")
        if "low" not in spec or "high" not in spec:
            raise UsageError(f"{where}: give low and high (or choices)")
        low, high = valid(spec["low"], "low"), valid(spec["high"], "high")
        if low > high:
            raise UsageError(f"{where}: low {low!r} > high {high!r}")
        log, step = spec.get("log", False), spec.get("step")
        if not isinstance(log, bool):
            raise UsageError(f"{where}: log must be true or false")
        if log and step is not None:
            raise UsageError(f"{where}: log and step cannot go together (Optuna)")
        if step is not None and not (isinstance(step, (int, float)) and step > 0 and (kind == "float" or isinstance(step, int))):
            raise UsageError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}")
        out = {"low": low, "high": high, "log": log, "step": step}
        inside = low <= getattr(config, name) <= high
    if enqueue_base and not inside:
        raise UsageError(f"{where}: the base value {getattr(config, name)!r} is outside the space: "
                         f"widen it, or set enqueue_base = false")
    return out


def describe_space(space: dict) -> str:
    parts = []
    for name, s in space.items():
        if "choices" in s:
            parts.append(f"{name} one of {s['choices']}")
        else:
            kind = "log-uniform" if s["log"] else "uniform"
            parts.append(f"{name} {kind} [{s['low']:g}, {s['high']:g}]" + (f" step {s['step']:g}" if s["step"] else ""))
    return "; ".join(parts)


def format_params(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def base_params(sweep: Sweep) -> dict:
    return {name: sweep.config[name] for name in sweep.space}


# --- Storage, study and the lock ----------------------------------------------------------------------

def open_storage(sweep: Sweep):
    """Optuna RDB storage with heartbeats: a trial whose worker died is failed after `grace_seconds`
    and queued again with the same params (RetryHeartbeatStaleTrialCallback, wrapped to end its
    MLflow run too)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    from alexnet.tracking import redact

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=sweep.max_retry)

    def on_stale(study, trial):
        retry(study, trial)
        try:
            end_trial_runs(study, trial.number, "FAILED", {
                "sweep.state": "FAIL", "failure_reason": "worker_lost",
                "failure": f"no heartbeat for {sweep.grace_seconds} s: its worker died; retried with the same params"})
        except Exception as e:  # the trial is retried all the same; `alexnet runs` shows the run as stale
            print(f"alexnet sweep: could not end the MLflow run of dead trial {trial.number} ({type(e).__name__}: {e})",
                  file=sys.stderr)

    engine = {"connect_args": {"timeout": 60}} if sweep.storage.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(sweep.storage, engine_kwargs=engine, heartbeat_interval=sweep.heartbeat_seconds,
                              grace_period=sweep.grace_seconds, heartbeat_stale_trial_callback=on_stale)
    except Exception as e:
        raise UsageError(f"sweep: cannot open the Optuna storage {redact(sweep.storage)} ({type(e).__name__}): "
                         f"use an RDB URL such as sqlite:///ABS/PATH/optuna.db or postgresql://...") from None


def make_sampler(sweep: Sweep, seed: int):
    import optuna

    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def make_pruner(sweep: Sweep):
    import optuna

    epochs = sweep.config["epochs"]
    if sweep.pruner == "median":
        # Epochs are steps 1..E; pruning may start once `warmup` epochs are done.
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.pruner_startup_trials,
                                           n_warmup_steps=sweep.pruner_warmup_epochs + 1)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, sweep.pruner_warmup_epochs), max_resource=epochs)
    return optuna.pruners.NopPruner()


def open_study(sweep: Sweep, seed: int | None = None):
    import optuna

    return optuna.create_study(storage=open_storage(sweep), study_name=sweep.study, direction=sweep.direction,
                               sampler=make_sampler(sweep, sweep.seed if seed is None else seed),
                               pruner=make_pruner(sweep), load_if_exists=True)


class PgLock:
    """A PostgreSQL advisory lock: serialises workers on every machine that shares the database."""

    def __init__(self, url: str, key: int):
        import sqlalchemy

        self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        self.key, self.conn = key, None

    def acquire(self):
        import sqlalchemy

        self.conn = self.engine.connect()
        self.conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})

    def release(self):
        import sqlalchemy

        self.conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
        self.conn.close()
        self.conn = None

    def __enter__(self):
        self.acquire()

    def __exit__(self, *exc):
        self.release()


def study_lock(sweep: Sweep):
    """The lock around 'count the trials, then start one' (one machine: a file lock; PostgreSQL:
    an advisory lock, so workers on other machines are counted too)."""
    from filelock import FileLock

    from alexnet.tracking import mlruns_dir

    key = zlib.crc32(sweep.study.encode())
    if sweep.storage.startswith("postgresql"):
        return PgLock(sweep.storage, key)
    if sweep.storage.startswith("sqlite:///") and sweep.storage != "sqlite:///:memory:":
        folder = Path(sweep.storage.removeprefix("sqlite:///")).parent
    else:
        folder = mlruns_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f".optuna-{key:08x}.lock"))


def tally(study):
    """(finished, running, waiting) trials. A trial failed because its worker died and queued again
    does not count: its retry does."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    done = [t for t in trials if t.state.is_finished() and t.number not in retried]
    return (done, [t for t in trials if t.state == TrialState.RUNNING],
            [t for t in trials if t.state == TrialState.WAITING])


def next_step(study, sweep: Sweep, deadline: float) -> str:
    """Under the lock: 'start' one more trial, 'wait' for the running ones, or 'stop'."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    if deadline and time.time() > deadline:
        return "stop"
    done, running, _ = tally(study)
    if not sweep.n_trials or len(done) + len(running) < sweep.n_trials:
        return "start"
    return "wait" if running else "stop"


# --- MLflow: the parent run and the runs' states ------------------------------------------------------

def trial_runs(sweep_name: str, role: str = "trial", experiment: str | None = None) -> list:
    """The study's child runs (MLflow Run objects) with the given `sweep.role`."""
    import mlflow

    from alexnet.tracking import experiment_id

    name = sweep_name.replace("'", "\\'")
    exps = [experiment_id(experiment)] if experiment else [e.experiment_id for e in mlflow.search_experiments()]
    return mlflow.search_runs(exps, f"tags.`sweep.study` = '{name}' and tags.`sweep.role` = '{role}'",
                              output_format="list", max_results=50000)


def end_trial_runs(study, number: int, status: str, tags: dict):
    """End the MLflow run(s) of a trial still marked RUNNING (its worker died)."""
    import mlflow

    client = mlflow.MlflowClient()
    for run in trial_runs(study.study_name, experiment=study.user_attrs.get("mlflow_experiment")):
        if run.data.tags.get("sweep.trial") == str(number) and run.info.status == "RUNNING":
            for k, v in tags.items():
                client.set_tag(run.info.run_id, k, v)
            client.set_terminated(run.info.run_id, status)


def set_up(sweep: Sweep, workers: int, command: str) -> tuple:
    """Once, in the launching process, under the lock: the databases, the study, the parent run,
    the base trial. Returns (study, parent run id, first worker slot)."""
    import mlflow

    from alexnet import tracking

    if sweep.storage.rstrip("/") == tracking.tracking_uri().rstrip("/"):
        raise UsageError("sweep: --storage is MLflow's database: Optuna needs its own (e.g. sqlite:///.../optuna.db)")
    with study_lock(sweep):
        study = open_study(sweep)  # creates the tables once, before any worker opens the file
        tracking.set_up_store()
        exp_id = tracking.experiment_id(sweep.config["experiment"])
        attrs = study.user_attrs
        fixed = {k: v for k, v in sweep.config.items() if k not in UNCOMPARED}
        if "base_config" in attrs:
            old = {k: v for k, v in attrs["base_config"].items() if k not in UNCOMPARED}
            changed = sorted(k for k in set(old) | set(fixed) if old.get(k) != fixed.get(k))
            if changed:
                k = changed[0]
                raise UsageError(f"sweep: study {sweep.study!r} was started with {k} = {old.get(k)!r}, now {fixed.get(k)!r}: "
                                 f"run it as it started, or name a new study (study = ... in the file)")
            if attrs.get("space") != json.loads(json.dumps(sweep.space)) or attrs.get("direction") != sweep.direction \
                    or attrs.get("objective") != sweep.objective:
                raise UsageError(f"sweep: study {sweep.study!r} was started with another search space or objective: "
                                 f"name a new study (study = ... in the file)")
        else:
            for k, v in {"base_config": sweep.config, "space": sweep.space, "objective": sweep.objective,
                         "direction": sweep.direction, "sweep_file": sweep.source,
                         "mlflow_experiment": sweep.config["experiment"]}.items():
                study.set_user_attr(k, v)
        client = mlflow.MlflowClient()
        parent = _existing_parent(client, attrs.get("mlflow_parent_run_id"))
        if parent is None:
            run = client.create_run(exp_id, run_name=sweep.study, tags={
                "sweep.study": sweep.study, "sweep.role": "parent", "sweep.storage": tracking.redact(sweep.storage),
                "experiment_file": sweep.source, "command": tracking.redact(command)})
            parent = run.info.run_id
            client.log_param(parent, "objective", f"{sweep.direction} {sweep.objective}")
            for k in ("sampler", "seed", "pruner", "keep_top"):
                client.log_param(parent, k, getattr(sweep, k))
            for name, spec in sweep.space.items():
                client.log_param(parent, f"space.{name}", describe_space({name: spec}))
            client.log_text(parent, Path(sweep.source).read_text(), "sweep.toml")
            study.set_user_attr("mlflow_parent_run_id", parent)
        else:
            client.update_run(parent, status="RUNNING")
        client.set_tag(parent, "sweep.n_trials", str(sweep.n_trials))
        if sweep.enqueue_base and not attrs.get("base_enqueued"):
            study.enqueue_trial(base_params(sweep), user_attrs={"baseline": True})
            study.set_user_attr("base_enqueued", True)
        first_slot = attrs.get("workers_started", 0)
        study.set_user_attr("workers_started", first_slot + workers)
    return study, parent, first_slot


UNCOMPARED = {"device", "data_dir", "num_workers", "run_name"}  # may differ between resumes


def _existing_parent(client, run_id):
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:
        return None
    return run_id if run.info.lifecycle_stage == "active" else None


# --- One trial ----------------------------------------------------------------------------------------

def suggest(trial, sweep: Sweep) -> dict:
    params = {}
    for name, s in sweep.space.items():
        if "choices" in s:
            params[name] = trial.suggest_categorical(name, s["choices"])
        elif FIELDS[name].type == "int":
            params[name] = trial.suggest_int(name, s["low"], s["high"], step=s["step"] or 1, log=s["log"])
        else:
            params[name] = trial.suggest_float(name, s["low"], s["high"], step=s["step"], log=s["log"])
    return params


def objective(trial, sweep: Sweep, parent: str, slot: int, release) -> float:
    """Train one trial as a child run; report every epoch; prune; record why a trial failed."""
    import mlflow
    import optuna

    from alexnet import tracking
    from alexnet.train import Diverged

    params = suggest(trial, sweep)  # under the lock: other workers' constant liar sees these params
    release()  # the trial is RUNNING, with its params and a heartbeat: others may count it now
    if trial.user_attrs.get("fail_reason"):  # a retry starts with its failed original's attributes
        trial.set_user_attr("fail_reason", "")
    client = mlflow.MlflowClient()

    started = {}

    def on_start(run_id):  # the trial's user attributes carry its MLflow run id
        started["run_id"] = run_id
        trial.set_user_attr("mlflow_run_id", run_id)

    def on_epoch(record, run_id):
        trial.report(record.metrics()[sweep.objective], record.epoch)
        if trial.should_prune():
            raise tracking.StopRun("KILLED", {"sweep.state": "PRUNED", "sweep.pruned_epoch": str(record.epoch)})

    try:
        cfg = Config(**{**sweep.config, **params, "run_name": f"{sweep.study}-trial-{trial.number}"})
        tags = {"sweep.study": sweep.study, "sweep.trial": str(trial.number), "sweep.role": "trial",
                "sweep.worker": str(slot)}
        history = trial.storage.get_trial_system_attrs(trial._trial_id).get("retry_history")
        if history:  # a queued copy of a trial whose worker died or was interrupted
            tags["sweep.retry_of"] = str(history[-1])
        if trial.user_attrs.get("baseline"):
            tags["sweep.baseline"] = "true"
        run = tracking.tracked_train(cfg, source=sweep.source, parent_run_id=parent, tags=tags,
                                     on_start=on_start, on_epoch=on_epoch, progress=False)
    except tracking.StopRun as e:
        raise optuna.TrialPruned(f"pruned at epoch {e.tags.get('sweep.pruned_epoch', '?')}") from None
    except Diverged as e:
        _record_failure(trial, client, started.get("run_id"), f"diverged: {e}")
        raise
    except Exception as e:
        _record_failure(trial, client, started.get("run_id"), f"{type(e).__name__}: {e}")
        raise
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the worker queues the trial again (see work)
        trial.set_user_attr("fail_reason", "interrupted")
        raise
    client.set_tag(run.run_id, "sweep.state", "COMPLETE")
    return run.records[-1].metrics()[sweep.objective]


def _record_failure(trial, client, run_id, reason: str):
    trial.set_user_attr("fail_reason", reason[:2000])
    if run_id:
        client.set_tag(run_id, "sweep.state", "FAIL")


# --- A worker ---------------------------------------------------------------------------------------

def work(sweep: Sweep, slot: int, parent: str, deadline: float) -> int:
    """One worker process: start trials (one at a time, under the lock) until the count is reached."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from alexnet import tracking

    tracking.set_up_store()
    study = open_study(sweep, seed=sweep.seed + slot)
    lock = study_lock(sweep)
    while True:
        lock.acquire()
        held, current = [True], {}

        def release():
            if held[0]:
                held[0] = False
                lock.release()

        def func(trial):
            current["id"] = trial._trial_id
            try:
                return objective(trial, sweep, parent, slot, release)
            except OSError as e:
                current["disk_full"] = disk_full(e)
                raise

        try:
            step = next_step(study, sweep, deadline)
            if step == "start":
                try:
                    study.optimize(func, n_trials=1, catch=(Exception,))
                except BaseException:
                    # Ctrl-C or SIGTERM: the trial was marked FAIL; queue it again so a resume runs it.
                    if "id" in current:
                        frozen = study._storage.get_trial(current["id"])
                        if frozen.state.is_finished():
                            RetryHeartbeatStaleTrialCallback()(study, frozen)
                    raise
                if current.get("disk_full"):
                    # Every trial would fail the same way: queue this one again and stop the worker.
                    frozen = study._storage.get_trial(current["id"])
                    RetryHeartbeatStaleTrialCallback()(study, frozen)
                    raise UsageError(f"trial {frozen.number} failed: {current['disk_full']}: the disk takes no more; "
                                     f"free space, then run the same command: the trial runs again")
        finally:
            release()
        if step == "stop":
            return 0
        if step == "wait":
            time.sleep(sweep.heartbeat_seconds)
            continue
        try:
            retain(study, sweep)
        except Exception as e:  # disk is reclaimed at the next trial or in the summary; the sweep goes on
            print(f"alexnet sweep: worker {slot}: deleting old checkpoints failed ({type(e).__name__}: {e})",
                  file=sys.stderr)


def disk_full(error: BaseException) -> OSError | None:
    """The OSError behind `error` that says the disk takes no more (full, over quota, over the file
    size limit), else None."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return error
        error = error.__cause__ or error.__context__
    return None


def interrupt(*_):
    raise KeyboardInterrupt


def worker_main(slot: int) -> int:
    """Entry of `python -m alexnet.sweep SLOT` (started by the launcher; the spec is in the env)."""
    import optuna

    spec = json.loads(os.environ[SPEC_ENV])
    sweep = Sweep(**spec["sweep"])
    sys.argv = spec["argv"]  # the command the user typed, for the runs' `command` tag
    signal.signal(signal.SIGTERM, interrupt)  # ends the trial like Ctrl-C: run KILLED, trial queued again
    threads = spec.get("threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the launcher prints one line per trial
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    from alexnet import data

    try:
        data.prepare(sweep.config["data_dir"])  # missing data: one line now, not a failed trial per try
        return work(sweep, slot, spec["parent"], spec["deadline"])
    except UsageError as e:
        print(f"alexnet sweep: worker {slot}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# --- Retention and the summary --------------------------------------------------------------------------

def ranked(study, direction: str | None = None, trials: list | None = None) -> list:
    """COMPLETE trials (of `trials`, else the study's now), best first (ties: the earlier trial first)."""
    sign = -1 if (direction or study.user_attrs.get("direction", "maximize")) == "maximize" else 1
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    done = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
    return sorted(done, key=lambda t: (sign * t.value, t.number))


def retain(study, sweep: Sweep) -> int:
    """Delete the checkpoints and models of finished trials outside the top `keep_top` (pruned,
    failed, retried or pushed out); never a running trial's. Returns the bytes freed."""
    from alexnet import tracking

    # The ranking and the states come from one snapshot: a trial that completes in between must not
    # look finished yet missing from the top (another worker's trial can end at any moment).
    trials = study.get_trials(deepcopy=False)
    keep = {t.number for t in ranked(study, sweep.direction, trials)[:sweep.keep_top]}
    states = {t.number: t.state.name for t in trials}
    freed = 0
    for run in trial_runs(sweep.study, experiment=sweep.config["experiment"]):
        tags = run.data.tags
        number = int(tags.get("sweep.trial", -1))
        if number in keep or states.get(number) not in FINISHED_STATES or run.info.status == "RUNNING" \
                or tags.get("checkpoints") == "deleted":
            continue
        freed += tracking.delete_checkpoints(run.info.run_id)  # tags the run checkpoints=deleted
    return freed


def disk_usage(sweep: Sweep) -> int:
    from alexnet import tracking

    return sum(tracking.run_disk_usage(r.info.run_id) for r in trial_runs(sweep.study, experiment=sweep.config["experiment"]))


def summarize(study, sweep: Sweep, parent: str) -> dict:
    """The parent run gets the best params and value, trials.csv and the plots."""
    import mlflow

    client = mlflow.MlflowClient()
    done, running, waiting = tally(study)
    counts = {s: sum(t.state.name == s for t in done) for s in FINISHED_STATES}
    best = ranked(study, sweep.direction)
    client.log_metric(parent, "sweep/finished_trials", len(done), step=len(done))
    for s, n in counts.items():
        client.log_metric(parent, f"sweep/{s.lower()}", n, step=len(done))
    if best:
        b = best[0]
        client.log_metric(parent, "sweep/best_value", b.value, step=len(done))
        client.set_tag(parent, "best.trial", str(b.number))
        client.set_tag(parent, "best.run_id", b.user_attrs.get("mlflow_run_id", ""))
        client.set_tag(parent, "best.value", f"{b.value:.6g}")
        for k, v in b.params.items():
            client.set_tag(parent, f"best.{k}", str(v))
        client.log_dict(parent, {"trial": b.number, "value": b.value, "objective": sweep.objective,
                                 "params": b.params, "mlflow_run_id": b.user_attrs.get("mlflow_run_id")},
                        "best_params.json")
    with tempfile.TemporaryDirectory(prefix="alexnet-sweep-") as tmp:
        csv = Path(tmp) / "trials.csv"
        study.trials_dataframe().to_csv(csv, index=False)
        client.log_artifact(parent, str(csv))
        plots = save_plots(study, Path(tmp) / "plots")
        if plots:
            client.log_artifacts(parent, str(Path(tmp) / "plots"), "plots")
    used = disk_usage(sweep)
    client.log_metric(parent, "sweep/disk_bytes", used, step=len(done))
    return {"done": done, "running": running, "waiting": waiting, "counts": counts, "best": best,
            "plots": plots, "disk": used}


def save_plots(study, folder: Path) -> list[str]:
    """Optuna's own matplotlib plots, headless. A plot that needs more trials than there are is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as vis

    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials" is said by the summary
    for name, plot in [("optimization_history", vis.plot_optimization_history),
                       ("param_importances", vis.plot_param_importances),
                       ("parallel_coordinate", vis.plot_parallel_coordinate),
                       ("intermediate_values", vis.plot_intermediate_values)]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5.5)
            fig.tight_layout()
            fig.savefig(folder / f"{name}.png", dpi=100)
            saved.append(f"{name}.png")
        except Exception:
            pass  # e.g. importances need two COMPLETE trials with different params
        finally:
            plt.close("all")
    return saved


# --- The launcher ------------------------------------------------------------------------------------

def trial_line(t, objective: str, retried_as: dict) -> str:
    """One line per finished trial: number, state, value, params, duration, and why it ended early."""
    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else 0
    state = t.state.name
    value = f"{objective} {t.value:.4f}" if state == "COMPLETE" else ""
    if state == "PRUNED":
        value = f"pruned at epoch {max(t.intermediate_values, default='?')}"
    elif state == "FAIL":
        if t.number in retried_as:
            why = "interrupted" if t.user_attrs.get("fail_reason") == "interrupted" else "its worker died"
            value = f"{why}: retried as trial {retried_as[t.number]}"
        else:
            value = t.user_attrs.get("fail_reason") or t.system_attrs.get("fail_reason", "failed")
            value = value.splitlines()[0][:160] if value else "failed"
    return f"trial {t.number:>3} {state:<8} {value}  {format_params(t.params)}  ({seconds:.0f} s)"


def worker_env(sweep: Sweep, index: int, workers: int, parent: str, deadline: float, gpus: list[str]) -> dict:
    """The environment of worker `index`: the resolved sweep, its share of the CPU threads, its GPU."""
    env = dict(os.environ)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    threads = max(1, cores // workers)
    env.update({SPEC_ENV: json.dumps({"sweep": asdict(sweep), "parent": parent, "deadline": deadline,
                                      "threads": threads, "argv": sys.argv}),
                "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    if len(gpus) > 1 and sweep.config["device"] in ("auto", "cuda"):
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]  # round robin, one GPU per worker
    return env


def visible_gpus() -> list[str]:
    """The GPUs workers may be pinned to: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists
    (asked in a subprocess: the launcher never imports torch, it only watches)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return out.stdout.split() if out.returncode == 0 else []


def run_sweep(sweep: Sweep, workers: int = 1, quiet: bool = False, command: str = "") -> dict:
    """Set up, start the workers, watch the study until they exit, then summarise. Returns the summary
    plus 'status' (0 done, 1 a worker died or the count is not reached, 130 interrupted)."""
    import optuna
    from tqdm import tqdm

    from alexnet import tracking

    if workers < 1:
        raise UsageError(f"sweep: --workers must be >= 1, got {workers}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study, parent, first_slot = set_up(sweep, workers, command or " ".join(sys.argv))
    say = (lambda line: None) if quiet else (lambda line: tqdm.write(line, file=sys.stderr))
    done, running, waiting = tally(study)
    say(f"sweep {sweep.study!r}: {len(done)} of {sweep.n_trials or 'unlimited'} trials done"
        f"{', resuming' if done or running else ''}; {workers} worker{'s' if workers > 1 else ''}; "
        f"storage {tracking.redact(sweep.storage)}; parent run {parent}")

    deadline = time.time() + sweep.timeout_minutes * 60 if sweep.timeout_minutes else 0.0
    # The parent run carries this launcher's pid and heartbeat: if the launcher dies, `alexnet runs`
    # shows the parent STALE instead of RUNNING forever.
    stop_heartbeat = tracking.start_heartbeat(parent)
    gpus = visible_gpus()
    # Own sessions: a terminal's Ctrl-C reaches this process only, which passes exactly one SIGINT on
    # (a second one would interrupt a worker while it ends its trial cleanly).
    procs = [subprocess.Popen([sys.executable, "-m", "alexnet.sweep", str(first_slot + i)], start_new_session=True,
                              env=worker_env(sweep, i, workers, parent, deadline, gpus))
             for i in range(workers)]
    signal.signal(signal.SIGTERM, interrupt)
    seen = {t.number for t in done}
    bar = tqdm(total=sweep.n_trials or None, initial=len(done), unit="trial", disable=quiet, dynamic_ncols=True,
               desc=f"sweep {sweep.study}", file=sys.stderr)
    status = 0

    failed_once = set()

    def poll(final=False):
        trials = study.get_trials(deepcopy=False)
        retried_as = {t.system_attrs["retry_history"][-1]: t.number for t in trials if "retry_history" in t.system_attrs}
        for t in trials:
            if t.state.is_finished() and t.number not in seen:
                # A dead worker's trial is failed a moment before its retry is queued: give the retry
                # one poll to appear, so the line can say which trial retries it.
                if t.state.name == "FAIL" and t.number not in retried_as and t.number not in failed_once and not final:
                    failed_once.add(t.number)
                    continue
                seen.add(t.number)
                say(trial_line(t, sweep.objective, retried_as))
        finished, _, _ = tally(study)
        bar.n = len(finished)
        best = ranked(study, sweep.direction)
        if best:
            bar.set_postfix_str(f"best {best[0].value:.4f} (trial {best[0].number})", refresh=False)
        bar.refresh()

    try:
        while any(p.poll() is None for p in procs):
            time.sleep(1.0)
            poll()
        poll(final=True)
    except KeyboardInterrupt:
        status = 130
        say("interrupted: stopping the workers (their trials end KILLED and are queued again)")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        poll()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stop_heartbeat()
        bar.close()
    for i, p in enumerate(procs):
        if p.returncode not in (0, 130) and status == 0:
            status = 2 if p.returncode == 2 else 1  # 2: the worker printed a usage error (no data)
        if p.returncode and p.returncode < 0:
            print(f"alexnet sweep: worker {first_slot + i} (pid {p.pid}) was killed by {signal.Signals(-p.returncode).name}: "
                  f"its trial is retried with the same params when the study resumes (run the same command again)",
                  file=sys.stderr)
        elif p.returncode not in (0, 2, 130):
            print(f"alexnet sweep: worker {first_slot + i} (pid {p.pid}) exited with status {p.returncode}", file=sys.stderr)

    retain(study, sweep)
    summary = summarize(study, sweep, parent)
    complete = (not sweep.n_trials or len(summary["done"]) >= sweep.n_trials) and not summary["running"]
    if status == 0 and not complete and not summary["running"] and not deadline:
        status = 1
    # The parent mirrors the study: FINISHED once complete, KILLED when this command stopped short
    # (a resume sets it RUNNING again); left RUNNING while workers from another terminal go on.
    if status != 0 or not summary["running"]:
        import mlflow

        mlflow.MlflowClient().set_terminated(parent, "FINISHED" if status == 0 else "KILLED")
    return {**summary, "status": status, "parent": parent, "study": study, "complete": complete}


def summary_text(sweep: Sweep, s: dict) -> str:
    """The closing lines: counts, the best trial, disk, and what to type next."""
    counts = ", ".join(f"{n} {k}" for k, n in s["counts"].items())
    lines = [f"sweep {sweep.study!r}: {len(s['done'])} trials finished ({counts})"
             + (f", {len(s['running'])} still running" if s["running"] else "")
             + (f", {len(s['waiting'])} queued" if s["waiting"] else "")]
    if s["best"]:
        b = s["best"][0]
        baseline = next((t for t in s["best"] if t.user_attrs.get("baseline")), None)
        lines.append(f"best: trial {b.number}, {sweep.objective} {b.value:.4f}: {format_params(b.params)}"
                     + (f" (baseline, trial {baseline.number}: {baseline.value:.4f})" if baseline and baseline is not b else ""))
    lines.append(f"disk: {s['disk'] / 1e6:,.1f} MB in the trials' artifacts (checkpoints and models of the top "
                 f"{sweep.keep_top} kept)")
    lines.append(f"MLflow parent run {s['parent']}; leaderboard: alexnet runs --sweep {sweep.study}; "
                 f"confirm: alexnet confirm {sweep.study} --top 3 --seeds 3")
    return "\n".join(lines)


def dry_run_sweep(sweep: Sweep, workers: int) -> Sweep:
    """The same sweep on a tiny budget: resize 67, 256 training and 200 test images, 2 epochs, 3
    trials, a pruner that may prune after epoch 1, top-1 retention, a 1 s heartbeat."""
    space = {k: v for k, v in sweep.space.items() if k != "resize"}
    if not space:
        space = {"lr": {"low": sweep.config["lr"] / 2, "high": sweep.config["lr"] * 2, "log": True, "step": None}}
    config = {**sweep.config, "resize": MIN_RESIZE, "train_limit": 256, "test_limit": 200, "epochs": 2,
              "batch_size": 64}
    return dataclasses.replace(sweep, space=space, config=config, n_trials=min(sweep.n_trials or 3, 3),
                               timeout_minutes=0.0, pruner_startup_trials=1, pruner_warmup_epochs=0, keep_top=1,
                               heartbeat_seconds=1, grace_seconds=5, storage=default_storage())


def dry_run(sweep: Sweep, workers: int, quiet: bool = False) -> int:
    """Print the plan, then run it tiny in a temporary store (deleted afterwards) and report what
    each part did: storage, nesting, pruning, checkpoints and retention, plots."""
    import shutil

    print(plan_text(sweep, workers))
    saved = {k: os.environ.get(k) for k in ("ALEXNET_HOME", "MLFLOW_TRACKING_URI")}
    home = tempfile.mkdtemp(prefix="alexnet-dry-run-")
    os.environ["ALEXNET_HOME"] = home
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        tiny = dry_run_sweep(sweep, workers)
        print(f"dry run: {tiny.n_trials} tiny trials (resize {MIN_RESIZE}, 256 training / 200 test images, "
              f"2 epochs) with {min(workers, 2)} worker(s) in {home} (deleted afterwards)")
        result = run_sweep(tiny, min(workers, 2), quiet=quiet)
        runs = trial_runs(tiny.study, experiment=tiny.config["experiment"])
        kept = [r for r in runs if r.data.tags.get("checkpoints") != "deleted"]
        states = ", ".join(f"trial {r.data.tags['sweep.trial']} {r.info.status}"
                           for r in sorted(runs, key=lambda r: int(r.data.tags["sweep.trial"])))
        print(f"dry run: study and parent run created; {len(runs)} child runs ({states}); "
              f"{result['counts']['PRUNED']} pruned; checkpoints kept for {len(kept)} "
              f"(keep_top {tiny.keep_top}); plots: {', '.join(result['plots']) or 'none'}")
        print("dry run: OK" if result["status"] == 0 else "dry run: FAILED (see above)")
        return result["status"]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(home, ignore_errors=True)


def plan_text(sweep: Sweep, workers: int) -> str:
    from alexnet import tracking

    c = sweep.config
    budget = " and ".join(x for x in [f"{sweep.n_trials} trials" if sweep.n_trials else "",
                                      f"{sweep.timeout_minutes:g} minutes" if sweep.timeout_minutes else ""] if x)
    return "\n".join([
        f"would run study {sweep.study!r}: {budget}, {sweep.direction} {sweep.objective}, {sweep.sampler} sampler "
        f"(seed {sweep.seed}), {sweep.pruner} pruner, {workers} worker{'s' if workers > 1 else ''}",
        f"  space: {describe_space(sweep.space)}",
        f"  each trial: {c['epochs']} epochs, batch {c['batch_size']}, "
        + ("" if "resize" in sweep.space else f"resize {c['resize']}, ") +
        f"{c['train_limit'] or 60000} training / {c['test_limit'] or 10000} test images"
        + (f", first trial the base's own values ({format_params(base_params(sweep))})" if sweep.enqueue_base else ""),
        f"  storage {tracking.redact(sweep.storage)}; MLflow {tracking.redact(tracking.tracking_uri())}, "
        f"experiment {c['experiment']!r}; keep checkpoints of the top {sweep.keep_top} trials"])


if __name__ == "__main__":
    sys.exit(worker_main(int(sys.argv[1])))
