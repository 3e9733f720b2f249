"""What a sweep does to its runs in MLflow: end a dead worker's trial run, and find the study's parent
run again on a resume. Which runs are the study's is the ledger's answer (`ledger.py`). Torch-free: the
launcher uses it."""

from __future__ import annotations

import time

import mlflow
from mlflow.exceptions import MlflowException

from alexnet import UsageError
from alexnet.redact import first_line
from alexnet.tracking import store
from alexnet.sweep.ledger import study_settings, trial_runs


def end_trial_runs(study, number: int, status: str, tags: dict) -> None:
    """End the MLflow run(s) of a trial still marked RUNNING (its worker died)."""
    client = mlflow.MlflowClient()
    for run in trial_runs(study.study_name, experiment=study_settings(study).config.get("experiment")):
        if run.data.tags.get("sweep.trial") == str(number) and run.info.status == "RUNNING":
            for k, v in tags.items():
                client.set_tag(run.info.run_id, k, v)
            client.set_terminated(run.info.run_id, status)


def existing_parent(run_id: str | None) -> str | None:
    """The study's parent run id if that run exists and is not deleted; None if it never existed or is
    gone. Any other error (the store does not answer) is an error, not "no parent yet": taking it for
    one would start a second parent run."""
    if not run_id:
        return None
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise UsageError(f"sweep: cannot look up the study's parent run {run_id} ({first_line(e)})") from None
    return run_id if run.info.lifecycle_stage == "active" else None


def dead_trial_lines(running: list, grace_seconds: int, heartbeat_seconds: int, now: float | None = None) -> list[str]:
    """A line for each RUNNING trial whose worker is gone (its run's process, `store.process_gone`): the
    study retries it only once its Optuna heartbeat is `grace_seconds` old, and until then a re-run would
    wait in silence. Its run's `heartbeat` tag (refreshed every `store.HEARTBEAT_S`) bounds how long ago the
    worker last beat, so the wait said is an upper bound."""
    lines, now = [], now or time.time()
    for t in running:
        run_id = t.user_attrs.get("mlflow_run_id")
        try:
            tags = mlflow.MlflowClient().get_run(run_id).data.tags if run_id else {}
        except MlflowException:
            continue
        gone = store.process_gone(tags, now) if "pid" in tags else None
        if not gone:
            continue  # alive, or on another machine and not yet known dead: nothing to say
        silent = now - float(tags.get("heartbeat", now))
        left = round(min(grace_seconds, grace_seconds - silent + store.HEARTBEAT_S + heartbeat_seconds))
        if left > 0:
            lines.append(f"waiting up to {left} s for trial {t.number}'s heartbeat to go stale (its worker stopped "
                         f"answering: {gone}) before retrying it")
        else:
            lines.append(f"trial {t.number}'s worker stopped answering ({gone}): retrying it now")
    return lines
