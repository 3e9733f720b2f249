"""MLflow around `train`: one run per training, with everything it learns.

A run records every config field as a param; tags for where it came from and what it ran on (git
commit and dirty flag, experiment file, command line, versions, device, GPU, host, process); the
resolved config as `config.toml`; per epoch, with `step=epoch`, the namespaced metrics of
`EpochRecord.metrics()`; system metrics (CPU, memory, GPU where `nvidia-ml-py` finds one); the last
and the best training state as `checkpoints/last.pt` and `checkpoints/best.pt` (see
`alexnet/checkpoint.py`: atomic, checksummed, written in the background); `learning_curves.png`; and
at the end the best epoch's model as an MLflow PyTorch model (`models:/m-...`, input example and
signature). Its status mirrors how training ended: FINISHED, KILLED (Ctrl-C, or `StopRun`), FAILED.

A run killed at any moment continues in the same MLflow run from its last checkpoint with
`tracked_train(cfg, resume_run_id=...)` (`alexnet train --resume RUN_ID`). A run left RUNNING by a
dead process is recognised by its `pid`, `process_start` and `heartbeat` tags (`stale_reason`).

The store: `MLFLOW_TRACKING_URI` (or `--tracking-uri`) when set, else the project's own `mlruns/`:
SQLite at `mlruns/mlflow.db`, artifacts under `mlruns/artifacts/`, whatever the current folder
(MLflow 3.17 refuses the old file store, and a bare default would drop `mlflow.db` in the current
folder). Nothing secret is logged: passwords in URIs on the command line are masked.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alexnet import UsageError
from alexnet.config import Config, to_toml

DEFAULT_EXPERIMENT = "alexnet-fashion-mnist"
FOLDER = "checkpoints"    # the run's artifact folder of checkpoints (alexnet/checkpoint.py writes it)
HEARTBEAT_S = 60           # a running run refreshes its `heartbeat` tag this often
STALE_AFTER_S = 5 * 60     # a run on another host with no heartbeat for this long is stale


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
        return uri
    if uri.startswith(("http://", "https://")):
        _probe_server(uri)
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as e:
        reason = redact(str(e).strip().splitlines()[0][:200]) if str(e).strip() else type(e).__name__
        raise UsageError(f"tracking: cannot use the tracking store {redact(uri)} ({type(e).__name__}: {reason}): "
                         f"start the server or fix MLFLOW_TRACKING_URI") from None
    return uri


def _probe_server(uri: str, timeout: float = 10.0):
    """One quick request to the server's `/health`: MLflow's own client retries for minutes."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    url = urlunsplit(parts._replace(netloc=host, path=parts.path.rstrip("/") + "/health", query="", fragment=""))
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # it answers; whether this path is /health is MLflow's business
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UsageError(f"tracking: cannot reach the tracking server {redact(uri)} ({reason}): "
                         f"start the server or fix MLFLOW_TRACKING_URI / --tracking-uri") from None


