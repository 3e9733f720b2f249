"""Compare runs from the command line: a leaderboard from `mlflow.search_runs` (pandas), stale-run
detection, the sweeps (studies) a store holds, and the learning curves of several runs in one figure.

`alexnet runs` ranks by `val/best_acc` (column `val_best`), the best-so-far validation accuracy runs
with a validation split log every epoch, when any selected run has one, else by `test/best_acc`
(`best_acc`, the chapter's protocol): `search_runs` reports a metric's last value, so a best-so-far
metric is what makes its last value the one to rank by. `test@val` is the test accuracy of the epoch
validation chose: the figure to report, not to rank by. Everything the board shows comes from one query
(disk use too: the `disk_bytes` tag the run keeps current), and on a SQL store only the columns it shows are
read (`alexnet/compare/query.py`), so it stays fast however many runs there are.

Each run has a role (tag `sweep.role`): `run` (`alexnet train`), `parent` (a sweep's study), `trial` (one
of its trials) or `confirm` (`alexnet confirm`'s re-runs). A sweep's board shows its trials; its confirm
runs are a role of their own (`--role confirm`).
"""

from __future__ import annotations

import mlflow
import pandas as pd

from alexnet import UsageError
from alexnet.compare import query
from alexnet.tracking import store
from alexnet.home import tracking_uri, where
from alexnet.redact import redact
from alexnet.sweep import ledger

# Leaderboard column -> search_runs column. Params arrive as strings; they are made numbers below.
COLUMNS = {
    "run": "tags.mlflow.runName",
    "role": "tags.sweep.role",
    "status": "status",
    "lr": "params.lr",
    "dropout": "params.dropout",
    "resize": "params.resize",
    "epochs": "params.epochs",
    "train": "params.train_limit",
    "test": "params.test_limit",
    "val": "params.val_size",
    "pipeline": "params.pipeline",
    "seed": "params.seed",
    "val_best": "metrics.val/best_acc",
    "test@val": "metrics.test/acc_at_best_val",
    "best_acc": "metrics.test/best_acc",
    "final_acc": "metrics.test/acc",
    "examples_per_sec": "metrics.perf/examples_per_sec",
}
NUMERIC = ["lr", "dropout", "resize", "epochs", "train", "test", "val", "seed", "val_best", "test@val", "best_acc",
           "final_acc", "examples_per_sec", "disk_bytes", "duration_s", "trial", "pruned_epoch"]
HEADERS = {"examples_per_sec": "examples/s", "duration_s": "duration", "disk_bytes": "disk"}
ASCENDING = ("duration_s", "disk_bytes")  # sorted smallest first; the other numbers best (largest) first
DATA_SIZE = {"train": 60000, "test": 10000}  # a limit of 0 means the whole split
WHERE_DIFFERENT = ["train", "test", "val", "pipeline", "seed"]  # shown only where the runs differ
ROLES = ("run", "trial", "parent", "confirm")
STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED", "STALE", "PRUNED", "RETRIED")


def no_experiment(name: str, known) -> str:
    return f"runs: no experiment {name!r} in {redact(where(tracking_uri()))} (known: {', '.join(known) or 'none yet'})"


# --- The leaderboard --------------------------------------------------------------------------------

# What the board reads of each run: on a SQL store only these are read (alexnet/compare/query.py).
PARAM_KEYS = [c.removeprefix("params.") for c in COLUMNS.values() if c.startswith("params.")]
METRIC_KEYS = [c.removeprefix("metrics.") for c in COLUMNS.values() if c.startswith("metrics.")]
TAG_KEYS = ["sweep.role", "sweep.trial", "sweep.study", "sweep.confirm_of", "sweep.state", "sweep.pruned_epoch",
            "sweep.retry_of", "disk_bytes", "experiment_file", "mlflow.parentRunId", *store.PROCESS_TAGS]


