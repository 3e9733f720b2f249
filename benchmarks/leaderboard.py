"""How long `alexnet runs` takes over a big store: N runs shaped like the project's (every config field as
a param, the run tags, 7 metrics per epoch with their history and 3 more in the runs that hold a validation
split out, system metrics; plain runs, sweep parents, trials and confirm runs), in a temporary local store; then the leaderboard as a user starts it, in a fresh
process each time, timed end to end and split into its import and its query.

  python benchmarks/leaderboard.py                 # 1,000 runs, 5 timed runs of `alexnet runs`
  python benchmarks/leaderboard.py --runs 30 --repeat 1 --json /tmp/x.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a plain checkout, installed or not

EPOCHS = 10
METRICS = ["train/loss", "train/acc", "test/acc", "test/best_acc", "perf/examples_per_sec",
           "perf/wall_examples_per_sec", "perf/epoch_seconds"]
VAL_METRICS = ["val/acc", "val/best_acc", "test/acc_at_best_val"]  # runs with a validation split
SYSTEM = ["system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
          "system/system_memory_usage_percentage", "system/disk_usage_percentage", "system/disk_usage_megabytes",
          "system/disk_available_megabytes", "system/network_receive_megabytes", "system/network_transmit_megabytes"]
TARGET_SECONDS = 2.0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def build(n: int, seed: int = 0) -> dict:
    """N runs in the store the environment points at, shaped like the project's own."""
    import mlflow
    from mlflow.entities import Metric, Param

    from alexnet.tracking import store
    from alexnet.training.config import Config

    store.set_up_store()
    client = mlflow.MlflowClient()
    exp = store.experiment_id(store.DEFAULT_EXPERIMENT)
    rng = random.Random(seed)
    counts = {"run": 0, "parent": 0, "trial": 0, "confirm": 0}
    parents, now = [], int(time.time() * 1000)
    for i in range(n):
        role = "parent" if i % 100 == 0 else "confirm" if i % 10 == 5 else "run" if i % 10 == 7 else "trial"
        if role != "parent" and not parents:
            role = "run"
        counts[role] += 1
        held_out = role in ("trial", "confirm")  # a sweep's runs hold a validation split out
        cfg = Config(lr=10 ** rng.uniform(-3, -1), dropout=rng.uniform(0, 0.8), resize=rng.choice([67, 96, 128, 224]),
                     epochs=EPOCHS, run_name=f"bench-{role}-{i}", val_size=5000 if held_out else 0)
        tags = {"experiment_file": "sweeps/default.toml", "command": "alexnet sweep sweeps/default.toml", "device": "cuda",
                "gpu": "NVIDIA H200", "precision": "bf16", "version.python": "3.11.7", "version.torch": "2.14.1",
                "version.torchvision": "0.29.1", "version.mlflow": "3.17.2", "version.optuna": "5.0.0",
                "git.commit": "0" * 40, "git.dirty": "false", "host": "gpu-node-1", "pid": "1234",
                "process_start": "1795900000.000", "heartbeat": str(now // 1000), "mlflow.user": "root",
                "mlflow.source.name": "alexnet", "mlflow.source.type": "LOCAL"}
        if role == "parent":
            tags.update({"sweep.study": f"study-{i // 100}", "sweep.role": "parent"})
        elif role in ("trial", "confirm"):
            tags.update({"sweep.study": f"study-{(i // 100)}", "sweep.role": role, "sweep.trial": str(i % 100),
                         "mlflow.parentRunId": parents[-1]})
        run = client.create_run(exp, run_name=cfg.run_name, start_time=now - 600_000, tags=tags)
        run_id = run.info.run_id
        if role == "parent":
            parents.append(run_id)
        metrics, best, best_val, at_best_val = [], 0.0, 0.0, 0.0
        for epoch in range(1, EPOCHS + 1):
            acc = min(0.95, 0.1 + 0.08 * epoch * rng.uniform(0.8, 1.1))
            best = max(best, acc)
            values = [2.3 / epoch, acc, acc, best, rng.uniform(2e4, 3e4), rng.uniform(1.8e4, 2.5e4), rng.uniform(2, 3)]
            stamp = now - 600_000 + epoch * 1000
            metrics += [Metric(k, v, stamp, epoch) for k, v in zip(METRICS, values)]
            if held_out:
                val = acc * rng.uniform(0.97, 1.03)
                if val > best_val:
                    best_val, at_best_val = val, acc
                metrics += [Metric(k, v, stamp, epoch) for k, v in zip(VAL_METRICS, (val, best_val, at_best_val))]
        metrics += [Metric(k, rng.uniform(0, 100), now, 0) for k in SYSTEM]
        client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in asdict(cfg).items()],
                         synchronous=True)
        client.set_terminated(run_id, "FINISHED", end_time=now)
    return counts


