"""Disk: the checkpoints and models are the big part of a run. How much a run holds, and deleting its
checkpoints and models while its params, metrics, tags, config and plots stay. Works wherever MLflow
can list and delete artifacts: the local store, and a server started with `--serve-artifacts`."""

from __future__ import annotations

import mlflow
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from alexnet.store import CHECKPOINTS


def _tree_size(repo, path: str | None = None) -> int:
    total = 0
    for f in repo.list_artifacts(path):
        total += _tree_size(repo, f.path) if f.is_dir else (f.file_size or 0)
    return total


def _logged_models(run) -> list:
    return mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                       filter_string=f"source_run_id = '{run.info.run_id}'")


def run_disk_usage(run_id: str) -> int:
    """Bytes of the run's artifacts plus its logged models."""
    run = mlflow.MlflowClient().get_run(run_id)
    total = _tree_size(get_artifact_repository(run.info.artifact_uri))
    return total + sum(_tree_size(get_artifact_repository(m.artifact_location)) for m in _logged_models(run))


def delete_checkpoints(run_id: str) -> int:
    """Delete the run's checkpoints and logged model(s), keeping its params, metrics, tags, config and
    plots; tag it `checkpoints=deleted`. Returns the bytes freed."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    repo = get_artifact_repository(run.info.artifact_uri)
    freed = _tree_size(repo, CHECKPOINTS)
    if any(f.path.rstrip("/").endswith(CHECKPOINTS) for f in repo.list_artifacts()):
        repo.delete_artifacts(CHECKPOINTS)
    for model in _logged_models(run):
        model_repo = get_artifact_repository(model.artifact_location)
        freed += _tree_size(model_repo)
        model_repo.delete_artifacts()
        client.delete_logged_model(model.model_id)
    client.set_tag(run_id, "checkpoints", "deleted")
    return freed