def search(experiment: str | None = None, sweep: str | None = None, parent: str | None = None):
    """The selected runs as `mlflow.search_runs` gives them (all experiments when a sweep or a parent run
    is named without an experiment: the sweep's runs live wherever its base experiment does). On a SQL
    store only the columns the board shows are read (`alexnet/compare/query.py`)."""
    uri = tracking_uri()
    defaulted = experiment is None and not (sweep or parent)
    if defaulted:
        experiment = store.DEFAULT_EXPERIMENT
    if query.is_sql(uri):
        known = query.experiments(uri)
        if experiment is not None and experiment not in known:
            if defaulted:
                return pd.DataFrame()  # a fresh store: no runs yet
            raise UsageError(no_experiment(experiment, known))
        df = query.runs(uri, None if experiment is None else [known[experiment]], PARAM_KEYS, TAG_KEYS, METRIC_KEYS)
        tags = df.reindex(columns=["tags.sweep.study", "tags.sweep.role", "tags.mlflow.parentRunId"])
        if sweep:
            studies_here = set(tags["tags.sweep.study"][tags["tags.sweep.role"] == "parent"].dropna())
            if sweep not in studies_here:
                raise UsageError(ledger.no_sweep(sweep, studies_here, "runs"))
            df = df[tags["tags.sweep.study"] == sweep]
        if parent:
            df = df[tags["tags.mlflow.parentRunId"] == parent]
    else:
        df = _search_runs(experiment, sweep, parent, defaulted)
        if df is None:
            return pd.DataFrame()
    if sweep and "tags.sweep.role" in df:
        df = df[df["tags.sweep.role"] != "parent"]  # the study's parent run holds no training of its own
    return df.reset_index(drop=True) if len(df) else pd.DataFrame()


def _search_runs(experiment: str | None, sweep: str | None, parent: str | None, defaulted: bool):
    """`search` through MLflow's search API (a tracking server); None for a fresh store."""
    client = mlflow.MlflowClient()
    exp_id = None
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None and defaulted:
            return None
        if exp is None:
            raise UsageError(no_experiment(experiment, [e.name for e in client.search_experiments()]))
        exp_id = exp.experiment_id
    filters = []
    if sweep:
        ledger.parent_run(sweep, experiment_id=exp_id)  # in the experiment named, as the SQL path looks
        filters.append(ledger.study_filter(sweep))
    if parent:
        filters.append(ledger.tag_clause("mlflow.parentRunId", parent))
    kwargs = {"experiment_ids": [exp_id]} if exp_id else {"search_all_experiments": True}
    df = mlflow.search_runs(filter_string=" and ".join(filters), output_format="pandas", **kwargs)
    if sweep and len(df):  # a name no literal holds was matched with LIKE: keep the study's own runs
        df = df[df["tags.sweep.study"] == sweep]
    return df


def sort_key(sort: str) -> str:
    """A column name as the board stores it, from its header's name too (`examples/s`, `duration`)."""
    return {header: name for name, header in HEADERS.items()}.get(sort, sort)