def experiment_id(name: str) -> str:
    """The experiment's id, creating it (artifacts under `mlruns/artifacts/` on the local store)."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise UsageError(f"tracking: experiment {name!r} is deleted: restore it "
                             f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or set another experiment")
        return exp.experiment_id
    location = (mlruns_dir() / "artifacts").as_uri() if is_local_default(mlflow.get_tracking_uri()) else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


def redact(uri: str) -> str:
    """A text without passwords: `postgresql://user:secret@host` -> `postgresql://user:***@host`,
    `password=secret` -> `password=***` (URIs and key=value pairs anywhere in the text)."""
    text = re.sub(r"(://[^/\s:@]+):[^\s@]*@", r"\1:***@", uri)  # may over-mask `host:port/a@b`: harmless
    return re.sub(r"(?i)\b(password|passwd|pwd|token|secret|api[_-]?key)=[^\s&]+", r"\1=***", text)


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
        "command": redact(" ".join(sys.argv)),
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


def process_tags() -> dict[str, str]:
    """Which process is running the run, to tell a live run from one whose process died."""
    import platform

    import psutil

    return {"host": platform.node(), "pid": str(os.getpid()),
            "process_start": f"{psutil.Process().create_time():.3f}", "heartbeat": str(int(time.time()))}


def stale_reason(status: str, tags: dict, now: float | None = None) -> str | None:
    """Why a RUNNING run is stale (its process is gone), or None if it may still be alive. On this
    host the process is checked directly (pid and start time, so a reused pid is not mistaken for
    it); elsewhere the run is stale once its heartbeat is older than STALE_AFTER_S."""
    import platform

    import psutil

    if status != "RUNNING" or "pid" not in tags:
        return None  # not running, or not started by this code: cannot tell
    if tags.get("host") == platform.node():
        try:
            started = psutil.Process(int(tags["pid"])).create_time()
        except (psutil.NoSuchProcess, ValueError):
            return f"process {tags['pid']} is gone"
        if abs(started - float(tags.get("process_start", started))) > 1:
            return f"process {tags['pid']} is gone (the pid now belongs to another process)"
        return None
    age = (now or time.time()) - float(tags.get("heartbeat", 0))
    if age > STALE_AFTER_S:
        return f"no heartbeat from {tags.get('host', '?')} for {age / 60:.0f} min"
    return None


def mark_killed(run_id: str, reason: str) -> None:
    """End a stale run as KILLED (it can still be resumed from its checkpoint)."""
    import mlflow

    client = mlflow.MlflowClient()
    client.set_tag(run_id, "killed_reason", reason)
    client.set_terminated(run_id, "KILLED")


class StopRun(Exception):
    """Raised by an `on_epoch` callback to end the run early with a given MLflow status and tags
    (the sweep's pruning: status KILLED). `tracked_train` ends the run, then re-raises it."""

    def __init__(self, status: str, tags: dict[str, str] | None = None):
        super().__init__(status)
        self.status, self.tags = status, dict(tags or {})


@dataclass
class TrackedRun:
    run_id: str
    records: list = field(default_factory=list)  # this call's epochs (after a resume: the new ones)


def resume_config(run_id: str) -> Config:
    """The config of a run that can be resumed, or a UsageError saying why it cannot."""
    import tomllib

    import mlflow
    from mlflow.exceptions import MlflowException

    set_up_store()
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UsageError(f"--resume: no run {run_id!r} in {redact(tracking_uri())} (list runs with `alexnet runs`)") from None
    status, tags = run.info.status, run.data.tags
    if status == "FINISHED":
        raise UsageError(f"--resume: run {run_id} is already FINISHED: nothing to resume")
    if status == "RUNNING" and stale_reason(status, tags) is None:
        where = f"pid {tags['pid']} on {tags.get('host', '?')}" if "pid" in tags else "by another process"
        raise UsageError(f"--resume: run {run_id} is still RUNNING ({where}): stop it first, or wait for it")
    if tags.get("checkpoints") == "deleted":
        raise UsageError(f"--resume: run {run_id}'s checkpoints were deleted: train it again with `alexnet train FILE`")
    if "last.pt" not in {Path(f.path).name for f in client.list_artifacts(run_id, FOLDER)}:
        raise UsageError(f"--resume: run {run_id} has no checkpoint ({FOLDER}/last.pt): it stopped before its first "
                         f"epoch ended; train it again with `alexnet train FILE`")
    try:
        table = tomllib.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.toml"))
    except Exception as e:
        raise UsageError(f"--resume: run {run_id} has no readable config.toml ({type(e).__name__})") from None
    return Config(**table)


def log_model(cfg: Config, model_state: dict) -> str:
    """Log `model_state` as the run's MLflow PyTorch model (`torch.export` format), with two real
    test images as its input example and the signature they give. Returns the model's URI."""
    import tempfile

    import mlflow
    import torch
    from mlflow.models import infer_signature

    from alexnet import data
    from alexnet.checkpoint import check_room, local_artifact_dir, tensor_bytes
    from alexnet.model import alexnet

    # MLflow writes the model to a temporary folder, then copies it into the store.
    nbytes = tensor_bytes(model_state)
    for folder in filter(None, [tempfile.gettempdir(), local_artifact_dir(mlflow.get_artifact_uri())]):
        check_room(folder, nbytes, "the model")
    model = alexnet(cfg.dropout, cfg.resize)
    model.load_state_dict(model_state)
    model.eval()
    example = data.resize_batch(data.load(cfg.data_dir, train=False).data[:2], cfg.resize)  # batch 2: export keeps the batch dim free
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    # Explicit requirements: MLflow's inference of them loads the model in a subprocess (~18 s here).
    # No serving-input check: it reloads the 187 MB model to predict the example again (~0.8 s a run),
    # and on a GPU machine it loads onto CUDA, where MLflow refuses a model exported on the CPU.
    info = mlflow.pytorch.log_model(model, name="model", input_example=example.numpy(), signature=signature,
                                    serialization_format="pt2", validate_serving_input=False,
                                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return info.model_uri


def warm_up_model_logging() -> None:
    """Pay `log_model`'s one-time costs early, in the checkpoint writer's thread while training goes on:
    MLflow checks the model's requirements against a map of every installed package (3.3 s in a fresh
    process on 2 cores, with torch's CUDA wheels installed), and `torch.export` loads its tracer. Only
    a speed-up: anything that fails here is left for `log_model` itself to meet."""
    try:
        import torch.export  # noqa: F401
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()  # cached by MLflow for the process
    except Exception:
        pass


def start_heartbeat(run_id: str):
    """Write this process's tags (`process_tags`) on the run now and every HEARTBEAT_S in a thread;
    returns the function that stops it. Re-writing the pid, not only the heartbeat, keeps a run that
    two processes share (a sweep's parent, launched from two terminals) tied to one that is alive."""
    import mlflow
    from mlflow.entities import RunTag

    client = mlflow.MlflowClient()
    stop = threading.Event()

    def write():
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in process_tags().items()], synchronous=True)

    write()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            try:
                write()
            except Exception:
                pass  # a store hiccup must not stop training; the next beat tries again

    thread = threading.Thread(target=beat, name="mlflow-heartbeat", daemon=True)
    thread.start()

    def halt():
        stop.set()
        thread.join()
    return halt


