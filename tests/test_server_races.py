"""Races and refusals on the team's servers, forced: a throw-away PostgreSQL (`scripts/throwaway-postgres`) and
the team's MLflow tracking server on it (`alexnet server`), as tests/test_scale_out.py starts them.

Two runs log the same Fashion-MNIST dataset at the same instant. MLflow's SQL store looks the dataset up,
then inserts it; two writers that both looked before either inserted collide on its key ("dataset_pk").
The test makes that happen every time: the two processes are released together by one barrier just as
they log their inputs, and a trigger on the server's database holds each insert of a dataset for half a
second, so both look-ups come before either insert commits. Both runs must end with their datasets.

A trial whose call the tracking server refuses (a trigger on the server's database refuses one insert
once: the server answers BAD_REQUEST, as it does for the collision above) is not its params' fault: it is
queued again with the same params, at most `max_retry` times, and the summary says so; the count stays
exact. A study that ended holding such a failure (its retries spent) retries it when run again with room
for a retry, instead of saying it is done.

Skips, saying why, only where PostgreSQL or psycopg are not installed (`scripts/setup --test` installs them).
"""

import glob
import multiprocessing
import os
import shutil
import subprocess
import sys
from importlib.util import find_spec

import mlflow
import optuna
import pytest

from alexnet.tracking import record
from alexnet.training import datafiles
from alexnet.training.config import Config
from test_scale_out import postgres, server, team_env  # noqa: F401 (the fixtures)

MISSING = [what for what, there in [
    ("PostgreSQL (apt-get install postgresql)", glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb")),
    ("psycopg (pip install -e '.[team]')", find_spec("psycopg")),
] if not there]
needs_postgres = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)} (scripts/setup --test installs them)")

SLOW_INSERTS = """
CREATE OR REPLACE FUNCTION alexnet_test_slow_insert() RETURNS trigger AS $$
BEGIN PERFORM pg_sleep(0.5); RETURN NEW; END $$ LANGUAGE plpgsql;
CREATE TRIGGER alexnet_test_slow_insert BEFORE INSERT ON datasets FOR EACH ROW EXECUTE FUNCTION alexnet_test_slow_insert();
"""
FAST_INSERTS = "DROP TRIGGER IF EXISTS alexnet_test_slow_insert ON datasets"


def log_at_once(uri: str, run_id: str, barrier, results) -> None:
    """A worker: the record of a run (its dataset inputs as a trial's), logged through the run's own code
    path; its first `log_inputs` waits at the barrier."""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)  # over any store an earlier test in this process set
    log_inputs, calls = mlflow.MlflowClient.log_inputs, []

    def together(self, *args, **kwargs):
        if not calls:  # a later call (a retry) goes at once
            barrier.wait(timeout=60)
        calls.append(args)
        return log_inputs(self, *args, **kwargs)

    mlflow.MlflowClient.log_inputs = together
    datasets = record.dataset_inputs(Config(resize=67, train_limit=256, val_size=200, test_limit=200),
                                     {name: "0" * 32 for name in datafiles.FILES}, "/usr/share/datasets/fashion-mnist")
    try:
        record.log_record(run_id, record.Record({}, b"", "torch\n", datasets))
        results.put((run_id, None))
    except Exception as e:
        results.put((run_id, f"{type(e).__name__}: {e}"[:500]))


def database(postgres):
    import psycopg

    port = postgres["url"].rsplit(":", 1)[1]
    return psycopg.connect(host="127.0.0.1", port=port, user="alexnet", password=postgres["password"],
                           dbname="alexnet_mlflow", autocommit=True)