def time_leaderboard(home: Path, repeat: int, args: list[str]) -> list[dict]:
    """`alexnet runs ARGS` in a fresh process each time: its wall time, and inside it, the import of the
    command's modules and the query itself."""
    probe = ("import sys, time; t0 = time.perf_counter()\n"
             "from alexnet import cli\nfrom alexnet.compare import runs\nfrom alexnet.tracking import store\n"
             "t1 = time.perf_counter(); store.set_up_store(open_store=False); board = runs.leaderboard()\n"
             "t2 = time.perf_counter(); print(len(board), t1 - t0, t2 - t1)\n")
    env = {**os.environ, "ALEXNET_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    rows = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "alexnet", "runs", *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            raise SystemExit(f"leaderboard: alexnet runs failed: {out.stderr.strip()[-500:]}")
        parts = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=600).stdout.split()
        rows.append({"wall_seconds": wall, "lines": len(out.stdout.splitlines()), "runs": int(parts[0]),
                     "import_seconds": float(parts[1]), "query_seconds": float(parts[2])})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs in the store (default: 1000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of `alexnet runs` (default: 5)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.repeat < 1:
        print("leaderboard: --runs and --repeat must be >= 1", file=sys.stderr)
        return 2
    started = datetime.now(timezone.utc)
    home = Path(tempfile.mkdtemp(prefix="alexnet-leaderboard-bench-"))
    saved = {k: os.environ.get(k) for k in ("ALEXNET_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["ALEXNET_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        t0 = time.perf_counter()
        counts = build(args.runs)
        print(f"store: {args.runs} runs ({', '.join(f'{n} {k}' for k, n in counts.items())}), "
              f"built in {time.perf_counter() - t0:.1f} s", flush=True)
        rows = time_leaderboard(home, args.repeat, [])
        for i, r in enumerate(rows, 1):
            print(f"alexnet runs #{i}: {r['wall_seconds']:.2f} s wall ({r['lines'] - 1} rows); in a probe: "
                  f"import {r['import_seconds']:.2f} s, store + query {r['query_seconds']:.2f} s", flush=True)
        median = statistics.median(r["wall_seconds"] for r in rows)
        print(f"\nalexnet runs over {args.runs} runs: median {median:.2f} s wall (target < {TARGET_SECONDS:g} s: "
              f"{'met' if median < TARGET_SECONDS else 'not met'}); machine: {cpu_name()}, {os.cpu_count()} CPUs")
        if args.json:
            import mlflow

            record = {"kind": "leaderboard", "timestamp": started.isoformat(timespec="seconds"),
                      "host": platform.node(), "command": " ".join(sys.argv),
                      "machine": {"cpu": cpu_name(), "cpus": os.cpu_count()},
                      "versions": {"python": platform.python_version(), "mlflow": mlflow.__version__},
                      "runs": args.runs, "roles": counts, "timings": rows, "median_wall_seconds": median,
                      "target_seconds": TARGET_SECONDS}
            Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
