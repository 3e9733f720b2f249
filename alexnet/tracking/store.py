"""The MLflow store: checked and set up before any run exists, the experiment runs go to, and whether a
RUNNING run's process is still alive. Torch-free: the leaderboard, the UI and the sweep launcher use it
without loading torch.

A run's process writes its host, pid, pid namespace, process start time and a heartbeat as tags
(`process_tags`), at once and every HEARTBEAT_S. A RUNNING run whose process is gone is *stale*
(`stale_reason`): when it ran in this very pid namespace (same kernel boot, same namespace) its pid and
start time are checked directly; anywhere else, including another container or machine that bears this
host's name, it is gone only once its heartbeat is older than STALE_AFTER_S. `alexnet runs` shows such
runs as STALE and `--kill-stale` ends them KILLED; `train --resume`, the sweep launcher and `alexnet gc`
ask the same question.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

import mlflow
import psutil
from filelock import FileLock
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException

from alexnet import UsageError
from alexnet.tracking import views
from alexnet.home import artifacts_dir, is_local_default, mlruns_dir, tracking_uri, where, with_busy_timeout
from alexnet.redact import first_line, redact

DEFAULT_EXPERIMENT = "alexnet-fashion-mnist"
CHECKPOINTS = "checkpoints"  # a run's artifact folder of checkpoints (alexnet/tracking/run_files.py writes it)
HEARTBEAT_S = 60             # a running run refreshes its `heartbeat` tag this often
STALE_AFTER_S = 5 * 60       # a run on another host with no heartbeat for this long is stale


def quiet_mlflow() -> None:
    """MLflow's own chatter stays out of the user's way: the database-creation INFO lines, the
    system-metrics start/stop lines, the progress bars of artifact downloads (a resume's checkpoint),
    and, with a tracking server, the run's URL printed to stdout as each run ends (in the GenAI view;
    the sweep's own lines say which runs ended, and `alexnet ui` prints the pages to open)."""
    for name in ("mlflow.store.db.utils", "mlflow.store.db", "alembic", "mlflow.system_metrics",
                 "mlflow.tracking._tracking_service.client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def set_up_store(uri: str | None = None, open_store: bool = True) -> str:
    """Point MLflow at the store and check it answers, before any run exists; returns the URI.
    The project's SQLite file is created once, under a file lock: parallel first opens corrupt it.
    `open_store=False`: a command that reads the project's existing SQLite file itself (the leaderboard)
    spares opening it through MLflow's tracking store (about 1 s, importing it)."""
    uri = with_busy_timeout(uri or tracking_uri())
    quiet_mlflow()
    os.environ["MLFLOW_TRACKING_URI"] = uri  # child processes (sweep workers, the UI) inherit it
    mlflow.set_tracking_uri(uri)
    if is_local_default(uri):
        try:
            artifacts_dir().mkdir(parents=True, exist_ok=True)
            probe = mlruns_dir() / f".write-probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UsageError(f"tracking: cannot write {mlruns_dir()} ({e.strerror}): fix its permissions or "
                             f"set MLFLOW_TRACKING_URI") from None
        database = mlruns_dir() / "mlflow.db"
        if open_store or not database.is_file() or not database.stat().st_size:
            with FileLock(str(mlruns_dir() / ".mlflow.db.lock")):
                # The lock keeps this project's commands apart; a process outside it (`mlflow ui`, a notebook's
                # MlflowClient) may be creating the same file at the same moment, which fails the first open
                # ("table ... already exists"): it is tried again once the other is done.
                _answers(uri, attempts=OPEN_ATTEMPTS)  # creates and migrates the database
        return uri
    if uri.startswith(("http://", "https://")):
        _probe_server(uri)
    _answers(uri)
    return uri


OPEN_ATTEMPTS, OPEN_RETRY_S = 4, 1.0  # the project's SQLite file: a first open that fails is tried again


def _answers(uri: str, attempts: int = 1) -> None:
    for attempt in range(1, attempts + 1):
        try:
            mlflow.MlflowClient().search_experiments(max_results=1)
            return
        except Exception as e:
            if attempt == attempts:
                raise UsageError(f"tracking: cannot use the tracking store {redact(where(uri))} ({first_line(e)}): "
                                 f"start the server or fix MLFLOW_TRACKING_URI / --tracking-uri") from None
            time.sleep(OPEN_RETRY_S)


def _probe_server(uri: str, timeout: float = 10.0) -> None:
    """One quick request to the server's `/health`: MLflow's own client retries for minutes."""
    parts = urlsplit(uri)
    if not parts.hostname:
        raise UsageError(f"tracking: {redact(uri)} names no host (want http://HOST:PORT)")
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


def experiment_id(name: str, create: bool = True) -> str:
    """The experiment's id, created if missing (artifacts under `mlruns/artifacts/` on the local store)."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise UsageError(f"tracking: experiment {name!r} is deleted: restore it (mlflow experiments restore "
                             f"--experiment-id {exp.experiment_id}) or set another experiment")
        return exp.experiment_id
    if not create:
        known = ", ".join(e.name for e in client.search_experiments()) or "none yet"
        raise UsageError(f"no experiment {name!r} in {redact(where(tracking_uri()))} (known: {known})")
    location = artifacts_dir().as_uri() if is_local_default(mlflow.get_tracking_uri()) else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=views.experiment_tags())
    except MlflowException as e:
        exp = client.get_experiment_by_name(name)  # another process may have created it first
        if exp is not None:
            return exp.experiment_id
        raise UsageError(f"tracking: cannot create experiment {name!r} in {redact(where(tracking_uri()))} "
                         f"({first_line(e)})") from None


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The folder of a `file://` artifact URI (the local store), else None (a server, a bucket)."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and artifact_uri.startswith("/"):
        return Path(artifact_uri)
    return None


# --- Is a RUNNING run's process alive? ------------------------------------------------------------

PROCESS_TAGS = ("host", "pid", "pid_namespace", "process_start", "heartbeat")  # what `process_gone` reads


@functools.cache
def pid_namespace() -> str:
    """This process's pid namespace, as a name no other namespace anywhere shares: the kernel's boot id
    and the namespace's inode. A hostname is no such name (containers on one host with `--network host`,
    fleets of machines all called `ubuntu`), nor is the inode alone (every machine's first namespace has
    the same one). Without /proc (macOS), the host and its boot time stand in."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return f"{platform.node()}:boot{psutil.boot_time():.0f}"


