"""MLflow around `train`: one run per training, with everything it learns.

A run records every config field as a param; tags for where it came from and what it ran on, the
code's uncommitted changes, the installed versions and the data as MLflow dataset inputs
(`alexnet/tracking/record.py`: what `alexnet reproduce` re-creates it from); the resolved config as
`config.toml`; per epoch, with `step=epoch`, the namespaced metrics of `EpochRecord.metrics()`; system
metrics (CPU, memory, GPU where `nvidia-ml-py` finds one); the last and the best training state as
`checkpoints/last.pt` and `checkpoints/best.pt` (`alexnet/tracking/run_files.py` and `checkpoint.py`: atomic,
checksummed, written in the background; the best epoch is validation's choice where there is a validation split);
`learning_curves.png`; and at the end the best epoch's model as an MLflow PyTorch model.

The run's life is in this one file. `tracked_train` first checks what can be checked before a run exists
(the device, the data, the store, the experiment: bad input leaves the store as it was), then starts the
run inside the protection that ends it: every way out (finished, Ctrl-C, `StopRun` from a callback such as
the sweep's pruner, a diverged loss, any error, an error while starting) goes through `end_run`, which
stops the run's helper threads and ends it with the one status `end_status` gives: FINISHED, KILLED or
FAILED (with the reason in tags). Only MLflow's client API is used, never its "active run": a failure
cannot leave a run active for the next one in the same process (a sweep worker runs many).

A run killed at any moment continues in the same MLflow run from its last checkpoint with
`tracked_train(cfg, resume_run_id=...)` (`alexnet train --resume RUN_ID`).

One trial's path, each step calling the next and nothing calling back up:
    tracked_train -> preflight (device, data, store) -> create the run, log params/config/record
      -> run_files.writer -> checkpoint.Writer (its thread; publishes through run_files.RunCheckpoints)
      -> for each EpochRecord that train() yields: writer.submit(state, then=log the epoch's metrics)
      -> record.log_model(best state) -> writer.close() -> end_run: set_terminated,
         disk.drop_spare_best, disk.measure
One resume: resume_config (the run's status, checkpoint and config.toml)
      -> run_files.fetch("last"), run_files.fetch_best -> checkpoint.load (checksum checked)
      -> the same path as above, `train(cfg, start=last)` going on from its epoch.
"""

from __future__ import annotations

import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from alexnet import UsageError, compat
from alexnet.tracking import disk, record, run_files, store
from alexnet.training import data
from alexnet.compare import plots
from alexnet.training.config import Config, to_toml
from alexnet.home import tracking_uri, where
from alexnet.redact import first_line, redact, redact_tags
from alexnet.tracking.store import CHECKPOINTS
from alexnet.training.train import Diverged, check_device, train
from alexnet.tracking.views import NOTE  # the run's description in MLflow's UI (markdown)


class StopRun(Exception):
    """Raised by an `on_epoch` callback to end the run early with a given MLflow status, tags and a line
    for the run's description (the sweep's pruning: status KILLED, "Pruned at epoch 1 of 2 ...").
    `tracked_train` ends the run, then re-raises it."""

    def __init__(self, status: str, tags: dict[str, str] | None = None, note: str = ""):
        super().__init__(status)
        self.status, self.tags, self.note = status, dict(tags or {}), note


@dataclass
class TrackedRun:
    run_id: str
    records: list = field(default_factory=list)  # this call's epochs (after a resume: the new ones)


def end_status(error: BaseException | None) -> tuple[str, dict[str, str]]:
    """How a run ends, from how the code left it: (MLflow status, tags saying why). The one place
    that decides it."""
    if error is None:
        return "FINISHED", {}
    if isinstance(error, StopRun):
        return error.status, error.tags
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C, or SIGTERM turned into one
        return "KILLED", {"killed_reason": "interrupted"}
    if isinstance(error, Diverged):
        return "FAILED", {"failure_reason": "diverged", "failure": str(error), "diverged_epoch": str(error.epoch)}
    return "FAILED", {"failure_reason": type(error).__name__, "failure": redact(str(error))[:5000]}


@dataclass
class Helpers:
    """The threads a run starts; `stop` ends them (the writer first: it still logs metrics) and returns
    what failed to stop, as tags."""
    writer: object | None = None  # checkpoint.Writer, from run_files.writer
    system_metrics: object | None = None  # compat.SystemMetrics
    heartbeat: Callable[[], None] | None = None

    def stop(self) -> dict[str, str]:
        problems = {}
        for name, halt in (("checkpoint_error", self.writer and self.writer.close),
                           ("system_metrics_error", self.system_metrics and self.system_metrics.finish),
                           ("heartbeat_error", self.heartbeat)):
            if halt:
                try:
                    halt()
                except BaseException as e:  # noted on the run; the error that ended it stays the one raised
                    problems[name] = first_line(e, 500)
        self.writer = self.system_metrics = self.heartbeat = None
        return problems


