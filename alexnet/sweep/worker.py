"""A sweep worker: one process (`python -m alexnet.sweep.worker`, started by the launcher or a Ray task) that
runs trials one at a time until the study has its count.

Each round, under the study lock: fail stale trials, count, then start one more trial (the objective
releases the lock once the trial is RUNNING with its params), wait for the running ones, or stop. After
each trial, under the lock again, retention deletes the checkpoints of trials outside the top K. Ctrl-C
or SIGTERM ends the running trial (its run KILLED) and queues it again; a full disk queues it again and
stops the worker, since every later trial would fail the same way. A worker that loses the tracking
server or the database stops in one line (exit status 3): the trial is not its fault, so it is queued
again at once if the database still answers, else the study's heartbeat fails it and another worker
retries it. A trial whose call a server answered and refused (two writers colliding on the tracking
server's database, say) is not its params' fault either: it ends FAIL, is queued again with the same
params (at most `max_retry` times in a row) and the worker goes on.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading
import time

import mlflow
import optuna
import torch

from alexnet import UsageError, compat
from alexnet.training import data
from alexnet.tracking import record, store
from alexnet.team.backends import lost_connection, server_rejected
from alexnet.training.config import Config
from alexnet.redact import first_line
from alexnet.sweep.objective import objective
from alexnet.sweep.packs import run_pack
from alexnet.sweep.retention import retain
from alexnet.sweep.ledger import settings_from
from alexnet.sweep.spec import PARENT_ENV, SPEC_ENV, Sweep
from alexnet.sweep.study import SERVER_ERROR, next_step, open_storage, open_study, retry, study_lock
from alexnet.training.train import check_device, train

compat.preload_sql_store()  # 0.9 s at import, paid while the launcher checks the device, data and stores


class Round:
    """The study lock, held for one round; `release()` may come early (once the trial is RUNNING)."""

    def __init__(self, lock):
        self.lock, self.held = lock, False

    def __enter__(self):
        self.lock.acquire()
        self.held = True
        return self

    def release(self):
        if self.held:
            self.held = False
            self.lock.release()

    def __exit__(self, *exc):
        self.release()


def work(sweep: Sweep, slot: int, parent: str, deadline: float) -> int:
    """Start trials, one at a time, until the count is reached; 0 when the study needs no more."""
    storage = open_storage(sweep)
    study = open_study(sweep, seed=sweep.seed + slot, storage=storage)
    lock = study_lock(sweep)
    while True:
        with Round(lock) as held:
            step = next_step(study, sweep, deadline)
            if step == "start" and sweep.pack > 1:  # K trials as one trial pack (alexnet/sweep/packs.py)
                run_pack(study, sweep, slot, parent, held.release, deadline,
                         lambda study, *rest, **kw: run_trial(study, storage, *rest, **kw))
            elif step == "start":
                run_trial(study, storage, sweep, slot, parent, held.release)
        if step == "stop":
            return 0
        if step == "wait":
            time.sleep(sweep.heartbeat_seconds)
            continue
        try:
            with lock:
                retain(study, sweep)
        except Exception as e:  # disk is reclaimed after the next trial or by the launcher; the sweep goes on
            print(f"alexnet sweep: worker {slot}: deleting old checkpoints failed ({first_line(e)})", file=sys.stderr)


def run_trial(study, storage, sweep: Sweep, slot: int, parent: str, release, trainer=train) -> None:
    """One trial through `study.optimize`; afterwards its run's `sweep.state` tag mirrors the trial.
    `storage`: the study's own (`open_storage`), asked for the trial by its number. `trainer`: `train`, or
    a pack member's share of its pack."""
    current = {}
    study_id = storage.get_study_id_from_name(study.study_name)

    def func(trial):
        current["id"] = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        trial.set_user_attr("worker", slot)  # which worker ran it (a retry's is another's)
        for stale in ("fail_reason", SERVER_ERROR):  # a retry starts with its failed original's attributes
            if trial.user_attrs.get(stale):
                trial.set_user_attr(stale, "")
        history = storage.get_trial_system_attrs(current["id"]).get("retry_history")
        try:
            return objective(trial, sweep, parent, slot, release, retry_of=history[-1] if history else None,
                             trainer=trainer)
        except Exception as e:
            current["disk_full"] = disk_full(e) if isinstance(e, OSError) else None
            current["lost"] = e if lost_connection(e) else None
            refused = None if current["lost"] else server_rejected(e)
            if refused:  # queued again now, so that the FAIL is never counted as a result
                trial.set_user_attr(SERVER_ERROR, refused)
                retry(study, storage.get_trial(current["id"]), sweep.max_retry)
            raise

    try:
        study.optimize(func, n_trials=1, catch=(Exception,))
    except BaseException:  # Ctrl-C or SIGTERM: Optuna marked the trial FAIL; queue it again for a resume
        if "id" in current:
            requeue(storage, study, current["id"])
        raise
    if "id" not in current:
        return
    if current.get("lost"):  # the trial's FAIL reached the database, so it answers: queue the trial again now
        requeue(storage, study, current["id"])
        e = current["lost"]
        raise ConnectionError(f"lost {lost_connection(e)} during trial {storage.get_trial(current['id']).number} "
                              f"({first_line(e)}): the trial is queued again for another worker") from e
    frozen = storage.get_trial(current["id"])
    if frozen.user_attrs.get("mlflow_run_id"):
        mlflow.MlflowClient().set_tag(frozen.user_attrs["mlflow_run_id"], "sweep.state", frozen.state.name)
    if current.get("disk_full"):
        requeue(storage, study, current["id"])
        raise UsageError(f"trial {frozen.number} failed: {current['disk_full']}: the disk takes no more; "
                         f"free space, then run the same command: the trial runs again")


