"""A cost-aware sweep's Pareto front: the COMPLETE, feasible trials that no other beats on both the
objective and the cost. Written as `pareto.csv` on the study's parent run (beside Optuna's plot of it)
and read back from there by `alexnet runs --sweep STUDY --pareto`. Torch-free."""

from __future__ import annotations

import io

import mlflow
import pandas as pd

from alexnet import UsageError
from alexnet.sweep.ledger import parent_settings, pareto_front

FILE = "pareto.csv"


def front_table(trials: list, objective: str, direction: str, cost: str) -> pd.DataFrame:
    """One row per trial of the front, cheapest first: trial, objective, cost, params, its MLflow run and,
    for a seeded trial, the study it came from."""
    rows = [{"trial": t.number, objective: t.values[0], f"cost/{cost}": t.values[1],
             **{f"params.{k}": v for k, v in t.params.items()},
             "mlflow_run_id": t.user_attrs.get("mlflow_run_id", ""), "seeded_from": t.user_attrs.get("seeded_from", "")}
            for t in pareto_front(trials, [direction, "minimize"])]
    columns = ["trial", objective, f"cost/{cost}"]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)


def read_front(parent) -> pd.DataFrame:
    """The front a sweep wrote on its parent run (an MLflow Run), or a UsageError saying why there is none."""
    study = parent.data.tags.get("sweep.study", "?")
    if not parent_settings(parent).cost:
        raise UsageError(f"runs: sweep {study!r} has one objective, so no Pareto front: a sweep file with "
                         f"cost = \"seconds\" (or \"flops\", \"inverse_throughput\") makes one")
    try:
        text = mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/{FILE}")
    except Exception:
        raise UsageError(f"runs: sweep {study!r} has no {FILE} yet: the sweep writes it on its parent run when "
                         f"its workers stop") from None
    return pd.read_csv(io.StringIO(text), keep_default_na=False)


def format_front(table: pd.DataFrame, study: str) -> str:
    """The front as aligned text, for people."""
    if table.empty:
        return f"sweep {study!r}: no COMPLETE feasible trial yet, so no Pareto front"
    shown = table.rename(columns=lambda c: c.removeprefix("params."))
    if not (shown["seeded_from"] != "").any():
        shown = shown.drop(columns=["seeded_from"])
    objective, cost = table.columns[1], table.columns[2]
    formats = {objective: "{:.4f}".format, cost: "{:.3g}".format,
               **{c: "{:.3g}".format for c in shown if c not in table.columns[:3] and shown[c].dtype.kind == "f"}}
    return (f"sweep {study!r}: Pareto front, {len(table)} trial{'s' if len(table) != 1 else ''} "
            f"(cheapest first; no other trial is better on both)\n" + shown.to_string(index=False, formatters=formats))
