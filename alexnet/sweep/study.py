"""The Optuna side of a sweep: the storage (with heartbeats), sampler, pruner and study, the lock that
serialises "count the trials, then start one" across workers, and the counting itself.

Exactly N trials, whatever dies (heartbeats and `MaxTrialsCallback` alone overshoot and leave a killed
trial RUNNING): a worker takes the study lock, fails stale trials (no heartbeat for `grace_seconds`:
their MLflow run ends FAILED and a WAITING copy with the same params is queued), counts finished +
running trials, and then starts one more trial (a queued copy first), waits for the running ones, or
stops. The lock is released once the new trial is RUNNING with its params. The lock holds across
machines: a PostgreSQL advisory lock or a MySQL named lock on the storage's own server; a SQLite file
lives on one machine, and its lock is a file lock beside it.
"""

from __future__ import annotations

import sys
import time
import warnings
import zlib

import optuna
import sqlalchemy
from filelock import FileLock
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from alexnet import UsageError
from alexnet.training.config import FIELDS
from alexnet.home import SQLITE_TIMEOUT_S, default_storage, mlruns_dir, sqlite_path
from alexnet.redact import first_line, redact
from alexnet.sweep.ledger import made_by_sweep, rank, seeded, study_settings
from alexnet.sweep.parent import end_trial_runs
from alexnet.sweep.spec import Sweep, directions
from alexnet.team.backends import database_trouble

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, retries


def rdb_storage(url: str, **kwargs) -> RDBStorage:
    """Every open of an Optuna storage goes through here. On SQLite a writer waits `SQLITE_TIMEOUT_S` for
    another's lock (Optuna's own default is 5 s, too short for parallel workers, a confirm or a push beside
    a running sweep); a server's pooled connections are checked before use."""
    engine = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return RDBStorage(url, engine_kwargs=engine, **kwargs)


def open_storage(sweep: Sweep) -> RDBStorage:
    """Optuna RDB storage with heartbeats: a trial whose worker died is failed after `grace_seconds`
    and queued again with the same params (RetryHeartbeatStaleTrialCallback, wrapped to end its
    MLflow run too)."""
    retry = RetryHeartbeatStaleTrialCallback(max_retry=sweep.max_retry)

    def on_stale(study, trial):
        retry(study, trial)
        try:
            end_trial_runs(study, trial.number, "FAILED", {
                "sweep.state": "FAIL", "failure_reason": "worker_lost",
                "failure": f"no heartbeat for {sweep.grace_seconds} s: its worker died; retried with the same params"})
        except Exception as e:  # the trial is retried all the same; `alexnet runs` shows the run as stale
            print(f"alexnet sweep: could not end the MLflow run of dead trial {trial.number} ({first_line(e)})",
                  file=sys.stderr)

    try:
        return rdb_storage(sweep.storage, heartbeat_interval=sweep.heartbeat_seconds,
                           grace_period=sweep.grace_seconds, heartbeat_stale_trial_callback=on_stale)
    except Exception as e:  # a refused login, a missing database, a server down, a bad URL: each its own hint
        raise UsageError(f"sweep: the Optuna storage: {database_trouble(sweep.storage, e)}") from None


def make_sampler(sweep: Sweep, seed: int):
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def first_prunable_epoch(sweep: Sweep) -> int:
    """The earliest epoch at whose report any pruner may stop a trial: the `pruner_warmup_epochs`
    before it are never judged. Epochs are reported as steps 1..E (objective.py)."""
    return sweep.pruner_warmup_epochs + 1


def make_pruner(sweep: Sweep):
    first = first_prunable_epoch(sweep)
    if sweep.pruner == "median":
        # MedianPruner judges a step once step >= n_warmup_steps.
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.pruner_startup_trials, n_warmup_steps=first)
    if sweep.pruner == "hyperband":
        # Hyperband's first rung is at step min_resource, so the same warm-up; it must not exceed
        # max_resource, and a trial at its last epoch is never pruned anyway (objective.py).
        epochs = sweep.config["epochs"]
        return optuna.pruners.HyperbandPruner(min_resource=min(first, epochs), max_resource=epochs)
    return optuna.pruners.NopPruner()


def open_study(sweep: Sweep, seed: int | None = None, storage: RDBStorage | None = None) -> optuna.Study:
    """The study, through `storage` (`open_storage`) when the caller needs the storage itself too."""
    return optuna.create_study(storage=storage or open_storage(sweep), study_name=sweep.study,
                               directions=directions(sweep),
                               sampler=make_sampler(sweep, sweep.seed if seed is None else seed),
                               pruner=make_pruner(sweep), load_if_exists=True)


def distributions(space: dict) -> dict:
    """The Optuna distribution of each searched field, as `objective.suggest` draws it."""
    out = {}
    for name, s in space.items():
        if "choices" in s:
            out[name] = CategoricalDistribution(s["choices"])
        elif FIELDS[name].type == "int":
            out[name] = IntDistribution(s["low"], s["high"], step=s["step"] or 1, log=s["log"])
        else:
            out[name] = FloatDistribution(s["low"], s["high"], step=s["step"], log=s["log"])
    return out


