"""Every open of an Optuna storage waits for a busy SQLite file as long as the sweep itself does
(`SQLITE_TIMEOUT_S`), not Optuna's default 5 s: `confirm` and `--warm-start` (through `load_study`) and
`push` beside a running sweep must not fail with "database is locked"."""

import sqlite3
import threading
import time

import optuna

from alexnet.home import SQLITE_TIMEOUT_S
from alexnet.sweep.study import load_study
from alexnet.team.push import push_study

HOLD_S = 6.5  # longer than Optuna's (pysqlite's) default of 5 s, far shorter than SQLITE_TIMEOUT_S


def a_sweep_study(path, name="busy"):
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{path}")
    study.set_user_attr("base_config", {"lr": 0.1})
    study.set_user_attr("mlflow_parent_run_id", "0" * 32)
    study.enqueue_trial({"x": 1.0})
    study.optimize(lambda t: t.suggest_float("x", 0, 2), n_trials=1)
    return name


def hold_lock(path, held: threading.Event):
    """Another process's writer: an exclusive lock on the file for HOLD_S seconds."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    held.set()
    time.sleep(HOLD_S)
    con.execute("COMMIT")
    con.close()


def while_locked(path, action):
    held = threading.Event()
    holder = threading.Thread(target=hold_lock, args=(path, held))
    holder.start()
    held.wait(10)
    start = time.monotonic()
    try:
        return action(), time.monotonic() - start
    finally:
        holder.join()


def test_load_study_waits_for_a_busy_sqlite_storage(tmp_path):
    assert SQLITE_TIMEOUT_S > HOLD_S + 5
    path = tmp_path / "optuna.db"
    name = a_sweep_study(path)
    study, waited = while_locked(path, lambda: load_study(name, f"sqlite:///{path}"))
    assert study.study_name == name and len(study.trials) == 1
    assert waited >= HOLD_S - 0.5  # it waited for the lock rather than failing at 5 s


def test_push_study_waits_for_a_busy_sqlite_storage(tmp_path):
    source, target = tmp_path / "optuna.db", tmp_path / "team.db"
    name = a_sweep_study(source)
    optuna.create_study(study_name="other", storage=f"sqlite:///{target}")  # the target's tables exist
    lines = []
    _, waited = while_locked(source, lambda: push_study(name, f"sqlite:///{source}", f"sqlite:///{target}", {},
                                                        lines.append))
    assert waited >= HOLD_S - 0.5
    copied = optuna.load_study(study_name=name, storage=f"sqlite:///{target}")
    assert len(copied.trials) == 1 and any("1 new trial " in line for line in lines), lines