def end_run(run_id: str | None, error: BaseException | None, helpers: Helpers, records: list, note: str) -> None:
    """Stop the run's helpers, keep what can be kept, and end the run with `end_status(error)`, its
    description (`note`) completed with how it ended. A pruned or diverged run still gets its learning
    curves; an interrupted one ends at once. A FINISHED run then drops a `best.pt` its logged model
    duplicates, and every run records the bytes it holds (`disk_bytes`)."""
    problems = helpers.stop()
    if run_id is None:
        return  # it was never created
    status, tags = end_status(error)
    tags[NOTE] = f"{note}\n\n{record.outcome(error, records)}"
    client = mlflow.MlflowClient()
    try:
        if records and isinstance(error, (StopRun, Diverged)):
            plots.log_curves(run_id)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in {**problems, **tags}.items()], synchronous=True)
        client.set_terminated(run_id, status)
        if status == "FINISHED":  # after the status: a kill in between leaves a finished run its best.pt
            disk.drop_spare_best(client.get_run(run_id))
        disk.measure(run_id)
    except Exception as e:
        if error is None:
            raise
        # The store itself failed: the run stays RUNNING until `alexnet runs --kill-stale` (its pid is gone).
        print(f"alexnet: could not end run {run_id} as {status} ({first_line(e)})", file=sys.stderr)


def preflight(cfg: Config) -> None:
    """What can be checked before a run exists: the device is there and usable, the data is where the
    config says and intact, the store answers."""
    check_device(cfg)
    data.prepare(cfg.data_dir)
    store.set_up_store()


def default_run_name(cfg: Config, source: str | None) -> str:
    """`smoke-lr0.1-r67-1129-041233`: the experiment file, the lr and resize, the start time."""
    stem = Path(source).stem if source and source != "/dev/null" else "run"
    return f"{stem}-lr{cfg.lr:g}-r{cfg.resize}-{time.strftime('%m%d-%H%M%S')}"


def epoch_logger(run_id: str, rec, objective: str):
    """A function that logs `rec`'s metrics with `step=epoch` and the time the epoch ended, the objective
    first (MLflow's views list a run's metrics in the order they were first logged)."""
    ended = int(time.time() * 1000)
    values = rec.metrics()
    metrics = [Metric(key, values[key], ended, rec.epoch) for key in sorted(values, key=lambda k: k != objective)]

    def log():
        mlflow.MlflowClient().log_batch(run_id, metrics=metrics, synchronous=True)
    log.what = f"logging epoch {rec.epoch}'s metrics"
    return log


def disk_recorder(run_id: str):
    """What the checkpoint writer calls after each write: the run's `disk_bytes` tag, from the bytes of
    its checkpoints (all that is big while a run trains; its end measures everything)."""
    def record_bytes(sizes: dict[str, int]) -> None:
        mlflow.MlflowClient().set_tag(run_id, disk.TAG, str(sum(sizes.values())))
    return record_bytes


def resume_config(run_id: str) -> Config:
    """The config of a run that can be resumed, or a UsageError saying why it cannot."""
    store.set_up_store()
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UsageError(f"--resume: no run {run_id!r} in {redact(where(tracking_uri()))} "
                         f"(list runs with `alexnet runs`)") from None
    status, tags = run.info.status, run.data.tags
    if status == "FINISHED":
        raise UsageError(f"--resume: run {run_id} is already FINISHED: nothing to resume")
    if status == "RUNNING" and store.stale_reason(status, tags) is None:
        who = f"pid {tags['pid']} on {tags.get('host', '?')}" if "pid" in tags else "by another process"
        raise UsageError(f"--resume: run {run_id} is still RUNNING ({who}): stop it first, or wait for it")
    if tags.get("checkpoints") == "deleted":
        raise UsageError(f"--resume: run {run_id}'s checkpoints were deleted: train it again with `alexnet train FILE`")
    if "last.pt" not in {Path(f.path).name for f in client.list_artifacts(run_id, CHECKPOINTS)}:
        raise UsageError(f"--resume: run {run_id} has no checkpoint ({CHECKPOINTS}/last.pt): it stopped before its "
                         f"first epoch ended; train it again with `alexnet train FILE`")
    try:
        table = tomllib.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.toml"))
    except Exception as e:
        raise UsageError(f"--resume: run {run_id} has no readable config.toml ({type(e).__name__})") from None
    return Config(**table)