def epoch_logger(run_id: str, record):
    """A function that logs `record`'s metrics with `step=epoch` and the time the epoch ended."""
    import mlflow
    from mlflow.entities import Metric

    ended = int(time.time() * 1000)
    metrics = [Metric(key, value, ended, record.epoch) for key, value in record.metrics().items()]
    return lambda: mlflow.MlflowClient().log_batch(run_id, metrics=metrics, synchronous=True)


def _log_curves(run_id: str) -> None:
    """`learning_curves.png` from the run's metric history (all epochs, also across resumes). A plot
    that fails is noted in a tag: it must not fail the run it describes. Client calls only (no
    active-run state), so it can run in a thread beside the model logging."""
    import tempfile

    import mlflow

    from alexnet.runs import plot_curves

    client = mlflow.MlflowClient()
    try:
        with tempfile.TemporaryDirectory(prefix="alexnet-plot-") as tmp:
            path = Path(tmp) / "learning_curves.png"
            plot_curves([run_id], path)
            client.log_artifact(run_id, str(path))
    except Exception as e:
        client.set_tag(run_id, "curves_error", f"{type(e).__name__}: {e}"[:500])


def tracked_train(cfg: Config, *, source: str | None = None, parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None, on_epoch=None, progress: bool = True,
                  resume_run_id: str | None = None, on_start=None) -> TrackedRun:
    """`train(cfg)` inside one MLflow run. `on_start(run_id)` is called once the run exists;
    `on_epoch(record, run_id)` after each epoch is logged, and may raise `StopRun`. The run ends
    FINISHED, KILLED (Ctrl-C, or StopRun's status) or FAILED (divergence or an error, with the reason
    in tags); the exception is re-raised. `resume_run_id`: continue that run from its last checkpoint
    (`cfg` must be the run's own config, see `resume_config`)."""
    import mlflow

    from alexnet import checkpoint
    from alexnet.train import Diverged, train

    set_up_store()
    start, best_model = None, None
    if resume_run_id:
        if resume_config(resume_run_id) != cfg:
            raise UsageError(f"--resume: the config differs from run {resume_run_id}'s own: resume it with its config")
        start = checkpoint.fetch(resume_run_id, "last")
        best = start if start["best_epoch"] == start["epoch"] else checkpoint.fetch(resume_run_id, "best")
        best_model = best["model"] if best is not None else None
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter per run
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=True)
        previous = run.data.tags
        mlflow.set_tags({**redact_tags(tags or {}), "resumes": str(int(previous.get("resumes", 0)) + 1),
                         "resumed_from_epoch": str(start["epoch"])})
    else:
        run = mlflow.start_run(experiment_id=experiment_id(cfg.experiment), run_name=cfg.run_name or None,
                               parent_run_id=parent_run_id, log_system_metrics=True,
                               tags={**run_tags(cfg, source), **redact_tags(tags or {})})
    run_id = run.info.run_id
    stop_heartbeat = start_heartbeat(run_id)  # writes this process's tags (host, pid, heartbeat) at once
    result = TrackedRun(run_id)
    writer = checkpoint.Writer(run_id, run.info.artifact_uri)

    def wrap_up(curves: bool):
        """Stop the helpers; keep what can be kept, without hiding the error that ended the run."""
        stop_heartbeat()
        try:
            writer.close()
        except (Exception, KeyboardInterrupt) as e:
            mlflow.set_tag("checkpoint_error", str(e)[:500])
        if curves and (result.records or start):
            _log_curves(run_id)

    try:
        if on_start is not None:
            on_start(run_id)
        if not resume_run_id:
            mlflow.log_params({k: redact(str(v)) for k, v in asdict(cfg).items()})
            mlflow.log_text(to_toml(cfg), "config.toml")
        for record in train(cfg, start=start, progress=progress):
            improved = record.best_epoch == record.epoch
            # The epoch's metrics are logged by the writer once its checkpoint is published: a run
            # killed in between resumes from the previous epoch and logs this one then, once.
            snap = writer.submit(["last", "best"] if improved else ["last"], record.state(),
                                 then=epoch_logger(run_id, record))
            if improved:
                best_model = snap["model"]
            result.records.append(record)
            if len(result.records) == 1:
                writer.call_after(warm_up_model_logging)
            if on_epoch is not None:
                on_epoch(record, run_id)
        # The last checkpoints are written, then the curves drawn, while the best model is logged.
        writer.call_after(lambda: _log_curves(run_id))
        if best_model is not None:
            log_model(cfg, best_model)
        stop_heartbeat()
        writer.close()
    except StopRun as e:
        wrap_up(curves=True)
        mlflow.set_tags(e.tags)
        mlflow.end_run(e.status)
        raise
    except Diverged as e:
        wrap_up(curves=True)
        mlflow.set_tags({"failure_reason": "diverged", "failure": str(e), "diverged_epoch": str(e.epoch)})
        mlflow.end_run("FAILED")
        raise
    except KeyboardInterrupt:
        wrap_up(curves=False)
        mlflow.end_run("KILLED")
        raise
    except BaseException as e:
        wrap_up(curves=False)
        mlflow.set_tags({"failure_reason": type(e).__name__, "failure": redact(str(e))[:5000]})
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")
    return result