def leaderboard(experiment: str | None = None, sweep: str | None = None, parent: str | None = None,
                status: str | None = None, role: str | None = None, sort: str | None = None,
                reverse: bool = False, limit: int | None = None):
    """One row per run: name, role, status (STALE for a RUNNING run whose process is gone, PRUNED for a
    pruned trial, RETRIED for a trial its study ran again after its worker died), lr, dropout, resize, epochs, data sizes, pipeline, seed, best and final test accuracy,
    examples/s (the book's count, last epoch), trial, duration, disk use, run id; best first (`sort`: by
    val_best where any run has it, else best_acc). A sweep's board holds its trials unless `role` says
    otherwise. `board.attrs["selected"]`: rows before the status/role/limit filters."""
    sort = sort_key(sort) if sort is not None else None
    columns = list(COLUMNS) + ["trial", "duration_s", "disk_bytes", "run_id", "pruned_epoch", "stale", "resume"]
    if sort is not None and sort not in columns:
        shown = [HEADERS.get(c, c) for c in columns if c not in ("stale", "resume", "pruned_epoch")]
        raise UsageError(f"runs: cannot sort by {sort!r} (columns: {', '.join(shown)})")
    raw = search(experiment, sweep, parent)
    if raw.empty:
        board = pd.DataFrame(columns=columns)
        board.attrs["selected"] = 0
        return board
    if sort is None:
        sort = "val_best" if raw.get(COLUMNS["val_best"], pd.Series(dtype=float)).notna().any() else "best_acc"
    board = pd.DataFrame({name: raw[col] if col in raw else None for name, col in COLUMNS.items()})
    tags = [{k[5:]: v for k, v in row.items() if isinstance(v, str)}
            for row in raw[[c for c in raw if c.startswith("tags.")]].to_dict("records")]
    board["role"] = [t.get("sweep.role") or ("trial" if "sweep.trial" in t else "run") for t in tags]
    board["trial"] = [t.get("sweep.trial") or _confirmed_trial(t) for t in tags]
    start = pd.to_datetime(raw["start_time"], utc=True)
    end = pd.to_datetime(raw.get("end_time", pd.Series(pd.NaT, index=raw.index)), utc=True)
    end = end.where(raw["status"] != "RUNNING", pd.Timestamp.now(tz="UTC"))  # running: so far
    board["duration_s"] = (end - start).dt.total_seconds().round(1)
    board["stale"] = [store.stale_reason(s, t) or "" for s, t in zip(raw["status"], tags)]
    board.loc[board["stale"] != "", "status"] = "STALE"
    board["pruned_epoch"] = [t.get("sweep.pruned_epoch") if t.get("sweep.state") == "PRUNED" else None for t in tags]
    board.loc[board["pruned_epoch"].notna(), "status"] = "PRUNED"
    # A trial whose worker died (or was interrupted) and that its study ran again as a new trial: the sweep
    # counts the retry, not this run, so it is no failure of its own.
    retried = {(t.get("sweep.study"), t["sweep.retry_of"]) for t in tags if t.get("sweep.retry_of")}
    board.loc[[t.get("sweep.role") == "trial" and (t.get("sweep.study"), t.get("sweep.trial")) in retried
               for t in tags], "status"] = "RETRIED"
    board["disk_bytes"] = [t.get("disk_bytes") for t in tags]
    board["run_id"] = raw["run_id"]
    board["resume"] = [resume_command(run_id, t) for run_id, t in zip(raw["run_id"], tags)]
    for name in NUMERIC:
        board[name] = pd.to_numeric(board[name], errors="coerce")
    for name, whole in DATA_SIZE.items():
        board[name] = board[name].where(board[name] != 0, whole)
    for name in ("trial", "pruned_epoch"):
        board[name] = board[name].astype("Int64")
    board = board[columns]
    board.attrs["selected"] = len(board)
    if sweep and not role:
        role = "trial"
    if role:
        board = board[board["role"] == role]
    if status:
        board = board[board["status"] == status.upper()]
    # Numbers best-first (accuracies, speeds), names A-Z; --reverse flips it. Missing values last.
    descending = sort in NUMERIC and sort not in ASCENDING
    board = board.sort_values(sort, ascending=(not descending) != reverse, na_position="last", kind="stable")
    board = board.reset_index(drop=True)
    return board.head(limit) if limit else board


def _confirmed_trial(tags: dict) -> str | None:
    """The trial a confirm run re-trains ("trial 3", "baseline = trial 0" -> "3", "0")."""
    confirm_of = tags.get("sweep.confirm_of", "")
    return confirm_of.rsplit("trial ", 1)[1] if "trial " in confirm_of else None


def megabytes(nbytes) -> str:
    if nbytes != nbytes or nbytes is None:
        return "-"
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:,.2f} GB"
    return f"{nbytes / 1e6:,.0f} MB" if nbytes >= 1e7 else f"{nbytes / 1e6:.1f} MB"


