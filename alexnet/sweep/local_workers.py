"""A sweep's workers as processes of this machine, started the moment the sweep file is read: each
imports torch, MLflow and Optuna (about 3 s) while the launcher checks the device, the data and the stores
and sets the study up, then waits for its orders on stdin (`worker.main`). A launcher that refuses its
input stops them before they have touched anything. Torch- and MLflow-free: `alexnet sweep`
starts them before importing its own heavy modules.

Each worker has its own session: a terminal's Ctrl-C reaches the launcher only, which passes exactly one
SIGINT on (a second one would interrupt a worker while it ends its trial cleanly). Its share of the CPU
threads and, with several GPUs, its own GPU are set in its environment before torch starts in it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pynvml


def gpu_count() -> int:
    """GPUs NVML sees (0 where there is no NVIDIA driver): the launcher never imports torch."""
    try:
        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return 0


def visible_gpus() -> list[str]:
    """The GPUs workers may be pinned to: CUDA_VISIBLE_DEVICES if set, else every GPU NVML sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    return [str(i) for i in range(gpu_count())]


def threads_each(workers: int) -> int:
    """A worker's share of this machine's cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // workers)


def machine_env(index: int, workers: int, device: str, gpus: list[str] | None = None) -> dict[str, str]:
    """What worker `index` needs in its environment before torch starts: its CPU threads, its GPU (of
    `gpus`, default `visible_gpus()`)."""
    threads = threads_each(workers)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    gpus = visible_gpus() if gpus is None else gpus
    if len(gpus) > 1 and device in ("auto", "cuda"):
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]  # round robin, one GPU per worker
    return env


def start(workers: int, device: str) -> list[subprocess.Popen]:
    """`workers` worker processes, waiting for their orders."""
    gpus = visible_gpus()  # NVML asked once, not once per worker
    return [subprocess.Popen([sys.executable, "-m", "alexnet.sweep.worker"], stdin=subprocess.PIPE, text=True,
                             start_new_session=True, env={**os.environ, **machine_env(i, workers, device, gpus)})
            for i in range(workers)]


def send(procs: list[subprocess.Popen], orders: list[dict]) -> None:
    """Each waiting worker its orders (one JSON line); it starts on them."""
    for proc, order in zip(procs, orders):
        try:
            proc.stdin.write(json.dumps(order) + "\n")
            proc.stdin.close()
        except BrokenPipeError:  # it died waiting: `watch` reports its exit status
            pass


def dismiss(procs: list[subprocess.Popen]) -> None:
    """Send the waiting workers away (the launcher refused its input). They have touched nothing yet, and
    most are still importing: they are stopped at once rather than waited for."""
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()
        proc.stdin.close()
