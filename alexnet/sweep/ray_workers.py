"""Sweep workers placed by Ray: `alexnet sweep FILE --ray ADDRESS --workers N` (`auto`: the cluster this
machine belongs to, or $RAY_ADDRESS).

Each worker is a Ray task that starts the very process the local launcher starts (`python -m
alexnet.sweep.worker`, its orders from `launcher.worker_orders` in its environment) on whichever node Ray places
it, in a scratch folder of its own (its ALEXNET_HOME and working folder, removed afterwards), with its
share of a GPU (`--gpus-per-worker`, default 1; a fraction puts several workers on one GPU, which Ray then
shows to each of them but does not split: their memory must fit together) and of the CPUs
(`--cpus-per-worker`, default 1, also its torch threads). On a cluster without GPUs the workers ask for
none and train on their CPUs; asking for GPUs there, or for more than one node has, is an error at start.
The trial logic is the worker's, never repeated here; this module only places it:
  - a node that dies takes its tasks with it: Ray runs each again elsewhere (`MAX_RETRIES`), and the
    study's heartbeat fails the lost trial and queues it with the same params: the count stays exact;
  - Ctrl-C on the launcher cancels every task; a task passes the cancellation on to its worker as SIGINT
    (the trial ends KILLED and is queued again) and returns once the worker has exited. A worker whose
    task's process dies stops by itself (it watches that process).
Every node needs the project installed in the Python that runs `ray start`, and the database password in
its own environment (PGPASSWORD or ~/.pgpass, like the data in ALEXNET_DATA_DIR or Debian's package): the
launcher ships the sweep, never a credential, so the storage and tracking URLs may not carry one.
Ray is imported here only, and this module only on this path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import ray

from alexnet import UsageError
from alexnet.home import tracking_uri, where
from alexnet.redact import first_line, redact
from alexnet.sweep.spec import PARENT_ENV, SPEC_ENV, Sweep

MAX_RETRIES = 3   # times Ray runs a task again whose node or worker process died
STOP_S = 120      # after a cancellation, how long a worker may take to end its trial before it is killed


@ray.remote
def run_worker(slot: int, env: dict) -> tuple[int, str]:
    """One sweep worker on this node; returns (its exit status, where it ran)."""
    folder = tempfile.mkdtemp(prefix=f"alexnet-worker-{slot}-")
    env = {**os.environ, **env, "ALEXNET_HOME": folder, PARENT_ENV: str(os.getpid())}
    proc = subprocess.Popen([sys.executable, "-m", "alexnet.sweep.worker"], cwd=folder, env=env)
    try:
        while proc.poll() is None:
            try:
                proc.wait(timeout=1.0)  # in steps: Ray's cancellation arrives between them
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:  # ray.cancel: the worker ends its trial KILLED and queues it again
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return proc.returncode, f"pid {proc.pid} on {socket.gethostname()}"


class RayWorker:
    """A Ray task seen as a worker process (what `launcher.watch` needs of a `subprocess.Popen`)."""

    def __init__(self, ref, slot: int):
        self.ref, self.returncode, self.where = ref, None, f"Ray task of slot {slot}"

    def _collect(self):
        try:
            self.returncode, self.where = ray.get(self.ref)
        except ray.exceptions.TaskCancelledError:
            self.returncode = 130
        except ray.exceptions.RayError as e:  # its node died more often than Ray retries, or the task failed
            self.returncode, self.where = 1, f"{self.where}: {first_line(e)}"

    def poll(self):
        if self.returncode is None and ray.wait([self.ref], timeout=0)[0]:
            self._collect()
        return self.returncode

    def wait(self, timeout: float | None = None):
        if self.returncode is None:
            if not ray.wait([self.ref], timeout=timeout)[0]:
                raise subprocess.TimeoutExpired(self.where, timeout)
            self._collect()
        return self.returncode

    def send_signal(self, sig):
        ray.cancel(self.ref)  # a KeyboardInterrupt in the task, which passes SIGINT on to its worker

    def kill(self):
        ray.cancel(self.ref, force=True)


class Cluster:
    """The Ray cluster the workers go to, and what each asks of it."""

    def __init__(self, address: str, gpus_per_worker: float | None = None, cpus_per_worker: float = 1.0):
        self.address, self.gpus, self.cpus = address, gpus_per_worker, cpus_per_worker
        self.note = ""

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))

    def connect(self, sweep: Sweep) -> None:
        """Check that the workers can share the stores, connect, and fit the request to the cluster:
        a UsageError in one line for anything that would leave the workers unplaceable."""
        what = "sweep: --ray"
        if not tracking_uri().startswith(("http://", "https://")):
            raise UsageError(f"{what}: the workers run on other machines: the tracking store must be a tracking server "
                             f"(--tracking-uri http://HOST:PORT, e.g. from `alexnet server`), not {redact(where(tracking_uri()))}")
        if sweep.storage.startswith("sqlite"):
            raise UsageError(f"{what}: the workers run on other machines: the storage must be a database server "
                             f"(--storage postgresql+psycopg://USER@HOST:PORT/DB), not a SQLite file")
        for name, url in (("storage", sweep.storage), ("tracking URI", tracking_uri())):
            if redact(url) != url:
                raise UsageError(f"{what}: the {name} carries a credential, which would travel with every task: "
                                 f"give each node its own (PGPASSWORD or ~/.pgpass; MLFLOW_TRACKING_TOKEN)")
        if self.cpus <= 0 or (self.gpus is not None and not 0 <= self.gpus <= 1):
            raise UsageError(f"{what}: --cpus-per-worker must be > 0 and --gpus-per-worker between 0 and 1 (a worker "
                             f"trains on one GPU; a fraction shares one)")
        address = os.environ.get("RAY_ADDRESS", "auto") if self.address == "auto" else self.address
        if address != "auto":
            host, _, port = address.rpartition(":")
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
            except (OSError, ValueError) as e:
                raise UsageError(f"{what}: cannot reach the Ray cluster at {address} ({first_line(e)}): start it "
                                 f"(ray start --head --port=6379) or fix --ray HOST:PORT") from None
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, ValueError) as e:
            raise UsageError(f"{what}: cannot connect to the Ray cluster {self.address} ({first_line(e)}): start it "
                             f"(ray start --head) or name it (--ray HOST:PORT)") from None
        self.address = ray.get_runtime_context().gcs_address  # `auto`, resolved
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        most_gpus, most_cpus = max(n.get("GPU", 0) for n in nodes), max(n.get("CPU", 0) for n in nodes)
        device = sweep.config["device"]
        if device.startswith("cuda") and not most_gpus:
            raise UsageError(f"{what}: device = {device!r}, but the Ray cluster has no GPU: use --set device=cpu or "
                             f"device = \"auto\"")
        if self.gpus is None:  # the default: a GPU each where there are GPUs and the trials may use them
            self.gpus = 1.0 if most_gpus and device != "cpu" else 0.0
            if not most_gpus:
                self.note = "; the cluster has no GPU: the workers train on their CPUs"
        if self.gpus > most_gpus:
            raise UsageError(f"{what}: --gpus-per-worker {self.gpus:g}, but no node of the Ray cluster has a GPU: "
                             f"drop it (the workers then train on their CPUs)")
        if self.cpus > most_cpus:
            raise UsageError(f"{what}: --cpus-per-worker {self.cpus:g}, but the largest node of the Ray cluster has "
                             f"{most_cpus:g} CPUs")

    def describe(self, workers: int) -> str:
        return (f"{workers} worker{'s' if workers > 1 else ''} on the Ray cluster {self.address}, each asking for "
                f"{self.gpus:g} GPU and {self.cpus:g} CPU{self.note}")

    def start(self, orders: list[dict]) -> list[RayWorker]:
        """A Ray task per worker, its orders (`launcher.worker_orders`) and threads in its environment."""
        task = run_worker.options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=MAX_RETRIES)
        threads = str(self.threads)
        return [RayWorker(task.remote(o["slot"], {SPEC_ENV: json.dumps(o), "MLFLOW_TRACKING_URI": o["tracking_uri"],
                                                  "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}), o["slot"])
                for o in orders]

    def close(self) -> None:
        ray.shutdown()
