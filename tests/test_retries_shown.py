"""A trial whose worker died is counted once everywhere: the sweep's summary, the leaderboard (RETRIED, not
FAILED) and the title of the figures (`9 trials (1 retried)`); and a re-run that must wait for the dead
trial's heartbeat to go stale says so in one line instead of waiting in silence."""

import platform
import subprocess
import time
from types import SimpleNamespace

import mlflow
import optuna
import psutil
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from alexnet.compare import runs
from alexnet.sweep import figures, report
from alexnet.sweep.parent import dead_trial_lines
from alexnet.sweep.spec import load_sweep
from alexnet.tracking import store
from conftest import ROOT


def study_with_a_retry():
    """Trial 0 FAIL (its worker died), trial 1 its retry (COMPLETE), trial 2 PRUNED."""
    study = optuna.create_study(direction="maximize")
    lr = {"lr": FloatDistribution(0.01, 0.1)}
    study.add_trial(create_trial(state=TrialState.FAIL, params={"lr": 0.05}, distributions=lr))
    study.add_trial(create_trial(value=0.7, params={"lr": 0.05}, distributions=lr, system_attrs={"retry_history": [0]}))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"lr": 0.02}, distributions=lr,
                                 intermediate_values={1: 0.2}))
    return study


def test_the_figures_count_the_retry_not_the_dead_trial(tmp_path):
    study = study_with_a_retry()
    assert figures.trial_count(study) == "2 trials (1 retried)"
    assert figures.save_html(study, tmp_path / "sweep.html", "val/best_acc")
    assert f"<h1>Sweep '{study.study_name}': 2 trials (1 retried)</h1>" in (tmp_path / "sweep.html").read_text()


def test_the_summary_names_the_retried_trial():
    sweep = load_sweep(ROOT / "sweeps" / "demo.toml")
    study = study_with_a_retry()
    done = [t for t in study.trials if t.number != 0]
    text = report.summary_text(sweep, {"done": done, "running": [], "waiting": [], "best": [],
                                       "counts": {"COMPLETE": 1, "PRUNED": 1, "FAIL": 0}, "retried": 1,
                                       "epochs_saved": 1, "disk": 0, "parent": "p"})
    assert text.splitlines()[0] == ("sweep 'demo': 2 trials finished (1 COMPLETE, 1 PRUNED, 0 FAIL); 1 retried: its "
                                    "worker stopped, the retry is counted")


def test_the_leaderboard_shows_a_retried_trial_as_retried(home):
    store.set_up_store()
    client = mlflow.MlflowClient()
    exp = store.experiment_id(store.DEFAULT_EXPERIMENT)
    parent = client.create_run(exp, tags={"sweep.study": "s", "sweep.role": "parent"}).info.run_id
    for trial, status, extra in (("0", "FAILED", {}), ("1", "FINISHED", {"sweep.retry_of": "0"}), ("2", "FAILED", {})):
        run = client.create_run(exp, tags={"sweep.study": "s", "sweep.role": "trial", "sweep.trial": trial,
                                           "mlflow.parentRunId": parent, **extra})
        client.set_terminated(run.info.run_id, status)
    board = runs.leaderboard(sweep="s")
    assert dict(zip(board["trial"].astype(int), board["status"])) == {0: "RETRIED", 1: "FINISHED", 2: "FAILED"}
    assert list(runs.leaderboard(sweep="s", status="RETRIED")["trial"]) == [0]


def test_a_rerun_says_it_waits_for_a_dead_workers_trial(home):
    store.set_up_store()
    client = mlflow.MlflowClient()
    exp = store.experiment_id(store.DEFAULT_EXPERIMENT)
    dead = subprocess.Popen(["true"])
    dead.wait()
    now = time.time()

    def trial(number, pid, started, beat):
        run = client.create_run(exp, tags={"host": platform.node(), "pid": str(pid), "pid_namespace": store.pid_namespace(),
                                           "process_start": f"{started:.3f}", "heartbeat": str(int(beat))})
        return SimpleNamespace(number=number, user_attrs={"mlflow_run_id": run.info.run_id})

    alive = trial(1, psutil.Process().pid, psutil.Process().create_time(), now)
    recent = trial(3, dead.pid, now - 100, now - 5)
    long_ago = trial(4, dead.pid, now - 1000, now - 900)
    lines = dead_trial_lines([alive, recent, long_ago], grace_seconds=45, heartbeat_seconds=10, now=now)
    assert lines == [f"waiting up to 45 s for trial 3's heartbeat to go stale (its worker stopped answering: process "
                     f"{dead.pid} is gone) before retrying it",
                     f"trial 4's worker stopped answering (process {dead.pid} is gone): retrying it now"]
