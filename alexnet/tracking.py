"""MLflow around `train`: one run per training, every config field a param, every epoch's record a
set of namespaced metrics (`step=epoch`), the run's status mirroring how training ended.

The store: `MLFLOW_TRACKING_URI` (or `--tracking-uri`) when set, else the project's own
`mlruns/`: SQLite at `mlruns/mlflow.db`, artifacts under `mlruns/artifacts/`, whatever the current
folder (MLflow 3.17 refuses the old file store, and a bare default would drop `mlflow.db` in the
current folder).
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alexnet import UsageError
from alexnet.config import Config, to_toml

DEFAULT_EXPERIMENT = "alexnet-fashion-mnist"


def project_root() -> Path:
    """`$ALEXNET_HOME`, else the checkout the package lives in, else the current folder."""
    if os.environ.get("ALEXNET_HOME"):
        return Path(os.environ["ALEXNET_HOME"]).resolve()
    checkout = Path(__file__).resolve().parents[1]
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


def mlruns_dir() -> Path:
    return project_root() / "mlruns"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{mlruns_dir() / 'mlflow.db'}"


def is_local_default(uri: str) -> bool:
    return uri == f"sqlite:///{mlruns_dir() / 'mlflow.db'}"


def set_up_store(uri: str | None = None) -> str:
    """Point MLflow at the store and make sure it can be written, before any training starts.
    The project's SQLite file is created once, under a file lock: parallel first opens corrupt it."""
    import mlflow
    from filelock import FileLock

    uri = uri or tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri  # child processes (sweep workers) inherit it
    mlflow.set_tracking_uri(uri)
    if is_local_default(uri):
        try:
            mlruns_dir().mkdir(parents=True, exist_ok=True)
            (mlruns_dir() / "artifacts").mkdir(exist_ok=True)
            probe = mlruns_dir() / f".write-probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UsageError(f"tracking: cannot write {mlruns_dir()} ({e.strerror}): fix its permissions or set MLFLOW_TRACKING_URI") from None
        with FileLock(str(mlruns_dir() / ".mlflow.db.lock")):
            mlflow.MlflowClient().search_experiments(max_results=1)  # creates and migrates the database
    else:
        try:
            mlflow.MlflowClient().search_experiments(max_results=1)
        except Exception as e:
            raise UsageError(f"tracking: cannot reach the tracking store {redact(uri)} ({type(e).__name__}): "
                             f"start the server or fix MLFLOW_TRACKING_URI") from None
    return uri


def experiment_id(name: str) -> str:
    """The experiment's id, creating it (artifacts under `mlruns/artifacts/` on the local store)."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (mlruns_dir() / "artifacts").as_uri() if is_local_default(mlflow.get_tracking_uri()) else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


def redact(uri: str) -> str:
    """A URI without its password: `postgresql://user:secret@host` -> `postgresql://user:***@host`."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def run_tags(cfg: Config, source: str | None) -> dict[str, str]:
    """Where the run came from and what it ran on."""
    import platform
    import subprocess

    import mlflow
    import torch
    import torchvision

    from alexnet.train import resolve_device, resolve_precision

    device = resolve_device(cfg)
    tags = {
        "experiment_file": source or "",
        "command": " ".join(sys.argv),
        "host": platform.node(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "precision": resolve_precision(cfg, device),
        "version.python": platform.python_version(),
        "version.torch": torch.__version__,
        "version.torchvision": torchvision.__version__,
        "version.mlflow": mlflow.__version__,
    }
    try:
        import optuna

        tags["version.optuna"] = optuna.__version__
    except ImportError:
        pass
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            tags["git.commit"] = commit.stdout.strip()
            tags["git.dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return tags


class StopRun(Exception):
    """Raised by an `on_epoch` callback to end the run early with a given MLflow status and tags
    (the sweep's pruning: status KILLED). `tracked_train` ends the run, then re-raises it."""

    def __init__(self, status: str, tags: dict[str, str] | None = None):
        super().__init__(status)
        self.status, self.tags = status, dict(tags or {})


@dataclass
class TrackedRun:
    run_id: str
    records: list = field(default_factory=list)


def tracked_train(cfg: Config, *, source: str | None = None, parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None, on_epoch=None, progress: bool = True) -> TrackedRun:
    """`train(cfg)` inside one MLflow run. `on_epoch(record, run_id)` is called after each epoch is
    logged; it may raise `StopRun`. The run ends FINISHED, KILLED (Ctrl-C, or StopRun's status) or
    FAILED (divergence or an error, with the reason in tags); the exception is re-raised."""
    import mlflow

    from alexnet.train import Diverged, train

    set_up_store()
    run = mlflow.start_run(experiment_id=experiment_id(cfg.experiment), run_name=cfg.run_name or None,
                           parent_run_id=parent_run_id, tags={**run_tags(cfg, source), **(tags or {})})
    result = TrackedRun(run.info.run_id)
    try:
        mlflow.log_params(asdict(cfg))
        mlflow.log_text(to_toml(cfg), "config.toml")
        for record in train(cfg, progress=progress):
            mlflow.log_metrics(record.metrics(), step=record.epoch)
            result.records.append(record)
            if on_epoch is not None:
                on_epoch(record, result.run_id)
    except StopRun as e:
        mlflow.set_tags(e.tags)
        mlflow.end_run(e.status)
        raise
    except Diverged as e:
        mlflow.set_tags({"failure_reason": "diverged", "failure": str(e), "diverged_epoch": str(e.epoch)})
        mlflow.end_run("FAILED")
        raise
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException as e:
        mlflow.set_tags({"failure_reason": type(e).__name__, "failure": str(e)[:5000]})
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")
    return result
