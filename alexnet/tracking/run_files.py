"""A run's checkpoint files: `checkpoints/last.pt` and `checkpoints/best.pt` among its artifacts. Where
`alexnet/tracking/checkpoint.py` (the file format and the background writer, which know nothing of
runs) meets the store: on the local store a checkpoint is written and read in place; elsewhere (a
tracking server) it goes through a temporary folder and MLflow's artifact calls.

The lifecycle calls this module and this module calls `checkpoint`, never the other way: `fetch` and
`fetch_best` on a resume, `writer` for a run's epochs (the writer publishes through `RunCheckpoints`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import mlflow

from alexnet import files
from alexnet.tracking import checkpoint
from alexnet.tracking.disk import listed, remove
from alexnet.tracking.store import CHECKPOINTS as FOLDER, local_artifact_dir


def publish(state: dict, name: str, run_id: str, artifact_uri: str) -> int:
    """Write `state` as `checkpoints/<name>.pt`: saved in place (atomically) on the local store, uploaded
    from a temp folder elsewhere. Returns the file's bytes."""
    folder = local_artifact_dir(artifact_uri)
    if folder is not None:
        path = folder / FOLDER / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.save(state, path)
        return path.stat().st_size
    with tempfile.TemporaryDirectory(prefix="alexnet-ckpt-") as tmp:
        path = Path(tmp) / f"{name}.pt"
        checkpoint.save(state, path)
        mlflow.MlflowClient().log_artifact(run_id, str(path), FOLDER)
        return path.stat().st_size


def keep_last_as_best(run_id: str, artifact_uri: str) -> int:
    """Make the published `last.pt` the run's `best.pt` too, just before a newer, worse state replaces
    `last.pt`. On the local store a hard link (no copy, no room needed; `os.replace` of the next `last.pt`
    leaves it whole); elsewhere a download and an upload. Returns `best.pt`'s bytes (0: no `last.pt`)."""
    folder = local_artifact_dir(artifact_uri)
    if folder is not None:
        last, best = folder / FOLDER / "last.pt", folder / FOLDER / "best.pt"
        if not last.is_file():
            return 0
        with files.replacing(best) as tmp:
            try:
                os.link(last, tmp)
            except OSError:  # a file system without hard links
                shutil.copyfile(last, tmp)
        return best.stat().st_size
    with tempfile.TemporaryDirectory(prefix="alexnet-ckpt-") as tmp:
        if "last.pt" not in listed(run_id):
            return 0
        path = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{FOLDER}/last.pt", dst_path=tmp))
        best = path.with_name("best.pt")
        path.rename(best)
        mlflow.MlflowClient().log_artifact(run_id, str(best), FOLDER)
        return best.stat().st_size


class RunCheckpoints:
    """The run's checkpoint folder as `checkpoint.Writer` sees it: where a state is published, how the
    published `last.pt` is kept as `best.pt`, and how a file goes."""

    def __init__(self, run_id: str, artifact_uri: str):
        self.run_id, self.artifact_uri = run_id, artifact_uri

    def path(self, name: str) -> str:
        return f"{FOLDER}/{name}.pt"

    def publish(self, state: dict, name: str) -> int:
        return publish(state, name, self.run_id, self.artifact_uri)

    def keep_last_as_best(self) -> int:
        return keep_last_as_best(self.run_id, self.artifact_uri)

    def remove(self, name: str) -> None:
        remove(name, self.run_id, self.artifact_uri)


def writer(run_id: str, artifact_uri: str, last_is_best: bool = False, on_written=None) -> checkpoint.Writer:
    """The background writer of a run's checkpoints (see `checkpoint.Writer`), once the temporary files
    a writer killed mid-write left behind are gone (one writer per run: a resume checks the run is not
    RUNNING elsewhere)."""
    folder = local_artifact_dir(artifact_uri)
    for tmp in (folder / FOLDER).glob(".*.tmp") if folder else ():
        tmp.unlink(missing_ok=True)
    return checkpoint.Writer(RunCheckpoints(run_id, artifact_uri), last_is_best=last_is_best, on_written=on_written)


def fetch(run_id: str, name: str) -> dict | None:
    """Load the run's `checkpoints/<name>.pt` (checksum checked), or None if it has none. For the best
    state use `fetch_best`: `best.pt` exists only while it differs from `last.pt`."""
    client = mlflow.MlflowClient()
    what = f"{FOLDER}/{name}.pt of run {run_id}"
    folder = local_artifact_dir(client.get_run(run_id).info.artifact_uri)
    if folder is not None:  # the local store: read it in place, no copy
        path = folder / FOLDER / f"{name}.pt"
        return checkpoint.load(path, what) if path.is_file() else None
    if f"{name}.pt" not in listed(run_id):
        return None
    with tempfile.TemporaryDirectory(prefix="alexnet-ckpt-") as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{FOLDER}/{name}.pt", dst_path=tmp)
        return checkpoint.load(path, what)


def fetch_best(run_id: str, last: dict | None = None) -> dict | None:
    """The run's best training state: `last.pt` when its best epoch is its last epoch, else `best.pt`
    (None if there is neither). `last`: the run's `last.pt`, already loaded."""
    last = last if last is not None else fetch(run_id, "last")
    if last is not None and last["best_epoch"] == last["epoch"]:
        return last
    return fetch(run_id, "best")