def process_tags() -> dict[str, str]:
    """Which process is running the run, to tell a live run from one whose process died."""
    return dict(zip(PROCESS_TAGS, (platform.node(), str(os.getpid()), pid_namespace(),
                                   f"{psutil.Process().create_time():.3f}", str(int(time.time())))))


def stale_reason(status: str, tags: dict, now: float | None = None) -> str | None:
    """Why a RUNNING run is stale (its process is gone), or None if it may still be alive."""
    if status != "RUNNING" or "pid" not in tags:
        return None  # not running, or not started by this code: cannot tell
    return process_gone(tags, now)


def process_gone(tags: dict, now: float | None = None) -> str | None:
    """Why the process that wrote `tags` (`process_tags`) is gone, or None if it may still be alive: the one
    rule for runs, resumes, launchers and parent runs. In this pid namespace the process is checked
    directly (pid and start time, so a reused pid is not mistaken for it). Anywhere else its pid means
    nothing here, even on a host of the same name, and it is gone once its heartbeat is older than
    STALE_AFTER_S; so is a process whose tags name no namespace (written before they did)."""
    if tags.get("pid_namespace") == pid_namespace():
        try:
            started = psutil.Process(int(tags["pid"])).create_time()
        except (psutil.NoSuchProcess, ValueError):
            return f"process {tags['pid']} is gone"
        if abs(started - float(tags.get("process_start", started))) > 1:
            return f"process {tags['pid']} is gone (the pid now belongs to another process)"
        return None
    try:
        age = (now or time.time()) - float(tags.get("heartbeat", 0))
    except ValueError:
        age = math.inf
    if age > STALE_AFTER_S:
        same_name = " (another machine or container of this name)" if tags.get("host") == platform.node() else ""
        return f"no heartbeat from {tags.get('host', '?')}{same_name} for {age / 60:.0f} min"
    return None


def start_heartbeat(run_id: str, also=None):
    """Write this process's tags (`process_tags`) on the run now and every HEARTBEAT_S in a thread, and
    call `also(tags)` each time; returns the function that stops it. Re-writing the pid, not only the
    heartbeat, keeps a run that two processes share (a sweep's parent, launched from two terminals) tied
    to one that is alive."""
    client = mlflow.MlflowClient()
    stop = threading.Event()

    def write():
        tags = process_tags()
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
        if also is not None:
            also(tags)

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


def mark_killed(run_id: str, reason: str) -> None:
    """End a stale run as KILLED (it can still be resumed from its checkpoint)."""
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "killed_reason", reason)
    client.set_terminated(run_id, "KILLED")
