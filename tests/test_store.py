"""The store's edges: secrets never stored, a busy SQLite store waited for, failures reported as what
they are (a failed experiment creation, a parent run that cannot be looked up), a background write's
error naming what failed, and storages that cannot keep the trial count exact refused."""

import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from sqlalchemy.exc import OperationalError

from alexnet import UsageError
from alexnet.tracking import run_files, store
from alexnet.home import default_tracking_uri, mlruns_dir
from alexnet.redact import redact
from alexnet.sweep import parent
from alexnet.sweep.spec import load_sweep


@pytest.mark.parametrize("text, secret", [
    ("postgresql+psycopg://bob:hunter2@db:5432/optuna", "hunter2"),
    ("https://ghp_0123456789abcdef@github.com/org/repo.git", "ghp_0123456789abcdef"),
    ("alexnet server --password hunter2 --port 5000", "hunter2"),
    ("alexnet server --api-key=sk-abc123", "sk-abc123"),
    ("MLFLOW_TRACKING_TOKEN=tok123 alexnet sweep x.toml", "tok123"),
    ("GITHUB_TOKEN=ghp_x1 and HF_TOKEN=hf_y2", "hf_y2"),
    ("https://api.example/v1?access_token=abc&page=2", "abc"),
    ('{"password": "pw123", "user": "bob"}', "pw123"),
    ("PGPASSWORD=pw123 psql", "pw123"),
])
def test_redaction_masks_every_kind_of_secret(text, secret):
    masked = redact(text)
    assert secret not in masked and "***" in masked
    assert redact(masked) == masked  # idempotent


def test_redaction_leaves_ordinary_text_alone():
    for text in ["postgresql://bob@db:5432/optuna", "http://127.0.0.1:5000/#/experiments/1", "lr=0.01 resize=67",
                 "sqlite:////abs/mlruns/mlflow.db?timeout=60", "test/best_acc 0.8123"]:
        assert redact(text) == text


def test_a_busy_sqlite_store_is_waited_for_not_an_error(home):
    """Another process holds the database's write lock for 7 s (Python's SQLite default gives up after
    5 s with "database is locked"): a write through the project's store waits and succeeds."""
    store.set_up_store()
    client = mlflow.MlflowClient(default_tracking_uri())
    run = client.create_run(store.experiment_id(store.DEFAULT_EXPERIMENT))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(7); db.execute('COMMIT')\n"),
        str(mlruns_dir() / "mlflow.db")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        client.log_metric(run.info.run_id, "waited", 1.0)
        assert time.monotonic() - t0 > 5  # it really waited for the lock
    finally:
        holder.wait(30)
    assert client.get_run(run.info.run_id).data.metrics["waited"] == 1.0


def test_a_first_open_that_meets_another_creator_is_tried_again_and_a_store_that_keeps_failing_is_one_line(
        home, monkeypatch):
    """A process outside the project's lock (`mlflow ui`, a notebook's MlflowClient) creating the project's
    SQLite file at the same moment fails the first open with "table ... already exists" (seen with two real
    processes); the open is tried again, not reported as an unusable store. One that keeps failing is still
    one line, after OPEN_ATTEMPTS tries."""
    real, calls = mlflow.MlflowClient.search_experiments, []

    def collide(fail_times):
        def search_experiments(self, *args, **kwargs):
            calls.append(1)
            if len(calls) <= fail_times:
                raise OperationalError("CREATE TABLE jobs", {}, Exception("table jobs already exists"))
            return real(self, *args, **kwargs)
        return search_experiments

    monkeypatch.setattr(store, "OPEN_RETRY_S", 0.01)
    monkeypatch.setattr(mlflow.MlflowClient, "search_experiments", collide(2))
    store.set_up_store()
    assert len(calls) == 3
    assert store.experiment_id(store.DEFAULT_EXPERIMENT)  # the store is usable

    calls.clear()
    monkeypatch.setattr(mlflow.MlflowClient, "search_experiments", collide(99))
    with pytest.raises(UsageError) as failed:
        store.set_up_store()
    assert len(calls) == store.OPEN_ATTEMPTS
    assert "cannot use the tracking store" in str(failed.value) and "table jobs already exists" in str(failed.value)
    assert "\n" not in str(failed.value)


