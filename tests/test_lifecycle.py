"""One run lifecycle: whatever ends a tracked run (an error at any step, Ctrl-C, a pruner's StopRun, a
diverged loss, or nothing at all), the run ends with exactly one status, its helper threads stop, no
secret from the error reaches the store, and the next run in the same process starts cleanly (a sweep
worker runs many)."""

import errno
import sqlite3
import threading

import mlflow
import pytest

from alexnet.tracking import record, run_files, store, lifecycle
from alexnet.training.config import Config
from alexnet.home import mlruns_dir

TINY = dict(resize=67, epochs=1, train_limit=64, test_limit=50, batch_size=32, eval_batch_size=50, lr=0.05)
SECRET = "hunter2"


def fail(error):
    def raiser(*args, **kwargs):
        raise error
    return raiser


def fail_params(real_log_batch):
    """MlflowClient.log_batch that refuses the params (the store rejecting them), and nothing else."""
    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if params:
            raise mlflow.exceptions.MlflowException(f"params refused by https://{SECRET}@store.example")
        return real_log_batch(self, run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)
    return log_batch


def stop_run(record_, run_id):
    raise lifecycle.StopRun("KILLED", {"sweep.state": "PRUNED", "sweep.pruned_epoch": str(record_.epoch)})


def interrupt(record_, run_id):
    raise KeyboardInterrupt


def boom(record_, run_id):
    raise RuntimeError(f"callback failed: postgresql://bob:{SECRET}@db/optuna")


# name -> (how to fail, extra config, tracked_train kwargs, expected exception, status, failure_reason)
CASES = {
    "start-tags": (None, {}, {"tags": {"bad key!": "x"}}, mlflow.exceptions.MlflowException, "FAILED", "MlflowException"),
    "heartbeat": (("store.start_heartbeat", RuntimeError(f"no heartbeat, token={SECRET}")), {}, {}, RuntimeError, "FAILED", "RuntimeError"),
    "params": (("MlflowClient.log_batch", None), {}, {}, mlflow.exceptions.MlflowException, "FAILED", "MlflowException"),
    "first-checkpoint": (("run_files.publish", OSError(errno.EIO, f"I/O error at https://{SECRET}@bucket")), {}, {},
                         OSError, "FAILED", "OSError"),
    "model-logging": (("record.log_model", RuntimeError(f"export failed --password {SECRET}")), {}, {}, RuntimeError,
                      "FAILED", "RuntimeError"),
    "on-epoch-error": (None, {}, {"on_epoch": boom}, RuntimeError, "FAILED", "RuntimeError"),
    "pruned": (None, {}, {"on_epoch": stop_run}, lifecycle.StopRun, "KILLED", None),
    "ctrl-c": (None, {}, {"on_epoch": interrupt}, KeyboardInterrupt, "KILLED", None),
    "diverged": (None, {"lr": 50.0, "train_limit": 128}, {}, lifecycle.Diverged, "FAILED", "diverged"),
}
TARGETS = {"store.start_heartbeat": (store, "start_heartbeat"), "run_files.publish": (run_files, "publish"),
           "record.log_model": (record, "log_model"), "MlflowClient.log_batch": (mlflow.MlflowClient, "log_batch")}


def test_every_way_out_ends_the_run_once_and_the_next_run_starts_cleanly(home):
    client = mlflow.MlflowClient
    for name, (failure, extra, kwargs, expected, status, reason) in CASES.items():
        with pytest.MonkeyPatch.context() as patch:
            if failure is not None:
                target, error = failure
                owner, attr = TARGETS[target]
                patch.setattr(owner, attr, fail_params(client.log_batch) if error is None else fail(error))
            with pytest.raises(expected):
                lifecycle.tracked_train(Config(**{**TINY, **extra}, run_name=name), progress=False, **kwargs)
        [run] = mlflow.search_runs(search_all_experiments=True, filter_string=f"attributes.run_name = '{name}'",
                                   output_format="list")
        assert run.info.status == status, name
        assert run.data.tags.get("failure_reason") == reason, (name, run.data.tags)
        if name == "pruned":
            assert run.data.tags["sweep.pruned_epoch"] == "1"
        if name == "ctrl-c":
            assert run.data.tags["killed_reason"] == "interrupted"
        assert mlflow.active_run() is None, name
        alive = {t.name for t in threading.enumerate()} & {"mlflow-heartbeat", "checkpoint-writer"}
        assert not alive, (name, alive)

    # After all that, in the same process: a run that simply finishes.
    run = lifecycle.tracked_train(Config(**TINY, run_name="clean"), progress=False)
    assert mlflow.get_run(run.run_id).info.status == "FINISHED"
    # No secret from any error message reached the store.
    with sqlite3.connect(mlruns_dir() / "mlflow.db") as db:
        tables = [r[0] for r in db.execute("select name from sqlite_master where type = 'table'")]
        dump = repr([db.execute(f"select * from {t}").fetchall() for t in tables])
    assert "failure" in dump and SECRET not in dump


def test_a_bad_device_or_data_is_refused_before_the_run_exists(home, tmp_path):
    store.set_up_store()
    exp = store.experiment_id(store.DEFAULT_EXPERIMENT)
    for bad in ({"device": "cuda:3"}, {"data_dir": str(tmp_path / "nowhere")}):
        with pytest.raises(lifecycle.UsageError):
            lifecycle.tracked_train(Config(**TINY, **bad), progress=False)
    assert mlflow.MlflowClient().search_runs([exp]) == []