def requeue(storage, study, trial_id: int) -> None:
    """Queue a WAITING copy (same params) of a trial that ended FAIL through no fault of its own."""
    frozen = storage.get_trial(trial_id)
    if frozen.state.is_finished():
        retry(study, frozen)


def disk_full(error: BaseException) -> OSError | None:
    """The OSError behind `error` that says the disk takes no more (full, over quota, over the file
    size limit), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return error
        error = error.__cause__ or error.__context__
    return None


def follow_parent(pid: int) -> None:
    """Stop as on SIGTERM (the trial ends KILLED, queued again) once process `pid`, which started this
    worker, is gone: a Ray task's process killed, or its node lost, leaves no worker behind."""
    def check():
        while os.getppid() == pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=check, name="follow-parent", daemon=True).start()


def one_line_thread_errors(slot: int) -> None:
    """A helper thread (Optuna's trial heartbeat) that loses a server says so in one line; the trial's
    own thread meets the same error and stops the worker."""
    def hook(args):
        if lost_connection(args.exc_value):
            print(f"alexnet sweep: worker {slot}: {args.thread.name}: lost {lost_connection(args.exc_value)} "
                  f"({first_line(args.exc_value)})", file=sys.stderr)
        else:
            threading.__excepthook__(args)
    threading.excepthook = hook


def main() -> int:
    """The worker process. Its orders (the resolved sweep, its slot, the parent run: `launcher.worker_orders`)
    come as one JSON line on stdin from the launcher that started it before checking anything, so that
    these imports overlap its checks; nothing (stdin closed) means the launcher refused its input. On a Ray
    cluster they come in $ALEXNET_SWEEP_SPEC."""
    # Ctrl-C and SIGTERM end the trial KILLED and queue it again. A process started by a Ray worker
    # inherits SIGINT blocked, or (from a background shell) ignored: both are undone here.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # MLflow's map of the installed packages, which logging a model needs (1.4 s): built while waiting.
    threading.Thread(target=record.warm_up_model_logging, name="warm-up", daemon=True).start()
    try:
        orders = os.environ.get(SPEC_ENV) or sys.stdin.readline()
    except KeyboardInterrupt:
        return 130
    if not orders.strip():
        return 0
    orders = json.loads(orders)
    sweep, slot = settings_from(orders["sweep"]), orders["slot"]
    sys.argv = orders["argv"]  # the command the user typed, for the runs' `command` tag
    if os.environ.get(PARENT_ENV):
        follow_parent(int(os.environ[PARENT_ENV]))
    one_line_thread_errors(slot)
    torch.set_num_threads(orders["threads"])
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the launcher prints one line per trial
    try:
        # A missing GPU or missing data: one line now, not a failed trial per try.
        check_device(Config(**sweep.config))
        data.prepare(sweep.config["data_dir"])
        store.set_up_store(orders["tracking_uri"])
        return work(sweep, slot, orders["parent"], orders["deadline"])
    except UsageError as e:
        print(f"alexnet sweep: worker {slot}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not lost_connection(e):
            raise
        why = str(e) if isinstance(e, ConnectionError) else (
            f"lost {lost_connection(e)} ({first_line(e)}); a trial it was running is retried by another worker "
            f"once its heartbeat is {sweep.grace_seconds} s old")
        print(f"alexnet sweep: worker {slot}: error: {why}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    status = main()
    # Python's own teardown of torch's and MLflow's modules takes up to a second that the launcher waits
    # for; every thread is joined and every file closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
