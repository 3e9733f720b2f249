"""Disk: the checkpoints and models are the big part of a run. How much a run holds, recorded on the run
as the tag `disk_bytes` (the leaderboard reads it instead of listing every run's files), and deleting a
run's checkpoints and models while its params, metrics, tags, config and plots stay. Works wherever MLflow
can list and delete artifacts: the local store, and a server started with `--serve-artifacts`.

Who keeps `disk_bytes` current: the checkpoint writer after each write (the checkpoints: all that is big
while a run trains), the end of the run (everything: checkpoints, model, plots), and every deletion here.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from alexnet import compat
from alexnet.tracking.store import CHECKPOINTS, local_artifact_dir

TAG = "disk_bytes"


def _folder_size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
            except FileNotFoundError:  # removed meanwhile (a temp file renamed into place)
                pass
    return total


def _listed_size(artifact_uri: str) -> int:
    return sum(_listed_size(f"{artifact_uri}/{f.path.rsplit('/', 1)[-1]}") if f.is_dir else (f.file_size or 0)
               for f in mlflow.artifacts.list_artifacts(artifact_uri=artifact_uri))


def artifact_bytes(artifact_uri: str, path: str | None = None) -> int:
    """Bytes under an artifact location (or its `path`): from the file system on the local store."""
    folder = local_artifact_dir(artifact_uri)
    if folder is not None:
        return _folder_size(folder / path if path else folder)
    return _listed_size(f"{artifact_uri.rstrip('/')}/{path}" if path else artifact_uri)


def logged_models(run) -> list:
    return mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                       filter_string=f"source_run_id = '{run.info.run_id}'")


def run_disk_usage(run_id: str) -> int:
    """Bytes of the run's artifacts plus its logged models, measured now."""
    run = mlflow.MlflowClient().get_run(run_id)
    return artifact_bytes(run.info.artifact_uri) + sum(artifact_bytes(m.artifact_location) for m in logged_models(run))


def measure(run_id: str) -> int:
    """Measure the run's bytes and record them in its `disk_bytes` tag."""
    nbytes = run_disk_usage(run_id)
    mlflow.MlflowClient().set_tag(run_id, TAG, str(nbytes))
    return nbytes


def delete_checkpoints(run_id: str) -> int:
    """Delete the run's checkpoints and logged model(s), keeping its params, metrics, tags, config and
    plots; tag it `checkpoints=deleted`. Returns the bytes freed."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    freed = artifact_bytes(run.info.artifact_uri, CHECKPOINTS)
    if any(f.path.rstrip("/").endswith(CHECKPOINTS) for f in client.list_artifacts(run_id)):
        compat.delete_artifacts(run.info.artifact_uri, CHECKPOINTS)
    for model in logged_models(run):
        freed += artifact_bytes(model.artifact_location)
        compat.delete_artifacts(model.artifact_location)
        client.delete_logged_model(model.model_id)
    client.set_tag(run_id, "checkpoints", "deleted")
    measure(run_id)
    return freed


def checkpoint_files(run) -> dict[str, int]:
    """The run's checkpoint files and their bytes, e.g. {"last.pt": 86_000_000}."""
    folder = local_artifact_dir(run.info.artifact_uri)
    if folder is not None:
        return {p.name: p.stat().st_size for p in (folder / CHECKPOINTS).glob("*.pt")}
    return {Path(f.path).name: f.file_size or 0
            for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, CHECKPOINTS) if not f.is_dir}


def spare_best_bytes(run) -> int:
    """Bytes of a FINISHED run's `best.pt` that its logged model makes spare (the model holds the best
    epoch's weights, and a finished run is not resumed), else 0."""
    if run.info.status != "FINISHED" or run.data.tags.get("checkpoints") == "deleted":
        return 0
    best = checkpoint_files(run).get("best.pt", 0)
    return best if best and logged_models(run) else 0


def drop_spare_best(run) -> int:
    """Delete a FINISHED run's spare `best.pt` (see `spare_best_bytes`); returns the bytes freed."""
    freed = spare_best_bytes(run)
    if freed:
        remove("best", run.info.run_id, run.info.artifact_uri)
    return freed


def remove(name: str, run_id: str, artifact_uri: str) -> None:
    """Delete `checkpoints/<name>.pt` if the run has one."""
    folder = local_artifact_dir(artifact_uri)
    if folder is not None:
        (folder / CHECKPOINTS / f"{name}.pt").unlink(missing_ok=True)
    elif f"{name}.pt" in listed(run_id):
        compat.delete_artifacts(artifact_uri, f"{CHECKPOINTS}/{name}.pt")


def listed(run_id: str) -> set[str]:
    return {Path(f.path).name for f in mlflow.MlflowClient().list_artifacts(run_id, CHECKPOINTS)}