def test_a_failed_experiment_creation_is_reported_as_such(home, monkeypatch):
    store.set_up_store()

    def refuse(self, name, artifact_location=None, tags=None):
        raise MlflowException("permission denied for schema public", TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(mlflow.MlflowClient, "create_experiment", refuse)
    with pytest.raises(UsageError, match="cannot create experiment 'new-one' .*permission denied"):
        store.experiment_id("new-one")


def test_a_parent_run_that_cannot_be_looked_up_is_an_error_not_a_missing_parent(home, monkeypatch):
    """Taking a store error for "no parent yet" started a second parent run for the same study."""
    store.set_up_store()
    client = mlflow.MlflowClient()
    run = client.create_run(store.experiment_id(store.DEFAULT_EXPERIMENT)).info.run_id
    assert parent.existing_parent(run) == run
    assert parent.existing_parent("0" * 32) is None  # never existed: a new parent is right
    client.delete_run(run)
    assert parent.existing_parent(run) is None  # deleted: likewise

    def unavailable(self, run_id):
        raise MlflowException("the database is restarting", TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(mlflow.MlflowClient, "get_run", unavailable)
    with pytest.raises(UsageError, match="cannot look up the study's parent run"):
        parent.existing_parent(run)


def test_a_failure_in_the_writer_thread_says_what_failed(tmp_path):
    writer = run_files.writer("r", (tmp_path / "artifacts").as_uri())

    def log():
        raise MlflowException("store unreachable")
    log.what = "logging epoch 1's metrics"
    writer.submit({"w": torch.zeros(2)}, best=True, then=log)
    with pytest.raises(RuntimeError, match="^logging epoch 1's metrics failed: store unreachable"):
        writer.close()
    writer.close()  # closing again is harmless


@pytest.mark.parametrize("storage", ["oracle+oracledb://u@db/x", "mssql+pyodbc://u@db/x", "redis://db:6379"])
def test_a_storage_that_cannot_lock_across_hosts_is_refused(storage, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("[space]\nlr = { low = 0.001, high = 0.1, log = true }\n")
    with pytest.raises(UsageError, match="only sqlite, postgresql, mysql storages"):
        load_sweep(path, storage=storage)
    for ok in ("postgresql+psycopg://u@db/x", "mysql+pymysql://u@db/x", f"sqlite:///{tmp_path}/o.db"):
        assert load_sweep(path, storage=ok).storage == ok


def test_a_secret_in_a_trials_error_never_reaches_the_parent_runs_trials_csv(home, tmp_path):
    """A trial's fail_reason may quote the storage URL with its password: trials.csv is redacted."""
    import optuna

    from alexnet.sweep import report

    store.set_up_store()
    path = tmp_path / "leaky.toml"
    path.write_text("[space]\nlr = { low = 0.001, high = 0.1, log = true }\n[set]\nresize = 67\nepochs = 1\n")
    sweep = load_sweep(path)
    study = optuna.create_study(study_name=sweep.study, direction="maximize")
    trial = study.ask()
    trial.suggest_float("lr", 0.001, 0.1, log=True)
    trial.set_user_attr("fail_reason", "OperationalError: postgresql+psycopg://bob:hunter2@db:5432/optuna refused")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    client = mlflow.MlflowClient()
    parent = client.create_run(store.experiment_id(store.DEFAULT_EXPERIMENT), run_name=sweep.study).info.run_id
    report.summarize(study, sweep, parent)
    csv = Path(client.download_artifacts(parent, "trials.csv", str(tmp_path))).read_text()
    assert "bob:***@db:5432" in csv and "hunter2" not in csv