def tracked_train(cfg: Config, *, source: str | None = None, parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None, on_epoch=None, progress: bool = True,
                  resume_run_id: str | None = None, on_start=None, objective: str | None = None,
                  trainer=train) -> TrackedRun:
    """`train(cfg)` inside one MLflow run. `on_start(run_id)` is called once the run exists;
    `on_epoch(record, run_id)` after each epoch, and may raise `StopRun`. The run ends FINISHED,
    KILLED or FAILED (see `end_status`); an exception that ended it is re-raised. `resume_run_id`:
    continue that run from its last checkpoint (`cfg` must be the run's own, see `resume_config`).
    `objective`: the metric logged first (default: `val/best_acc` with a validation split, else
    `test/best_acc`, what the leaderboard ranks by). The run's description (`mlflow.note.content`) is the tag of
    that name in `tags`, else one `record.description` writes; its end adds how it ended. `trainer`: what
    yields the epochs, `train` or a trial pack's member (alexnet/sweep/packs.py)."""
    # --- Before the run exists: everything that can be checked ---
    preflight(cfg)
    objective = objective or ("val/best_acc" if cfg.val_size else "test/best_acc")
    client = mlflow.MlflowClient()
    start, best_model = None, None
    if resume_run_id:
        if resume_config(resume_run_id) != cfg:
            raise UsageError(f"--resume: the config differs from run {resume_run_id}'s own: resume it with its config")
        start = run_files.fetch(resume_run_id, "last")
        best = run_files.fetch_best(resume_run_id, start)
        best_model = best["model"] if best is not None else None
        old_tags = client.get_run(resume_run_id).data.tags
        note = old_tags.get(NOTE, record.description(cfg, source)).split("\n\n")[0]  # without how it ended before
        start_tags = {**redact_tags(tags or {}), "resumes": str(int(old_tags.get("resumes", 0)) + 1),
                      "resumed_from_epoch": str(start["epoch"])}
    else:
        exp_id = store.experiment_id(cfg.experiment)
        origin = record.describe(cfg, source)
        note = (tags or {}).get(NOTE) or record.description(cfg, source)
        start_tags = compat.context_tags({**origin.tags, **redact_tags(tags or {}), NOTE: redact(note)})

    # --- The run: started inside the protection that ends it ---
    run_id, helpers, result = None, Helpers(), TrackedRun("")
    try:
        if resume_run_id:
            run = client.get_run(resume_run_id)
            client.update_run(resume_run_id, status="RUNNING")
        else:
            parent = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
            run = client.create_run(exp_id, run_name=cfg.run_name or default_run_name(cfg, source), tags=parent)
        run_id = result.run_id = run.info.run_id
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in start_tags.items()], synchronous=True)
        if on_start is not None:
            on_start(run_id)
        helpers.heartbeat = store.start_heartbeat(run_id)  # writes this process's tags (host, pid) at once
        helpers.system_metrics = compat.SystemMetrics(run_id, resume_logging=bool(resume_run_id))
        helpers.system_metrics.start()
        if not resume_run_id:
            client.log_batch(run_id, params=[Param(k, redact(str(v))) for k, v in asdict(cfg).items()],
                             synchronous=True)
            client.log_text(run_id, to_toml(cfg), "config.toml")
            record.log_record(run_id, origin)
        helpers.writer = run_files.writer(run_id, run.info.artifact_uri, on_written=disk_recorder(run_id),
                                          last_is_best=start is not None and start["best_epoch"] == start["epoch"])
        helpers.writer.call_after(record.warm_up_model_logging)  # beside the first epoch (once a process)

        for rec in trainer(cfg, start=start, progress=progress):
            improved = rec.best_epoch == rec.epoch
            # The epoch's metrics are logged by the writer once its checkpoint is published: a run
            # killed in between resumes from the previous epoch and logs this one then, once.
            snap = helpers.writer.submit(rec.state(), best=improved, then=epoch_logger(run_id, rec, objective))
            if improved:
                best_model = snap["model"]
            result.records.append(rec)
            if len(result.records) == 1:
                helpers.writer.call_after(helpers.system_metrics.release)
            if on_epoch is not None:
                on_epoch(rec, run_id)

        # The last checkpoints are written, then the curves drawn, while the best model is logged.
        helpers.writer.call_after(lambda: plots.log_curves(run_id))
        if best_model is not None:
            record.log_model(run, cfg, best_model)
        helpers.writer.close()  # raises what failed in the background, before the run is called FINISHED
    except BaseException as error:
        end_run(run_id, error, helpers, result.records, note)
        raise
    end_run(run_id, None, helpers, result.records, note)
    return result
