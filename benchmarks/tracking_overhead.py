"""What tracking costs: the same training with and without MLflow, in one process, alternating.

"Without" is the project's `train(cfg)` alone; "with" is `lifecycle.tracked_train(cfg)`: params, tags,
config, per-epoch metrics, system metrics, the heartbeat, checkpoints `last.pt` every epoch and
`best.pt` when test accuracy improved (copied at once, written by a background thread), the
learning-curve PNG, and the best model logged with `mlflow.pytorch.log_model` at the end. The runs go
to a temporary local store (SQLite + files), deleted afterwards unless --keep.

One untimed warm-up of each comes first (imports, the data cache, torch.export's first call); then
--rounds rounds, each running both, in alternating order so drift in the machine's speed hits both
alike. Printed: each timing, the ratio tracked/plain of the summed wall times (the target:
<= 1.03), and where the difference goes: training itself (summed epoch times: the background writer
competes for the same cores on a CPU) and the per-run fixed costs (run set-up, curves, model logging).

--steps times each step of the tracked runs (checks, the record, the run's creation, logging, the
checkpoints, the curves, the model, the end) on the training thread, where it delays the run, or beside it.

--cold N runs the same short training as a user would, `alexnet train` against `alexnet train --no-track`,
each a fresh process, alternating N times: what tracking costs a command that starts cold (importing
MLflow, opening its store, logging the model once), which no warm-up hides.

--breakdown adds two tracked variants to each round, to say where the per-epoch cost goes:
"no-write" copies each checkpoint to the host but neither serializes nor writes it, and
"metrics-only" does not copy it to the host either (the on-device snapshot stays). So tracked minus
no-write is serializing, hashing and writing the files; no-write minus metrics-only is the copy to
the host; metrics-only minus plain is MLflow itself (metrics, heartbeat, system metrics).

  python benchmarks/tracking_overhead.py                                   # CPU-sized (see DEFAULT)
  python benchmarks/tracking_overhead.py --rounds 5 --steps --cold 3      # and where the time goes, and cold commands
  python benchmarks/tracking_overhead.py --baseline --breakdown             # the chapter's baseline, on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a plain checkout, installed or not

# Small enough for 2 CPU cores (about a minute a run), big enough that epochs dominate.
DEFAULT = ["resize=67", "lr=0.05", "epochs=3", "train_limit=2048", "test_limit=500", "batch_size=64"]


def run_plain(cfg):
    from alexnet.training.train import train

    t0 = time.perf_counter()
    records = list(train(cfg, progress=False))
    return time.perf_counter() - t0, records


def run_tracked(cfg, skip=()):
    """`tracked_train(cfg)`; `skip` names checkpoint steps the background writer leaves out this once:
    "write" (serializing, hashing, writing the files) and "host" (the copy to the host)."""
    from alexnet.tracking import checkpoint, lifecycle, run_files

    saved = run_files.publish, checkpoint.to_host
    if "write" in skip:
        run_files.publish = lambda state, name, run_id, artifact_uri: 0
    if "host" in skip:
        checkpoint.to_host = lambda tree, ready=None: tree
    try:
        t0 = time.perf_counter()
        run = lifecycle.tracked_train(cfg, progress=False)
        return time.perf_counter() - t0, run.records
    finally:
        run_files.publish, checkpoint.to_host = saved


# The steps of a tracked run, timed where they run (--steps): (what, module, attribute).
STEPS = [
    ("checks: device, data, store", "alexnet.tracking.lifecycle", "preflight"),
    ("experiment lookup", "alexnet.tracking.store", "experiment_id"),
    ("the record: git, versions, data checksums", "alexnet.tracking.record", "describe"),
    ("run creation", "mlflow.tracking.client", "MlflowClient.create_run"),
    ("tags, params, metrics (log_batch)", "mlflow.tracking.client", "MlflowClient.log_batch"),
    ("config.toml", "mlflow.tracking.client", "MlflowClient.log_text"),
    ("record files, dataset inputs", "alexnet.tracking.record", "log_record"),
    ("heartbeat (start)", "alexnet.tracking.store", "start_heartbeat"),
    ("system metrics (start)", "alexnet.compat", "SystemMetrics.start"),
    ("system metrics (stop)", "alexnet.compat", "SystemMetrics.finish"),
    ("checkpoint snapshot", "alexnet.tracking.checkpoint", "Writer.submit"),
    ("checkpoint write and checksum", "alexnet.tracking.run_files", "publish"),
    ("best.pt from last.pt", "alexnet.tracking.run_files", "keep_last_as_best"),
    ("learning curves", "alexnet.compare.plots", "log_curves"),
    ("the model: build, save, log", "alexnet.tracking.record", "log_model"),
    ("waiting for the checkpoint writer", "alexnet.tracking.checkpoint", "Writer.close"),
    ("the run's disk use", "alexnet.tracking.disk", "measure"),
    ("ending the run", "alexnet.tracking.lifecycle", "end_run"),
]


class StepTimer:
    """Wraps each of STEPS to sum its time per thread: "main" is the training thread (on the run's critical
    path), anything else runs beside training (the checkpoint writer, the heartbeat)."""

    def __init__(self):
        import importlib
        import threading

        self.seconds, self.calls, self.saved = {}, {}, []
        for what, module, attr in STEPS:
            owner = importlib.import_module(module)
            *path, name = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            original = getattr(owner, name)

            def timed(*args, _f=original, _what=what, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _f(*args, **kwargs)
                finally:
                    where = "main" if threading.current_thread() is threading.main_thread() else "beside"
                    key = (_what, where)
                    self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
                    self.calls[_what] = self.calls.get(_what, 0) + 1

            self.saved.append((owner, name, original))
            setattr(owner, name, timed)

    def restore(self):
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)


COLD = ["epochs=1", "train_limit=256"]  # the cold commands' training: short, so the fixed costs show


def run_cold(sets: list[str], tracked: bool) -> float:
    """`alexnet train` in a fresh process, as a user starts it; its wall time."""
    import subprocess

    command = [sys.executable, "-m", "alexnet", "train", "experiments/baseline.toml", "--quiet",
               *[f"--set={s}" for s in sets], *([] if tracked else ["--no-track"])]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"tracking_overhead: {' '.join(command[2:])} failed: {done.stderr.strip()[-1000:]}")
    return time.perf_counter() - t0


MLFLOW_IMPORTS = "import mlflow, mlflow.store.tracking.sqlalchemy_store"  # what any tracked command loads


def time_mlflow_imports() -> float:
    """A fresh interpreter that only imports MLflow and its SQL store: the floor under a cold command's cost."""
    import subprocess

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", MLFLOW_IMPORTS], check=True, capture_output=True)
    return time.perf_counter() - t0


