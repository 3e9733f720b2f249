"""`alexnet sweep FILE --dry-run`: the plan in words, then the same sweep on a tiny budget in a temporary
store (deleted afterwards), saying what each part did: storage, nesting, pruning, checkpoints and
retention, plots."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

from alexnet.training.config import MIN_RESIZE
from alexnet.home import default_storage, tracking_uri, where
from alexnet.redact import redact
from alexnet.sweep.launcher import run_sweep
from alexnet.sweep.ledger import trial_runs
from alexnet.sweep.spec import COSTS, Sweep, base_params, describe_space, format_params


def dry_run_sweep(sweep: Sweep, workers: int) -> Sweep:
    """The same sweep on a tiny budget: resize 67, 256 training, 200 test (and up to 200 validation)
    images, 2 epochs, 3 trials, a pruner that may prune after epoch 1, top-1 retention, a 1 s heartbeat."""
    space = {k: v for k, v in sweep.space.items() if k != "resize"}
    if not space:
        space = {"lr": {"low": sweep.config["lr"] / 2, "high": sweep.config["lr"] * 2, "log": True, "step": None}}
    config = {**sweep.config, "resize": MIN_RESIZE, "train_limit": 256, "test_limit": 200, "epochs": 2,
              "batch_size": 64, "val_size": min(sweep.config["val_size"], 200)}
    return dataclasses.replace(sweep, space=space, config=config, n_trials=min(sweep.n_trials or 3, 3),
                               timeout_minutes=0.0, pruner_startup_trials=1, pruner_warmup_epochs=0, keep_top=1,
                               heartbeat_seconds=1, grace_seconds=5, storage=default_storage())


def dry_run(sweep: Sweep, workers: int, quiet: bool = False) -> int:
    """Print the plan, then run it tiny in a temporary store (deleted afterwards) and report what
    each part did: storage, nesting, pruning, checkpoints and retention, plots."""
    print(plan_text(sweep, workers))
    saved = {k: os.environ.get(k) for k in ("ALEXNET_HOME", "MLFLOW_TRACKING_URI", "ALEXNET_STORAGE")}
    home = tempfile.mkdtemp(prefix="alexnet-dry-run-")
    os.environ["ALEXNET_HOME"] = home
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the team's servers too: a dry run touches no real store
    os.environ.pop("ALEXNET_STORAGE", None)
    try:
        tiny = dry_run_sweep(sweep, workers)
        print(f"dry run: {tiny.n_trials} tiny trials (resize {MIN_RESIZE}, 256 training / 200 test images, "
              f"2 epochs) with {min(workers, 2)} worker(s) in {home} (deleted afterwards)")
        result = run_sweep(tiny, min(workers, 2), quiet=quiet)
        runs = trial_runs(tiny.study, experiment=tiny.config["experiment"])
        kept = [r for r in runs if r.data.tags.get("checkpoints") != "deleted"]
        states = ", ".join(f"trial {r.data.tags['sweep.trial']} {r.info.status}"
                           for r in sorted(runs, key=lambda r: int(r.data.tags["sweep.trial"])))
        print(f"dry run: study and parent run created; {len(runs)} child runs ({states}); "
              f"{result['counts']['PRUNED']} pruned; checkpoints kept for {len(kept)} "
              f"(keep_top {tiny.keep_top}); plots: {', '.join(result['plots']) or 'none'}")
        print("dry run: OK" if result["status"] == 0 else "dry run: FAILED (see above)")
        return result["status"]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(home, ignore_errors=True)


def plan_text(sweep: Sweep, workers: int) -> str:
    c = sweep.config
    budget = " and ".join(x for x in [f"{sweep.n_trials} trials" if sweep.n_trials else "",
                                      f"{sweep.timeout_minutes:g} minutes" if sweep.timeout_minutes else ""] if x)
    return "\n".join([
        f"would run study {sweep.study!r}: {budget}, {sweep.direction} {sweep.objective}"
        + (f" and minimize {COSTS[sweep.cost]} (a Pareto front)" if sweep.cost else "")
        + (f", epochs of at most {sweep.max_epoch_seconds:g} s" if sweep.max_epoch_seconds else "")
        + f", {sweep.sampler} sampler "
        f"(seed {sweep.seed}), {sweep.pruner} pruner, {workers} worker{'s' if workers > 1 else ''}",
        f"  space: {describe_space(sweep.space)}",
        f"  each trial: {c['epochs']} epochs, batch {c['batch_size']}, "
        + ("" if "resize" in sweep.space else f"resize {c['resize']}, ") +
        f"{c['train_limit'] or 60000 - c['val_size']} training / {c['val_size']} validation / "
        f"{c['test_limit'] or 10000} test images"
        + (f", first trial the base's own values ({format_params(base_params(sweep))})" if sweep.enqueue_base else ""),
        f"  storage {redact(where(sweep.storage))}; MLflow {redact(where(tracking_uri()))}, "
        f"experiment {c['experiment']!r}; keep checkpoints of the top {sweep.keep_top} trials"])