def load_study(name: str, storage: str | None, what: str = "confirm") -> optuna.Study:
    """An existing study made by `alexnet sweep`, or a UsageError naming the studies there are."""
    url = storage = storage or default_storage()
    path = sqlite_path(storage)
    if path is not None and not path.is_file():
        raise UsageError(f"{what}: no sweeps yet ({path} does not exist): run `alexnet sweep FILE` first, "
                         f"or name the storage with --storage")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = rdb_storage(storage)
        names = optuna.study.get_all_study_names(storage)
    except Exception as e:
        raise UsageError(f"{what}: the Optuna storage: {database_trouble(url, e)}") from None
    if name not in names:
        raise UsageError(f"{what}: no study {name!r} in {redact(url)} (studies: {', '.join(names) or 'none'}): "
                         f"run `alexnet sweep FILE` first")
    study = optuna.load_study(study_name=name, storage=storage)
    if not made_by_sweep(study.user_attrs) or "mlflow_parent_run_id" not in study.user_attrs:
        raise UsageError(f"{what}: study {name!r} was not made by `alexnet sweep` (no base config or parent run)")
    return study


# --- The lock ---------------------------------------------------------------------------------------

class ServerLock:
    """A named lock held on the storage's own database server, so workers on every machine that share
    the database are serialised: PostgreSQL's advisory lock, MySQL's GET_LOCK. A worker that dies
    drops its connection, and the server releases its lock."""

    SQL = {"postgresql": ("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"),
           "mysql": ("SELECT GET_LOCK(:name, -1)", "SELECT RELEASE_LOCK(:name)")}

    def __init__(self, url: str, key: int):
        self.kind = url.split(":")[0].split("+")[0]
        self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        self.args, self.conn = {"key": key, "name": f"alexnet-sweep-{key:08x}"}, None

    def acquire(self):
        self.conn = self.engine.connect()
        self.conn.execute(sqlalchemy.text(self.SQL[self.kind][0]), self.args)

    def release(self):
        self.conn.execute(sqlalchemy.text(self.SQL[self.kind][1]), self.args)
        self.conn.close()
        self.conn = None

    def __enter__(self):
        self.acquire()

    def __exit__(self, *exc):
        self.release()


def study_lock(sweep: Sweep):
    """The lock around 'count the trials, then start one' (and around retention)."""
    key = zlib.crc32(sweep.study.encode())
    if sweep.storage.startswith(("postgresql", "mysql")):
        return ServerLock(sweep.storage, key)
    path = sqlite_path(sweep.storage)
    folder = path.parent if path is not None else mlruns_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f".optuna-{key:08x}.lock"))


# --- Counting -----------------------------------------------------------------------------------------

def retried(trials: list) -> set[int]:
    """The numbers of the trials queued again with the same params (their worker died, or was interrupted)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def tally(study, trials: list | None = None):
    """(finished, running, waiting) trials this study trained: seeded trials are not counted (`n_trials`
    counts trials to train), and a trial failed because its worker died or a server refused its call, and
    queued again, does not count: its retry does."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    again = retried(trials)
    done = [t for t in trials if t.state.is_finished() and t.number not in again and not seeded(t)]
    return (done, [t for t in trials if t.state == TrialState.RUNNING],
            [t for t in trials if t.state == TrialState.WAITING])


def next_step(study, sweep: Sweep, deadline: float) -> str:
    """Under the lock: 'start' one more trial, 'wait' for the running ones, or 'stop'."""
    optuna.storages.fail_stale_trials(study)
    requeue_server_failures(study, sweep)
    if deadline and time.time() > deadline:
        return "stop"
    done, running, _ = tally(study)
    if not sweep.n_trials or len(done) + len(running) < sweep.n_trials:
        return "start"
    return "wait" if running else "stop"


# --- Trials a server failed ------------------------------------------------------------------------

SERVER_ERROR = "server_error"  # a FAIL trial's user attribute: what refused its call (`backends.server_rejected`)


def failed_on_server(t) -> str | None:
    """What refused a call of a FAIL trial ('the tracking server', 'the database'), or None when the trial
    failed on its own (divergence, a bad value). A FAIL recorded before trials were marked so is
    known by its reason: MLflow's tracking server refusing a call."""
    if t.state != TrialState.FAIL:
        return None
    reason = t.user_attrs.get("fail_reason") or ""
    return t.user_attrs.get(SERVER_ERROR) or ("the tracking server" if reason.startswith("RestException") else None)


def retry(study, frozen, max_retry: int | None = None) -> None:
    """Queue a WAITING copy (same params) of a trial that failed through no fault of its own, as Optuna
    queues a dead worker's trial; with `max_retry`, not once its retries are spent."""
    RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, frozen)


def requeue_server_failures(study, sweep: Sweep, trials: list | None = None) -> list:
    """Under the lock, before counting: queue again each trial a server failed that has no retry yet (the
    worker that met the error queues it at once; this catches one that could not, and a study that
    ended before failures were retried), at most `max_retry` times in a row. Returns those queued."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    spent = [t for t in trials if failed_on_server(t) and t.number not in retried]
    for t in spent:
        retry(study, t, sweep.max_retry)
    return [t for t in spent if len(t.system_attrs.get("retry_history", [])) < sweep.max_retry]


def ranked(study, direction: str | None = None, trials: list | None = None) -> list:
    """COMPLETE, feasible trials (of `trials`, else the study's now), best first (`ledger.rank`)."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    return rank(trials, direction or study_settings(study).direction)
