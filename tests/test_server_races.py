"""Races on the team's servers, forced: a throw-away PostgreSQL (`scripts/throwaway-postgres`) and the team's
MLflow tracking server on it (`alexnet server`), as tests/test_scale_out.py starts them.

Two runs log the same Fashion-MNIST dataset at the same instant. MLflow's SQL store looks the dataset up,
then inserts it; two writers that both looked before either inserted collide on its key ("dataset_pk").
The test makes that happen every time: the two processes are released together by one barrier just as
they log their inputs, and a trigger on the server's database holds each insert of a dataset for half a
second, so both look-ups come before either insert commits. Both runs must end with their datasets.

Skips, saying why, only where PostgreSQL or psycopg are not installed (`scripts/setup --test` installs them).
"""

import glob
import multiprocessing
import os
import shutil
from importlib.util import find_spec

import mlflow
import pytest

from alexnet.tracking import record
from alexnet.training import datafiles
from alexnet.training.config import Config
from test_scale_out import postgres, server  # noqa: F401 (the fixtures)

MISSING = [what for what, there in [
    ("PostgreSQL (apt-get install postgresql)", glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb")),
    ("psycopg (pip install -e '.[team]')", find_spec("psycopg")),
] if not there]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)} (scripts/setup --test installs them)")

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


def test_two_runs_logging_one_new_dataset_at_the_same_instant_both_record_it(postgres, server):  # noqa: F811
    import psycopg

    uri = server["exports"]["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("dataset-race")
    runs = [client.create_run(exp, run_name=f"trial-{i}").info.run_id for i in range(2)]
    port = postgres["url"].rsplit(":", 1)[1]
    with psycopg.connect(host="127.0.0.1", port=port, user="alexnet", password=postgres["password"],
                         dbname="alexnet_mlflow", autocommit=True) as db:
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