def redact_tags(tags: dict) -> dict[str, str]:
    return {k: redact(str(v)) for k, v in tags.items()}


# --- Disk: checkpoints and models are the big part of a run ------------------------------------------

def _tree_size(repo, path: str | None = None) -> int:
    total = 0
    for f in repo.list_artifacts(path):
        total += _tree_size(repo, f.path) if f.is_dir else (f.file_size or 0)
    return total


def _logged_models(run) -> list:
    import mlflow

    return mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                       filter_string=f"source_run_id = '{run.info.run_id}'")


def run_disk_usage(run_id: str) -> int:
    """Bytes of the run's artifacts plus its logged models."""
    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    run = mlflow.MlflowClient().get_run(run_id)
    total = _tree_size(get_artifact_repository(run.info.artifact_uri))
    return total + sum(_tree_size(get_artifact_repository(m.artifact_location)) for m in _logged_models(run))


def delete_checkpoints(run_id: str) -> int:
    """Delete the run's checkpoints and logged model(s), keeping its params, metrics, tags, config and
    plots; tag it `checkpoints=deleted`. Returns the bytes freed. Works wherever MLflow can delete
    artifacts: the local store, and a server started with `--serve-artifacts`."""
    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    repo = get_artifact_repository(run.info.artifact_uri)
    freed = _tree_size(repo, FOLDER)
    if any(f.path.rstrip("/").endswith(FOLDER) for f in repo.list_artifacts()):
        repo.delete_artifacts(FOLDER)
    for model in _logged_models(run):
        model_repo = get_artifact_repository(model.artifact_location)
        freed += _tree_size(model_repo)
        model_repo.delete_artifacts()
        client.delete_logged_model(model.model_id)
    client.set_tag(run_id, "checkpoints", "deleted")
    return freed
