"""`alexnet gc` on a real store in a temp folder: runs shaped as the project leaves them (a stopped
sweep's trials, confirm runs, finished and killed single runs, a run deleted in MLflow), with files of
real size on disk. The dry run deletes nothing and says what would go; `--yes` frees exactly that, keeps
what the policy keeps, and removes the deleted run for good."""

import mlflow
import optuna
import pytest
from mlflow.exceptions import MlflowException

from alexnet import cli
from alexnet.home import default_storage
from alexnet.tracking import disk, store

MB = 10**6


def make_run(client, exp, name, status, files: dict, model_mb: int = 0, tags=None, metric=None):
    """A run with the given artifact files (path -> MB) and, optionally, a logged model of that size."""
    run = client.create_run(exp, run_name=name, tags=tags or {})
    folder = store.local_artifact_dir(run.info.artifact_uri)
    for path, mb in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(b"\0" * mb * MB)
    if model_mb:
        model = client.create_logged_model(exp, name="model", source_run_id=run.info.run_id)
        models = store.local_artifact_dir(model.artifact_location)
        models.mkdir(parents=True, exist_ok=True)
        (models / "model.pth").write_bytes(b"\0" * model_mb * MB)
    if metric is not None:
        client.log_metric(run.info.run_id, "test/best_acc", metric)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def files_of(run_id) -> list[str]:
    run = mlflow.get_run(run_id)
    folder = store.local_artifact_dir(run.info.artifact_uri)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_gc_applies_the_policy_to_every_run_and_removes_deleted_runs_for_good(home, capsys):
    store.set_up_store()
    client = mlflow.MlflowClient()
    exp = store.experiment_id(store.DEFAULT_EXPERIMENT)
    storage = default_storage()  # the study's trials in Optuna: their states and values decide what stays
    study = optuna.create_study(study_name="g", storage=storage, direction="maximize")
    for acc in [0.5, 0.7, 0.6]:
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=acc))
    parent = client.create_run(exp, run_name="g", tags={"sweep.study": "g", "sweep.role": "parent",
                                                         "sweep.storage": storage})
    client.log_param(parent.info.run_id, "objective", "maximize test/best_acc")  # as a parent before settings.json
    client.log_param(parent.info.run_id, "keep_top", "1")
    client.set_terminated(parent.info.run_id, "KILLED")  # stopped before its retention ran
    ckpt = {"checkpoints/last.pt": 3, "config.toml": 0}
    trials = [make_run(client, exp, f"g-trial-{i}", "FINISHED", ckpt, model_mb=3, metric=acc,
                       tags={"sweep.study": "g", "sweep.role": "trial", "sweep.trial": str(i),
                             "mlflow.parentRunId": parent.info.run_id})
              for i, acc in enumerate([0.5, 0.7, 0.6])]
    confirm = make_run(client, exp, "g-confirm", "FINISHED", ckpt, model_mb=3, metric=0.7,
                       tags={"sweep.study": "g", "sweep.role": "confirm", "mlflow.parentRunId": parent.info.run_id})
    finished = make_run(client, exp, "finished", "FINISHED", {"checkpoints/last.pt": 3, "checkpoints/best.pt": 3},
                        model_mb=3, metric=0.8)
    killed = make_run(client, exp, "killed", "KILLED", {"checkpoints/last.pt": 3, "checkpoints/best.pt": 3})
    deleted = make_run(client, exp, "deleted", "FINISHED", {"checkpoints/last.pt": 2}, model_mb=2)
    client.delete_run(deleted)
    before = {r: files_of(r) for r in [*trials, confirm, finished, killed]}

    # The dry run: what would go, by kind, and how much; nothing goes.
    assert cli.main(["gc"]) == 0
    out, err = capsys.readouterr()
    assert "dry run, nothing is deleted" in err and "alexnet: store sqlite:///" in err
    lines = out.splitlines()
    assert "  sweep 'g': checkpoints and models of trials outside its top 1: 2 runs, 12 MB" in lines
    assert "  confirm runs: checkpoints and models (their metrics are what they are for): 1 run, 6.0 MB" in lines
    assert "  finished runs: best.pt beside a logged model of the same weights: 1 run, 3.0 MB" in lines
    assert "  runs deleted in MLflow, removed for good: 1 run, 4.0 MB" in lines
    assert lines[-1] == "would free 25 MB"
    assert {r: files_of(r) for r in before} == before
    assert mlflow.get_run(deleted).info.lifecycle_stage == "deleted"

    # --yes: the same, done.
    assert cli.main(["gc", "--yes"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "freed 25 MB"
    assert files_of(trials[1]) == ["checkpoints/last.pt", "config.toml"] and disk.logged_models(mlflow.get_run(trials[1]))
    for run_id in (trials[0], trials[2], confirm):
        assert files_of(run_id) == ["config.toml"] and not disk.logged_models(mlflow.get_run(run_id))
        assert mlflow.get_run(run_id).data.tags["checkpoints"] == "deleted"
    assert files_of(finished) == ["checkpoints/last.pt"] and disk.logged_models(mlflow.get_run(finished))
    assert files_of(killed) == ["checkpoints/best.pt", "checkpoints/last.pt"]  # it can still be resumed
    with pytest.raises(MlflowException):
        client.get_run(deleted)
    # Every run now records its size, for the leaderboard.
    for run_id in [*trials, confirm, finished, killed, parent.info.run_id]:
        assert int(mlflow.get_run(run_id).data.tags["disk_bytes"]) == disk.run_disk_usage(run_id)

    assert cli.main(["gc"]) == 0
    assert capsys.readouterr().out.startswith("nothing to free: every one of the 7 runs keeps only what the policy keeps")


def test_gc_leaves_runs_deleted_in_mlflow_while_an_experiment_is_deleted(home, capsys):
    """`mlflow gc` would remove an experiment deleted in MLflow with all its runs; one can still restore it."""
    store.set_up_store()
    client = mlflow.MlflowClient()
    deleted = make_run(client, store.experiment_id(store.DEFAULT_EXPERIMENT), "deleted", "FINISHED", {"checkpoints/last.pt": 1})
    client.delete_run(deleted)
    other = store.experiment_id("other")
    kept = make_run(client, other, "in-a-deleted-experiment", "FINISHED", {"checkpoints/last.pt": 1})
    client.delete_experiment(other)
    assert cli.main(["gc", "--yes"]) == 0
    assert "runs deleted in MLflow stay: `mlflow gc` would also remove the experiments deleted in MLflow ('other')" \
        in capsys.readouterr().err
    assert client.get_run(deleted).info.lifecycle_stage == "deleted" and client.get_run(kept)
    assert client.get_experiment(other).lifecycle_stage == "deleted"
