"""What a sweep costs beyond its training: N tiny trials through `alexnet sweep` (one worker), then the same
N trainings plain (`train(cfg)` in one warm process, no tracking), in one process tree. Printed: per trial,
the sweep's cycle (from a trial's start to the next one's: tracking, the model, retention, the study's
bookkeeping included) against the plain training, and their mean over the trials between the first (which
pays the worker's imports) and the last; the sweep's start (the command's launch to its first
trial's run, against a tracked `alexnet train` of the same config from its launch to its run; a plain
process's start-up, imports and data, is printed beside) and its end (the last trial's completion to the
command's exit: retention, the summary, the plots, the leaderboard).

  python benchmarks/sweep_overhead.py                      # 5 trials: resize 67, 1,024 images, 2 epochs
  python benchmarks/sweep_overhead.py --trials 2 --set train_limit=128 --set epochs=1 --json /tmp/x.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a plain checkout, installed or not

from benchmarks.leaderboard import cpu_name  # noqa: E402

DEFAULT = ["resize=67", "epochs=2", "train_limit=1024", "val_size=500", "test_limit=500", "batch_size=64",
           "eval_batch_size=500"]
TARGET_TRIAL_S, TARGET_START_S, TARGET_END_S = 1.0, 2.0, 2.0

# The plain side: one process, as warm as a sweep worker, timing its own start-up and each training.
PLAIN = """
import json, sys, time
t0 = time.perf_counter()
from alexnet.training import data
from alexnet.training.config import Config
from alexnet.training.train import train
configs = [Config(**c) for c in json.loads(sys.argv[1])]
data.prepare(configs[0].data_dir)
ready = time.perf_counter() - t0
walls = []
for cfg in configs:
    t = time.perf_counter()
    records = list(train(cfg, progress=False))
    walls.append([time.perf_counter() - t, sum(r.epoch_seconds for r in records)])