@needs_postgres
def test_two_runs_logging_one_new_dataset_at_the_same_instant_both_record_it(postgres, server):  # noqa: F811
    uri = server["exports"]["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("dataset-race")
    runs = [client.create_run(exp, run_name=f"trial-{i}").info.run_id for i in range(2)]
    with database(postgres) as db:
        db.execute(SLOW_INSERTS)
        try:
            fork = multiprocessing.get_context("fork")  # the imports done once, here
            barrier, results = fork.Barrier(2), fork.Queue()
            workers = [fork.Process(target=log_at_once, args=(uri, run_id, barrier, results)) for run_id in runs]
            for w in workers:
                w.start()
            outcome = dict(results.get(timeout=180) for _ in workers)
            for w in workers:
                w.join(timeout=60)
        finally:
            db.execute(FAST_INSERTS)
    assert outcome == {run_id: None for run_id in runs}, outcome
    for run_id in runs:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert sorted(i.tags[0].value for i in inputs) == ["test", "train", "validation"]
        assert {i.dataset.name for i in inputs} == {"fashion-mnist"}
    # One dataset per split in the experiment, shared by both runs.
    digests = [{i.dataset.digest for i in client.get_run(r).inputs.dataset_inputs} for r in runs]
    assert digests[0] == digests[1] and len(digests[0]) == 3


REFUSE_ONCE = """
CREATE SEQUENCE IF NOT EXISTS alexnet_test_refusals;
ALTER SEQUENCE alexnet_test_refusals RESTART;
CREATE OR REPLACE FUNCTION alexnet_test_refuse_once() RETURNS trigger AS $$
BEGIN IF nextval('alexnet_test_refusals') = 1 THEN RAISE EXCEPTION 'refused once by the test'; END IF; RETURN NEW; END
$$ LANGUAGE plpgsql;
CREATE OR REPLACE TRIGGER alexnet_test_refuse_once BEFORE INSERT ON inputs FOR EACH ROW EXECUTE FUNCTION alexnet_test_refuse_once();
"""
ACCEPT = "DROP TRIGGER IF EXISTS alexnet_test_refuse_once ON inputs"
SWEEP = """
study = "{study}"
n_trials = 1
max_retry = {max_retry}
pruner = "none"
heartbeat_seconds = 1
grace_seconds = 5
[space]
lr = {{ low = 0.005, high = 0.05, log = true }}
[set]
resize = 67
train_limit = 256
val_size = 200
test_limit = 200
batch_size = 64
epochs = 1
"""


def sweep(postgres, server, folder, study: str, max_retry: int, refuse_once: bool):
    """`alexnet sweep` of one trial through the servers; with `refuse_once`, the tracking server refuses the
    first dataset input it is asked to store (the first trial's, as its run starts)."""
    folder.mkdir(exist_ok=True)
    (folder / "sweep.toml").write_text(SWEEP.format(study=study, max_retry=max_retry))
    with database(postgres) as db:
        db.execute(REFUSE_ONCE if refuse_once else ACCEPT)
        try:
            return subprocess.run([sys.executable, "-m", "alexnet", "sweep", "sweep.toml"], cwd=folder, text=True,
                                  capture_output=True, env=team_env(postgres, server, folder), timeout=400)
        finally:
            db.execute(ACCEPT)


def trials(postgres, server, study: str) -> list:
    storage = server["exports"]["ALEXNET_STORAGE"].replace("alexnet@", f"alexnet:{postgres['password']}@")
    return optuna.load_study(study_name=study, storage=storage).trials


@needs_postgres
def test_a_trial_the_tracking_server_refused_is_retried_with_its_params_and_the_count_holds(postgres, server,  # noqa: F811
                                                                                            tmp_path):
    done = sweep(postgres, server, tmp_path / "a", "refused", max_retry=1, refuse_once=True)
    assert done.returncode == 0, done.stderr[-3000:]
    first, retry = trials(postgres, server, "refused")
    assert (first.state.name, retry.state.name) == ("FAIL", "COMPLETE") and retry.params == first.params
    assert first.user_attrs["server_error"] == "the tracking server"
    assert "RestException: BAD_REQUEST" in first.user_attrs["fail_reason"] and "refused once" in first.user_attrs["fail_reason"]
    assert "trial   0 FAIL     failed on a tracking-server error: retried as trial 1" in done.stderr
    assert "trial 0 failed on a tracking-server error and was retried as trial 1" in done.stdout  # the summary
    assert "sweep 'refused': 1 trials finished (1 COMPLETE, 0 PRUNED, 0 FAIL)" in done.stdout
    client = mlflow.MlflowClient(tracking_uri=server["exports"]["MLFLOW_TRACKING_URI"])
    runs = {r.data.tags["sweep.trial"]: r for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`sweep.study` = 'refused' and tags.`sweep.role` = 'trial'")}
    assert runs["0"].info.status == "FAILED" and runs["1"].info.status == "FINISHED"
    assert runs["1"].data.tags["sweep.retry_of"] == "0" and len(runs["1"].inputs.dataset_inputs) == 3


@needs_postgres
def test_a_study_that_ended_on_a_server_failure_retries_it_when_run_again(postgres, server, tmp_path):  # noqa: F811
    spent = sweep(postgres, server, tmp_path, "spent", max_retry=0, refuse_once=True)
    [failed] = trials(postgres, server, "spent")
    assert failed.state.name == "FAIL", spent.stderr[-3000:]
    assert "trial 0 failed on a tracking-server error and was not retried again: its retries (max_retry = 0) are spent" \
        in spent.stdout
    again = sweep(postgres, server, tmp_path, "spent", max_retry=1, refuse_once=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep 'spent': 0 of 1 trials done" in again.stderr
    failed, retry = trials(postgres, server, "spent")
    assert retry.state.name == "COMPLETE" and retry.params == failed.params
    assert "trial 0 failed on a tracking-server error and was retried as trial 1" in again.stdout


def test_a_trial_failed_on_a_server_is_known_by_its_mark_or_by_the_servers_error():
    from alexnet.sweep.study import failed_on_server

    def trial(state, **attrs):
        return optuna.trial.create_trial(state=state, user_attrs=attrs, value=0.5 if state.name == "COMPLETE" else None)
    fail = optuna.trial.TrialState.FAIL
    assert failed_on_server(trial(fail, server_error="the database")) == "the database"
    # Recorded before trials were marked: MLflow's tracking server refusing a call.
    assert failed_on_server(trial(fail, fail_reason="RestException: BAD_REQUEST: (psycopg.errors.UniqueViolation) "
                                                    "duplicate key value violates unique constraint \"dataset_pk\"")) \
        == "the tracking server"
    assert failed_on_server(trial(fail, fail_reason="diverged: the loss is nan at epoch 1")) is None
    assert failed_on_server(trial(fail)) is None
    assert failed_on_server(trial(optuna.trial.TrialState.COMPLETE, server_error="the database")) is None
