"""`alexnet gc`: the retention policy applied to every run of the store, and the runs deleted in MLflow
removed for good. A dry run unless told `--yes`; either way it says how much it frees.

The policy, what each run keeps:
- a run of `alexnet train`: while it can be resumed (KILLED, FAILED, stale), everything; once FINISHED,
  `last.pt` and its model: a `best.pt` beside them holds the model's weights again (tracking drops it as
  the run finishes; gc catches the runs from before);
- a sweep's trials: the trials the study keeps (`ledger.kept_trials`: the top `keep_top` COMPLETE
  feasible trials by Optuna's value, the earlier on a tie, and in a cost-aware sweep the Pareto front)
  keep their checkpoints and model; the others that finished lose them. It is the very rule the sweep
  applies after every trial (`ledger.releasable`); gc catches sweeps stopped before it could. A running
  sweep's trials are left to the sweep, and a study whose Optuna storage does not answer is left as it is;
- confirm runs (`alexnet confirm`): they are there for their metric; once ended, their checkpoints and
  model go (confirm drops them as each run ends);
- params, metrics, tags, config and plots always stay;
- runs deleted in MLflow (the UI's delete, `mlflow runs delete`) go for good with their artifacts and
  models, through MLflow's own `mlflow gc`; logged models deleted in MLflow too. Not while an experiment
  is deleted in MLflow: `mlflow gc` would remove it and all its runs, and a deleted experiment can still be
  restored, so gc says so and leaves both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import mlflow
from mlflow.entities import ViewType

from alexnet.tracking import disk, store
from alexnet.compare import runs
from alexnet.tracking.store import CHECKPOINTS
from alexnet.redact import redact
from alexnet.sweep import ledger

DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # the stores `mlflow gc` works on


@dataclass
class Item:
    group: str          # what kind of file goes, in words
    run_id: str
    nbytes: int
    act: Callable[[], object]
    unit: str = "run"


def _checkpoint_and_model_bytes(run) -> int:
    return disk.artifact_bytes(run.info.artifact_uri, CHECKPOINTS) + sum(
        disk.artifact_bytes(m.artifact_location) for m in disk.logged_models(run))


def _delete(run_id: str):
    return lambda: disk.delete_checkpoints(run_id)


def trial_items(all_runs: list, notes: list[str] | None = None) -> list[Item]:
    """Trials their study does not keep (`ledger.releasable`, as the sweep's own retention), of the studies
    not running now. A study whose Optuna storage does not answer is left as it is (said in `notes`):
    Optuna's trial states, not the runs', say which trials finished."""
    items = []
    parents = {}
    for r in sorted((r for r in all_runs if r.data.tags.get("sweep.role") == "parent"), key=lambda r: r.info.start_time):
        parents[r.data.tags.get("sweep.study")] = r  # the newest parent of each name, as `ledger.parents`
    for study, parent in parents.items():
        if parent.info.status == "RUNNING" and not store.stale_reason("RUNNING", parent.data.tags):
            continue  # the sweep applies its own retention, under its lock
        settings = ledger.parent_settings(parent)
        optuna_study, why = ledger.open_study(settings)
        if optuna_study is None:
            if notes is not None:
                notes.append(f"sweep {study!r}: its trials are left as they are: {why}")
            continue
        trials = [r for r in all_runs if r.data.tags.get("sweep.study") == study and r.data.tags.get("sweep.role") == "trial"]
        for r in ledger.releasable(trials, optuna_study.get_trials(deepcopy=False), settings):
            items.append(Item(f"sweep {study!r}: checkpoints and models of trials outside its top {settings.keep_top}",
                              r.info.run_id, _checkpoint_and_model_bytes(r), _delete(r.info.run_id)))
    return items


def confirm_items(all_runs: list) -> list[Item]:
    return [Item("confirm runs: checkpoints and models (their metrics are what they are for)", r.info.run_id,
                 _checkpoint_and_model_bytes(r), _delete(r.info.run_id))
            for r in all_runs if r.data.tags.get("sweep.role") == "confirm" and r.info.status != "RUNNING"
            and r.data.tags.get("checkpoints") != "deleted"]


def finished_items(all_runs: list, going: set[str]) -> list[Item]:
    items = []
    for r in all_runs:
        if r.info.run_id not in going and (nbytes := disk.spare_best_bytes(r)):
            items.append(Item("finished runs: best.pt beside a logged model of the same weights", r.info.run_id,
                              nbytes, lambda r=r: disk.drop_spare_best(r)))
    return items


def deleted_items(exp_ids: list[str]) -> list[Item]:
    """Runs deleted in MLflow (found with the public search, `ViewType.DELETED_ONLY`): their logged models
    are deleted too, and `mlflow gc` then removes both for good (`remove_deleted`)."""
    client = mlflow.MlflowClient()
    deleted = mlflow.search_runs(exp_ids, run_view_type=ViewType.DELETED_ONLY, output_format="list",
                                 max_results=100000) if exp_ids else []
    items = []
    for run in deleted:
        models = disk.logged_models(run)
        nbytes = disk.artifact_bytes(run.info.artifact_uri) + sum(disk.artifact_bytes(m.artifact_location) for m in models)
        items.append(Item("runs deleted in MLflow, removed for good", run.info.run_id, nbytes,
                          lambda models=models: [client.delete_logged_model(m.model_id) for m in models]))
    return items


def hard_delete_note(uri: str) -> str:
    """Why `mlflow gc` cannot remove what was deleted in MLflow here (empty: it can). It works on the
    store's database itself, and, given no experiment, removes every experiment deleted in MLflow with all
    its runs: gc leaves that to a person (a deleted experiment can still be restored)."""
    if uri.split(":")[0].split("+")[0] not in DATABASES:
        return "runs deleted in MLflow on a tracking server: the server's own `mlflow gc` removes them"
    gone = mlflow.MlflowClient().search_experiments(view_type=ViewType.DELETED_ONLY)
    if gone:
        names = ", ".join(repr(e.name) for e in gone[:3]) + (" ..." if len(gone) > 3 else "")
        return (f"runs deleted in MLflow stay: `mlflow gc` would also remove the experiments deleted in MLflow "
                f"({names}) with all their runs; restore them (mlflow experiments restore), or run mlflow gc yourself")
    return ""


def remove_deleted(uri: str) -> str:
    """MLflow's own `mlflow gc` on the store: the runs and logged models deleted in MLflow (the UI's delete,
    and the models whose files the policy deleted) removed for good, files and records. The store's URI
    travels in the environment, so a password in it never shows in `ps`. Returns what went wrong, or ""."""
    done = subprocess.run([sys.executable, "-m", "mlflow", "gc"], env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                          capture_output=True, text=True)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return redact(lines[-1] if lines else f"exit status {done.returncode}")
    return ""


def plan() -> tuple[list[Item], list, str]:
    """(what the policy deletes, every active run, a note on what gc cannot do on this store)."""
    client = mlflow.MlflowClient()
    exp_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    all_runs = mlflow.search_runs(exp_ids, output_format="list", max_results=100000) if exp_ids else []
    notes = []
    items = trial_items(all_runs, notes) + confirm_items(all_runs)
    items += finished_items(all_runs, {i.run_id for i in items})
    why_not = hard_delete_note(mlflow.get_tracking_uri())
    if not why_not:
        items += deleted_items(exp_ids)
    return items, all_runs, "; ".join(notes + ([why_not] if why_not else []))


def gc(yes: bool) -> int:
    """`alexnet gc [--yes]`: one line per kind of file, then what it frees (or would)."""
    items, all_runs, note = plan()
    print(f"alexnet gc: {'deleting' if yes else 'dry run, nothing is deleted (alexnet gc --yes deletes)'}",
          file=sys.stderr)
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    for group, members in groups.items():
        print(f"  {group}: {len(members)} {members[0].unit}{'s' if len(members) != 1 else ''}, "
              f"{runs.megabytes(sum(i.nbytes for i in members))}")
        if yes:
            for item in members:
                item.act()
    if note:
        print(f"  ({note})", file=sys.stderr)
    total = sum(i.nbytes for i in items)
    if not items:
        print(f"nothing to free: every one of the {len(all_runs)} runs keeps only what the policy keeps")
    elif yes:
        print(f"freed {runs.megabytes(total)}")
    else:
        print(f"would free {runs.megabytes(total)}")
    status = 0
    if yes:
        uri = mlflow.get_tracking_uri()
        if not hard_delete_note(uri):  # also the records of the models whose files the policy deleted just now
            failed = remove_deleted(uri)
            if failed:
                print(f"alexnet gc: mlflow gc failed ({failed}): what was deleted in MLflow stays until it runs",
                      file=sys.stderr)
                status = 1
        unmeasured = [r.info.run_id for r in all_runs if disk.TAG not in r.data.tags]
        for run_id in unmeasured:
            disk.measure(run_id)
        for item in groups.get("finished runs: best.pt beside a logged model of the same weights", []):
            disk.measure(item.run_id)
    return status