print(json.dumps({"startup_seconds": ready, "trainings": walls}))
"""


def sweep_file(folder: Path, trials: int, sets: list[str]) -> Path:
    lines = ['study = "overhead"', f"n_trials = {trials}", 'pruner = "none"', "enqueue_base = false",
             "keep_top = 1", "", "[set]"]
    for item in sets:
        key, _, value = item.partition("=")
        lines.append(f"{key} = {value}")
    lines += ["", "[space]", "lr = { low = 0.02, high = 0.08, log = true }", "dropout = { low = 0.2, high = 0.6 }"]
    path = folder / "overhead.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="trials (and plain trainings), default 5")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config field of every trial (defaults here: {' '.join(DEFAULT)})")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.trials < 1:
        print("sweep_overhead: --trials must be >= 1", file=sys.stderr)
        return 2
    sets = list({item.partition("=")[0]: item for item in DEFAULT + args.sets}.values())
    started = datetime.now(timezone.utc)
    home = Path(tempfile.mkdtemp(prefix="alexnet-sweep-bench-"))
    env = {**os.environ, "ALEXNET_HOME": str(home), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # reading the trials' configs back
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("ALEXNET_STORAGE", None)
    try:
        path = sweep_file(home, args.trials, sets)
        launched = time.time()
        result = subprocess.run([sys.executable, "-m", "alexnet", "sweep", str(path), "--quiet"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=3600)
        exited = time.time()
        if result.returncode != 0:
            print(f"sweep_overhead: the sweep failed: {result.stderr.strip()[-1000:]}", file=sys.stderr)
            return 1

        import mlflow
        import optuna

        study = optuna.load_study(study_name="overhead", storage=f"sqlite:///{home / 'mlruns' / 'optuna.db'}")
        trials = sorted(study.trials, key=lambda t: t.datetime_start)
        client = mlflow.MlflowClient(f"sqlite:///{home / 'mlruns' / 'mlflow.db'}")
        configs, inside = [], []
        for t in trials:
            run = client.get_run(t.user_attrs["mlflow_run_id"])
            configs.append(tomllib.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.toml")))
            inside.append(sum(m.value for m in client.get_metric_history(run.info.run_id, "perf/epoch_seconds")))
        plain = subprocess.run([sys.executable, "-c", PLAIN, json.dumps(configs)], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=3600)
        if plain.returncode != 0:
            print(f"sweep_overhead: the plain trainings failed: {plain.stderr.strip()[-1000:]}", file=sys.stderr)
            return 1
        reference = json.loads(plain.stdout.strip().splitlines()[-1])

        # A tracked `alexnet train` of the first trial's config: from its launch to its MLflow run.
        first = home / "first.toml"
        first.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in configs[0].items()
                                 if k not in ("run_name", "experiment")) + 'run_name = "tracked-reference"\n')
        tracked_launch = time.time()
        tracked = subprocess.run([sys.executable, "-m", "alexnet", "train", str(first), "--quiet"], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=3600)
        if tracked.returncode != 0:
            print(f"sweep_overhead: the tracked training failed: {tracked.stderr.strip()[-1000:]}", file=sys.stderr)
            return 1
        [ref_run] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                       "attributes.run_name = 'tracked-reference'")
        tracked_start = ref_run.info.start_time / 1000 - tracked_launch

        starts = [t.datetime_start.timestamp() for t in trials]
        ends = [t.datetime_complete.timestamp() for t in trials]
        cycles = [b - a for a, b in zip(starts, starts[1:])] + [ends[-1] - starts[-1]]
        rows = []
        print(f"{'trial':>5} {'sweep cycle':>12} {'plain':>8} {'difference':>11} {'epochs in sweep':>16} {'plain':>8}")
        for i, (cycle, (wall, epochs), inner) in enumerate(zip(cycles, reference["trainings"], inside)):
            rows.append({"trial": trials[i].number, "sweep_cycle_seconds": cycle, "plain_seconds": wall,
                         "difference_seconds": cycle - wall, "sweep_epoch_seconds": inner, "plain_epoch_seconds": epochs})
            print(f"{trials[i].number:>5} {cycle:>11.2f}s {wall:>7.2f}s {cycle - wall:>+10.2f}s {inner:>15.2f}s {epochs:>7.2f}s")
        # The per-trial figure: the worker's later trials (its first pays its imports), whose cycle runs on to
        # the next trial's start, so it holds the retention and bookkeeping after the trial (the last one's ends
        # at its completion: those go to the sweep's end).
        warm = rows[1:-1] or rows[1:] or rows
        per_trial = sum(r["difference_seconds"] for r in warm) / len(warm)
        first_run = client.get_run(trials[0].user_attrs["mlflow_run_id"])
        to_first_run = first_run.info.start_time / 1000 - launched
        start = to_first_run - tracked_start
        end = exited - ends[-1]
        print(f"\nper trial in a warm worker: {per_trial:+.2f} s beyond the plain training (target <= {TARGET_TRIAL_S:g} s)")
        print(f"the sweep's start: {to_first_run:.2f} s from its launch to its first trial's run, against "
              f"{tracked_start:.2f} s for a tracked `alexnet train`: {start:+.2f} s (target <= {TARGET_START_S:g} s); "
              f"a plain process's start-up (torch, the data) takes {reference['startup_seconds']:.2f} s: "
              f"{to_first_run - reference['startup_seconds']:+.2f} s beyond it")
        print(f"the sweep's end: {end:.2f} s after its last trial (target <= {TARGET_END_S:g} s); "
              f"machine: {cpu_name()}, {os.cpu_count()} CPUs")
        if args.json:
            record = {"kind": "sweep_overhead", "timestamp": started.isoformat(timespec="seconds"),
                      "host": platform.node(), "command": " ".join(sys.argv), "cpus": os.cpu_count(),
                      "machine": {"cpu": cpu_name(), "cpus": os.cpu_count()},
                      "versions": {"python": platform.python_version(),
                                   **{p: metadata.version(p) for p in ("torch", "mlflow", "optuna")}},
                      "settings": sets, "trials": rows, "per_trial_seconds": per_trial,
                      "plain_startup_seconds": reference["startup_seconds"], "start_seconds": start,
                      "sweep_to_first_run_seconds": to_first_run, "tracked_to_run_seconds": tracked_start,
                      "end_seconds": end, "targets": {"per_trial": TARGET_TRIAL_S, "start": TARGET_START_S,
                                                      "end": TARGET_END_S}}
            Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