def format_table(board, selection: dict | None = None) -> str:
    """The leaderboard as aligned text, for people: the data size, pipeline and seed only where the
    rows differ, the trial only where there are trials, then the disk they use in all. An empty board
    is one line saying why (`selection`: the leaderboard's arguments), never pandas' own text."""
    if board.empty:
        return empty_words(board, selection or {})
    def duration(s):
        if s != s:
            return "-"
        s = int(s)
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

    def same(values) -> bool:  # a sweep's parent has no params: it differs in nothing
        return values.nunique() <= 1

    hidden = ["stale", "resume", "pruned_epoch"] + [c for c in WHERE_DIFFERENT if same(board[c])]
    if board["trial"].isna().all():
        hidden.append("trial")
    if board["val_best"].isna().all():  # no run held a validation split out
        hidden += ["val_best", "test@val"]
    shown = board.drop(columns=hidden).copy()
    formats = {"lr": "{:g}", "dropout": "{:g}", "resize": "{:.0f}", "train": "{:,.0f}", "test": "{:,.0f}",
               "val": "{:,.0f}", "seed": "{:.0f}", "val_best": "{:.4f}", "test@val": "{:.4f}", "best_acc": "{:.4f}",
               "final_acc": "{:.4f}", "examples_per_sec": "{:,.0f}", "pipeline": "{}"}
    for name, fmt in formats.items():
        if name in shown:
            shown[name] = [fmt.format(v) if v == v and v is not None else "-" for v in shown[name]]
    # A pruned trial: the epoch it stopped at, of its epochs.
    shown["epochs"] = [f"{p}/{e:.0f}" if p is not pd.NA and e == e else ("-" if e != e else f"{e:.0f}")
                       for p, e in zip(board["pruned_epoch"], board["epochs"])]
    if "trial" in shown:
        shown["trial"] = ["-" if t is pd.NA else str(t) for t in shown["trial"]]
    shown["duration_s"] = [duration(v) for v in shown["duration_s"]]
    shown["disk_bytes"] = [megabytes(v) for v in shown["disk_bytes"]]
    shown = shown.rename(columns=HEADERS)
    return shown.to_string(index=False) + "\n" + disk_total(board)


def disk_total(board) -> str:
    measured = board["disk_bytes"].dropna()
    unmeasured = len(board) - len(measured)
    why = "made before runs recorded their size; `alexnet gc --yes` measures them"
    if measured.empty:
        return f"disk: not recorded for these {unmeasured} runs ({why})"
    return (f"disk: {megabytes(measured.sum())} in {len(measured)} run{'s' if len(measured) != 1 else ''}"
            + (f" ({unmeasured} not recorded: {why})" if unmeasured else ""))


def resume_command(run_id: str, tags: dict) -> str:
    """What continues a stopped run: its sweep's command for a sweep's runs (the study retries the
    trial and reopens the parent), `alexnet train --resume` for the others."""
    if tags.get("sweep.role") in ("parent", "trial") and tags.get("experiment_file"):
        return f"alexnet sweep {tags['experiment_file']}"
    return f"alexnet train --resume {run_id}"


def stale_runs(board) -> list[tuple[str, str, str]]:
    """(run_id, reason, the command that resumes it) of the board's stale runs."""
    return [(r, why, cmd) for r, why, cmd in zip(board["run_id"], board["stale"], board["resume"]) if why]


def empty_words(board, selection: dict) -> str:
    """Why a leaderboard is empty, in words."""
    experiment = selection.get("experiment") or store.DEFAULT_EXPERIMENT
    where_ = (f"sweep {selection['sweep']!r}" if selection.get("sweep") else
              f"the children of run {selection['parent']}" if selection.get("parent") else f"experiment {experiment!r}")
    if not board.attrs.get("selected"):
        return (f"no runs in {where_} yet" +
                ("" if selection.get("sweep") or selection.get("parent") else
                 ": train one with `alexnet train experiments/smoke.toml`"))
    if selection.get("sweep") and not selection.get("role") and not selection.get("status"):
        return f"no trial runs in {where_} yet (no trial started a run)"
    role = selection.get("role") or ("trial" if selection.get("sweep") else None)
    filters = " and ".join(x for x in [f"--role {role}" if role else "", f"--status {selection['status'].upper()}"
                                       if selection.get("status") else ""] if x)
    return f"no runs match {filters} among the {board.attrs['selected']} runs of {where_}"