KINDS = {"plain": run_plain, "tracked": run_tracked,
         "no-write": lambda cfg: run_tracked(cfg, skip=("write",)),
         "metrics-only": lambda cfg: run_tracked(cfg, skip=("write", "host"))}


def per_epoch_after_first(rows: list[dict], kind: str) -> float:
    """A kind's mean epoch time over its epochs after the first, in every round."""
    later = [t for r in rows if r["kind"] == kind for t in r["each_epoch"][1:]]
    return sum(later) / max(1, len(later))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config field (defaults here: {' '.join(DEFAULT)})")
    parser.add_argument("--baseline", action="store_true",
                        help="the chapter's baseline (the config's defaults: resize 224, all data, 10 epochs) instead")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, each running both (default: 2)")
    parser.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                        help="one untimed 1-epoch run of each first (default: on; off only for smoke tests)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also run the tracked variants no-write and metrics-only (see above)")
    parser.add_argument("--steps", action="store_true",
                        help="also time each step of the tracked runs, on the training thread or beside it")
    parser.add_argument("--cold", type=int, default=0, metavar="N",
                        help="also time N alternating pairs of `alexnet train` and `alexnet train --no-track` in fresh "
                             f"processes ({' '.join(COLD)}; see above)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary MLflow store and print its path")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)

    started = datetime.now(timezone.utc)
    home = Path(tempfile.mkdtemp(prefix="alexnet-tracking-bench-"))
    os.environ["ALEXNET_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the local store: SQLite + artifact files

    from alexnet import UsageError
    from alexnet.training.config import load_config
    from alexnet.home import tracking_uri
    from alexnet.training.train import resolve_device

    base = [] if args.baseline else DEFAULT
    try:
        cfg = load_config(None, base + args.sets)
    except UsageError as e:
        print(f"tracking_overhead: error: {e}", file=sys.stderr)
        return 2
    device = resolve_device(cfg)
    print(f"device {device}; resize {cfg.resize}, {cfg.train_limit or 60000} training images, "
          f"{cfg.test_limit or 10000} test images, batch {cfg.batch_size}, {cfg.epochs} epochs; "
          f"{args.rounds} rounds; store {tracking_uri()}", flush=True)
    try:
        if args.warm_up:
            warm = load_config(None, base + args.sets + ["epochs=1"])
            t_plain, _ = run_plain(warm)
            t_tracked, _ = run_tracked(warm)
            print(f"warm-up (1 epoch, untimed): plain {t_plain:.1f} s, tracked {t_tracked:.1f} s", flush=True)

        kinds = list(KINDS) if args.breakdown else ["plain", "tracked"]
        rows, steps, calls = [], {}, {}
        for i in range(args.rounds):
            for kind in kinds if i % 2 == 0 else kinds[::-1]:
                timer = StepTimer() if args.steps and kind == "tracked" else None
                try:
                    seconds, records = KINDS[kind](cfg)
                finally:
                    if timer is not None:
                        timer.restore()
                        for key, t in timer.seconds.items():
                            steps[key] = steps.get(key, 0.0) + t / args.rounds
                        for what, n in timer.calls.items():
                            calls[what] = calls.get(what, 0) + n / args.rounds
                epochs = sum(r.epoch_seconds for r in records)
                rows.append({"round": i + 1, "kind": kind, "seconds": seconds, "epoch_seconds": epochs,
                             "test_acc": records[-1].test_acc, "each_epoch": [r.epoch_seconds for r in records]})
                print(f"round {i + 1} {kind:>12}: {seconds:7.2f} s wall, {epochs:7.2f} s in epochs, "
                      f"test acc {records[-1].test_acc:.3f}", flush=True)

        total = {k: sum(r["seconds"] for r in rows if r["kind"] == k) for k in kinds}
        in_epochs = {k: sum(r["epoch_seconds"] for r in rows if r["kind"] == k) for k in kinds}
        outside = {k: total[k] - in_epochs[k] for k in total}
        ratio = total["tracked"] / total["plain"]
        per_run = (outside["tracked"] - outside["plain"]) / args.rounds
        ckpt = sum(f.stat().st_size for f in home.glob("mlruns/artifacts/*/artifacts/checkpoints/last.pt")) \
            / max(1, len(list(home.glob("mlruns/artifacts/*/artifacts/checkpoints/last.pt"))))
        print(f"\ntracked / plain wall time: {ratio:.3f} ({(ratio - 1) * 100:+.1f}%; target <= +3%)")
        print(f"  training itself (sum of epoch times): {in_epochs['tracked'] / in_epochs['plain']:.3f}x "
              f"(target <= 1.01x; background checkpoint writes of {ckpt / 1e6:.0f} MB share the machine)")
        print(f"  outside the epochs, per run: +{per_run:.2f} s (target <= +1 s; run set-up, metrics, curves PNG, "
              f"model logging)")
        if cfg.epochs > 1:
            print(f"  the epochs after the first (each carries the previous epoch's checkpoint write): "
                  f"{per_epoch_after_first(rows, 'tracked') / per_epoch_after_first(rows, 'plain'):.3f}x")
        # An epoch's checkpoint is written while the next epoch trains: the epochs after the first carry it.
        later = {k: sum(sum(r["each_epoch"][1:]) for r in rows if r["kind"] == k) for k in kinds}
        per_epoch = {k: later[k] / max(1, args.rounds * (cfg.epochs - 1)) for k in kinds}
        if args.breakdown and cfg.epochs > 1:
            print("  per epoch after the first, where the cost goes:")
            for what, a, b in (("serializing, hashing, writing the files", "tracked", "no-write"),
                               ("copying the checkpoint to the host", "no-write", "metrics-only"),
                               ("MLflow (metrics, heartbeat, system metrics)", "metrics-only", "plain")):
                print(f"    {what:<44} ({a} - {b}): {per_epoch[a] - per_epoch[b]:+.3f} s "
                      f"({(per_epoch[a] - per_epoch[b]) / per_epoch['plain'] * 100:+.1f}%)")
        if steps:
            print("  the tracked run's steps, per run (main: on the training thread, its critical path; beside: "
                  "in another thread while training goes on):")
            for what, _, _ in STEPS:
                for where in ("main", "beside"):
                    if (what, where) in steps:
                        print(f"    {what:<44} {where:<7}{steps[what, where]:7.3f} s")
            # A full copy of the weights is serialized for last.pt each epoch and for the model once a run;
            # best.pt is a hard link to the last.pt of the epoch that improved.
            copies = calls.get("checkpoint write and checksum", 0) / cfg.epochs
            print(f"  weight copies written per epoch: {copies:.2f} (last.pt); best.pt linked to it "
                  f"{calls.get('best.pt from last.pt', 0):.0f} times a run, never copied; the model "
                  f"{calls.get('the model: build, save, log', 0):.0f} time a run")
        cold = {}
        if args.cold:
            sets = base + args.sets + COLD
            pairs = []
            for i in range(args.cold):
                order = (True, False) if i % 2 == 0 else (False, True)
                timed = {tracked: run_cold(sets, tracked) for tracked in order}
                pairs.append({"tracked": timed[True], "untracked": timed[False], "mlflow_imports": time_mlflow_imports()})
                print(f"cold {i + 1}: alexnet train {timed[True]:.2f} s, --no-track {timed[False]:.2f} s; "
                      f"`python -c '{MLFLOW_IMPORTS}'` {pairs[-1]['mlflow_imports']:.2f} s", flush=True)
            tracked_s, untracked_s, imports_s = (sum(p[k] for p in pairs) / len(pairs)
                                                 for k in ("tracked", "untracked", "mlflow_imports"))
            cold = {"settings": sets, "pairs": pairs, "tracked_seconds": tracked_s, "untracked_seconds": untracked_s,
                    "difference_seconds": tracked_s - untracked_s, "mlflow_import_seconds": imports_s}
            print(f"  a cold command ({' '.join(COLD)}): alexnet train {tracked_s:.2f} s against --no-track "
                  f"{untracked_s:.2f} s: {tracked_s - untracked_s:+.2f} s a command (target <= +1 s), of which "
                  f"{imports_s:.2f} s is a fresh interpreter importing MLflow and its SQL store, nothing else; "
                  f"{tracked_s - untracked_s - imports_s:+.2f} s beyond that")
        if args.json:
            import platform

            import mlflow

            from benchmarks.throughput import environment  # the same machine description as its records

            env = environment(device)
            env["versions"]["mlflow"] = mlflow.__version__
            record = {"timestamp": started.isoformat(timespec="seconds"), "host": platform.node(),
                      "command": " ".join(sys.argv), **env, "config": asdict(cfg),
                      "rounds": rows, "ratio": ratio, "epoch_ratio": in_epochs["tracked"] / in_epochs["plain"],
                      "later_epoch_seconds": per_epoch,
                      "fixed_seconds_per_run": per_run, "checkpoint_bytes": ckpt, "cold": cold,
                      "steps": [{"step": w, "thread": t, "seconds": v, "calls_per_run": calls.get(w, 0)}
                                for (w, t), v in steps.items()]}
            Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    finally:
        if args.keep:
            print(f"store kept: {home}/mlruns")
        else:
            shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
