"""Faults in a packed sweep (`--pack 2`), one sweep, three commands: kill -9 of the worker once both
members have recorded epoch 1 of 2; `alexnet train --resume` of one member's run, which trains epoch 2
alone from its checkpoint slice; the same sweep command again, which fails both dead trials once their
heartbeats are stale and retries them with the same params, as a pack again. The retry of the resumed
member is the reference its resumed epoch 2 must match (same lr, dropout, seed and data order)."""

import os
import signal
import subprocess
import sys

import optuna
import psutil
import pytest

from conftest import ROOT, wait_for
from test_pack import LOSS_TOL
from test_sweep import env_for, stores, sweep_cli, sweep_runs, write_sweep

FAULTS = """
study = "faults"
n_trials = 2
pruner = "none"
keep_top = 4
heartbeat_seconds = 1
grace_seconds = 4
enqueue_base = false

[space]
lr = { low = 0.001, high = 1.0, log = true }
dropout = { low = 0.0, high = 0.8 }
"""
PARAMS = ({"lr": 0.01, "dropout": 0.5}, {"lr": 0.05, "dropout": 0.3})


def history(client, run_id: str, key: str) -> dict:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_a_killed_pack_is_retried_and_a_member_resumes_alone(tmp_path):
    path = write_sweep(tmp_path, "faults", FAULTS)
    client, storage = stores(tmp_path)
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    queued = optuna.create_study(study_name="faults", storage=storage, direction="maximize")
    for params in PARAMS:
        queued.enqueue_trial(params)
    cmd = [sys.executable, "-m", "alexnet", "sweep", str(path), "--pack", "2"]

    # 1. kill -9 of the worker once both members' epoch 1 is recorded (its metrics are logged only once
    # its checkpoint is published), while the pack trains epoch 2.
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(cmd, cwd=ROOT, env=env_for(tmp_path), stdout=out, stderr=subprocess.STDOUT,
                                    text=True)
    try:
        def run_ids():
            try:
                trials = optuna.load_study(study_name="faults", storage=storage).trials
            except Exception:  # the launcher is still creating the storage
                return []
            return [t.user_attrs.get("mlflow_run_id") for t in trials if t.state.name == "RUNNING"]

        wait_for(lambda: len([r for r in run_ids() if r]) == 2, 180, "both members to start", every=0.3,
                 proc=launcher, log=log)
        members = run_ids()
        wait_for(lambda: all(1 in history(client, r, "val/acc") for r in members), 180,
                 "both members to record epoch 1", every=0.2, proc=launcher, log=log)
        (worker,) = psutil.Process(launcher.pid).children()
        assert "alexnet.sweep" in " ".join(worker.cmdline())
        os.kill(worker.pid, signal.SIGKILL)
        launcher.wait(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 1 and "killed by SIGKILL" in log.read_text()
    study = optuna.load_study(study_name="faults", storage=storage)
    assert [t.state.name for t in study.trials] == ["RUNNING", "RUNNING"]  # nobody can tell yet
    assert [t.params for t in study.trials] == list(PARAMS)
    assert all(sorted(history(client, r, "val/acc")) == [1] for r in members), "killed after epoch 2: too late"
    files = [{f.path for f in client.list_artifacts(r, "checkpoints")} for r in members]
    assert all("checkpoints/last.pt" in f for f in files)

    # 2. One member resumed alone: its run is RUNNING in MLflow, but its process is gone.
    resumed = sweep_cli(tmp_path, "train", "--resume", members[0], "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    run = client.get_run(members[0])
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumes"] == "1" and run.data.tags["resumed_from_epoch"] == "1"
    assert sorted(history(client, members[0], "val/acc")) == [1, 2]

    # 3. The same sweep command again: both dead trials are failed once stale and retried as a pack.
    again = subprocess.run(cmd, cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "retried as trial 2" in again.stderr + again.stdout and "retried as trial 3" in again.stderr + again.stdout
    study = optuna.load_study(study_name="faults", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]  # exactly n_trials results
    assert [t.params for t in study.trials[2:]] == list(PARAMS)
    assert [t.system_attrs["retry_history"] for t in study.trials[2:]] == [[0], [1]]
    runs = sweep_runs(client, "faults")
    assert [r.info.status for r in runs["trial"]] == ["FINISHED", "FAILED", "FINISHED", "FINISHED"]
    assert runs["trial"][1].data.tags["failure_reason"] == "worker_lost"  # the resumed run is left as it ended
    assert [r.data.tags["sweep.retry_of"] for r in runs["trial"][2:]] == ["0", "1"]
    assert len(runs["parent"]) == 1 and runs["parent"][0].info.status == "FINISHED"

    # The resumed member's epoch 2 (alone, in `train`) is its retry's epoch 2 (in a pack of two).
    retry = study.trials[2].user_attrs["mlflow_run_id"]
    for key, tol in (("train/loss", LOSS_TOL), ("val/acc", 1.01 / 200), ("test/acc", 1.01 / 200)):
        assert history(client, members[0], key)[1] == pytest.approx(history(client, retry, key)[1], abs=tol), key
        assert history(client, members[0], key)[2] == pytest.approx(history(client, retry, key)[2], abs=tol), key

    # Retention then treats the killed trials as any failed trial: their checkpoints are deleted.
    assert client.get_run(members[1]).data.tags.get("checkpoints") == "deleted"
    refused = sweep_cli(tmp_path, "train", "--resume", members[1])
    assert refused.returncode == 2 and "checkpoints were deleted" in refused.stderr
