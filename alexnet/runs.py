"""Compare runs from the command line: a leaderboard from `mlflow.search_runs` (pandas), stale-run
detection, and the learning curves of several runs in one figure.

`alexnet runs` ranks by `val/best_acc` (column `val_best`), the best-so-far validation accuracy runs
with a validation split log every epoch, when any selected run has one, else by `test/best_acc`
(`best_acc`, the chapter's protocol): `search_runs` reports a metric's last value, so a best-so-far
metric is what makes its last value the one to rank by. `test@val` is the test accuracy of the epoch
validation chose: the figure to report, not to rank by.
"""

from __future__ import annotations

import mlflow
import pandas as pd

from alexnet import UsageError, store
from alexnet.home import tracking_uri, where
from alexnet.redact import redact

# Leaderboard column -> search_runs column. Params arrive as strings; they are made numbers below.
COLUMNS = {
    "run": "tags.mlflow.runName",
    "status": "status",
    "lr": "params.lr",
    "dropout": "params.dropout",
    "resize": "params.resize",
    "epochs": "params.epochs",
    "val_best": "metrics.val/best_acc",
    "test@val": "metrics.test/acc_at_best_val",
    "best_acc": "metrics.test/best_acc",
    "final_acc": "metrics.test/acc",
    "examples_per_sec": "metrics.perf/examples_per_sec",
}
NUMERIC = ["lr", "dropout", "resize", "epochs", "val_best", "test@val", "best_acc", "final_acc", "examples_per_sec",
           "duration_s"]


def _quoted(value: str, what: str) -> str:
    if "'" in value:
        raise UsageError(f"runs: {what} {value!r} contains a quote: pick a name without one")
    return f"'{value}'"


def search(experiment: str | None = None, sweep: str | None = None, parent: str | None = None):
    """The raw `search_runs` DataFrame of the selected runs (all experiments when a sweep or a parent
    run is named without an experiment: the sweep's runs live wherever its base experiment does)."""
    client = mlflow.MlflowClient()
    filters = []
    if sweep:
        filters.append(f"tags.`sweep.study` = {_quoted(sweep, 'sweep')}")
    if parent:
        filters.append(f"tags.`mlflow.parentRunId` = {_quoted(parent, 'parent run id')}")
    defaulted = experiment is None and not (sweep or parent)
    if defaulted:
        experiment = store.DEFAULT_EXPERIMENT
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None and defaulted:
            return pd.DataFrame()  # a fresh store: no runs yet
        if exp is None:
            known = ", ".join(e.name for e in client.search_experiments()) or "none yet"
            raise UsageError(f"runs: no experiment {experiment!r} in {redact(where(tracking_uri()))} (known: {known})")
        kwargs = {"experiment_ids": [exp.experiment_id]}
    else:
        kwargs = {"search_all_experiments": True}
    df = mlflow.search_runs(filter_string=" and ".join(filters), output_format="pandas", **kwargs)
    if sweep and "tags.sweep.role" in df:
        df = df[df["tags.sweep.role"] != "parent"]  # the study's parent run holds no training of its own
    return df if len(df) else pd.DataFrame()


def leaderboard(experiment: str | None = None, sweep: str | None = None, parent: str | None = None,
                status: str | None = None, sort: str | None = None, reverse: bool = False,
                limit: int | None = None):
    """One row per run: name, status (STALE for a RUNNING run whose process is gone), lr, dropout,
    resize, epochs, best validation accuracy and the test accuracy at its epoch, best and final test
    accuracy, examples/s (the book's count, last epoch), duration, run id; best first (`sort`: by
    val_best where any run has it, else best_acc)."""
    raw = search(experiment, sweep, parent)
    columns = list(COLUMNS) + (["trial"] if sweep else []) + ["duration_s", "stale", "run_id", "resume"]
    if sort is not None and sort not in columns:
        raise UsageError(f"runs: cannot sort by {sort!r} (columns: {', '.join(columns)})")
    if raw.empty:
        return pd.DataFrame(columns=columns)
    if sort is None:
        sort = "val_best" if raw.get(COLUMNS["val_best"], pd.Series(dtype=float)).notna().any() else "best_acc"
    board = pd.DataFrame({name: raw[col] if col in raw else None for name, col in COLUMNS.items()})
    if sweep:
        board["trial"] = pd.to_numeric(raw.get("tags.sweep.trial"), errors="coerce").astype("Int64")
    start = pd.to_datetime(raw["start_time"], utc=True)
    end = pd.to_datetime(raw.get("end_time", pd.Series(pd.NaT, index=raw.index)), utc=True)
    end = end.where(raw["status"] != "RUNNING", pd.Timestamp.now(tz="UTC"))  # running: so far
    board["duration_s"] = (end - start).dt.total_seconds().round(1)
    tags = [{k[5:]: v for k, v in row.items() if isinstance(v, str)}
            for row in raw[[c for c in raw if c.startswith("tags.")]].to_dict("records")]
    board["stale"] = [store.stale_reason(s, t) or "" for s, t in zip(raw["status"], tags)]
    board.loc[board["stale"] != "", "status"] = "STALE"
    board["run_id"] = raw["run_id"]
    board["resume"] = [resume_command(run_id, t) for run_id, t in zip(raw["run_id"], tags)]
    for name in NUMERIC:
        if name in board:
            board[name] = pd.to_numeric(board[name], errors="coerce")
    if status:
        board = board[board["status"] == status.upper()]
    # Numbers best-first (accuracies, speeds), names A-Z; --reverse flips it. Missing values last.
    descending = sort in NUMERIC and sort not in ("duration_s",)
    board = board.sort_values(sort, ascending=(not descending) != reverse, na_position="last", kind="stable")
    board = board.reset_index(drop=True)
    return board.head(limit) if limit else board


def format_table(board) -> str:
    """The leaderboard as aligned text, for people."""
    def duration(s):
        if s != s:
            return "-"
        s = int(s)
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

    shown = board.drop(columns=["stale", "resume"]).copy()
    formats = {"lr": "{:g}", "dropout": "{:g}", "resize": "{:.0f}", "epochs": "{:.0f}", "val_best": "{:.4f}",
               "test@val": "{:.4f}", "best_acc": "{:.4f}", "final_acc": "{:.4f}", "examples_per_sec": "{:,.0f}"}
    for name, fmt in formats.items():
        shown[name] = [fmt.format(v) if v == v and v is not None else "-" for v in shown[name]]
    shown["duration_s"] = [duration(v) for v in shown["duration_s"]]
    shown = shown.rename(columns={"duration_s": "duration", "examples_per_sec": "examples/s"})
    return shown.to_string(index=False)


def resume_command(run_id: str, tags: dict) -> str:
    """What continues a stopped run: its sweep's command for a sweep's runs (the study retries the
    trial and reopens the parent), `alexnet train --resume` for the others."""
    if tags.get("sweep.role") in ("parent", "trial") and tags.get("experiment_file"):
        return f"alexnet sweep {tags['experiment_file']}"
    return f"alexnet train --resume {run_id}"


def stale_runs(board) -> list[tuple[str, str, str]]:
    """(run_id, reason, the command that resumes it) of the board's stale runs."""
    return [(r, why, cmd) for r, why, cmd in zip(board["run_id"], board["stale"], board["resume"]) if why]
