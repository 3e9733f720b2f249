"""The leaderboard's runs from a SQL store (SQLite, PostgreSQL, MySQL) in four queries: the runs, and of
their params, tags and latest metrics only the keys the board shows, read with SQLAlchemy over MLflow's
own table models, in the shape `mlflow.search_runs` returns (`run_id`, `status`, `start_time`,
`end_time`, `params.K`, `tags.K`, `metrics.K`). MLflow's search API builds an object for every param, tag
and metric of every run (over 1,000 runs of this project, about 60,000 of them: 1-2 s); this reads a
tenth of the rows into pandas directly. It also spares `alexnet runs` importing MLflow's tracking store
(about 1 s). A tracking server goes through `mlflow.search_runs`."""

from __future__ import annotations

import functools

import pandas as pd
import sqlalchemy as sa
from mlflow.store.tracking.dbmodels.models import SqlExperiment, SqlLatestMetric, SqlParam, SqlRun, SqlTag

SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def is_sql(uri: str) -> bool:
    return uri.split(":")[0].split("+")[0] in SQL_SCHEMES


@functools.cache
def engine(uri: str) -> sa.Engine:
    return sa.create_engine(uri, poolclass=sa.pool.NullPool)


def experiments(uri: str) -> dict[str, str]:
    """{name: id} of the store's active experiments."""
    with engine(uri).connect() as conn:
        rows = conn.execute(sa.select(SqlExperiment.name, SqlExperiment.experiment_id)
                            .where(SqlExperiment.lifecycle_stage == "active")).all()
    return {name: str(exp_id) for name, exp_id in rows}


def runs(uri: str, experiment_ids: list[str] | None, params: list[str], tags: list[str],
         metrics: list[str]) -> pd.DataFrame:
    """The active runs of `experiment_ids` (None: every experiment) with the named params, tags and latest
    metrics as columns; the run's name as `tags.mlflow.runName`."""
    active = [SqlRun.lifecycle_stage == "active"]
    if experiment_ids is not None:
        active.append(SqlRun.experiment_id.in_([int(e) for e in experiment_ids]))

    def keyed(model, keys, value=None):
        value = value if value is not None else model.value
        return (sa.select(model.run_uuid.label("run_id"), model.key, value.label("value"))
                .join(SqlRun, SqlRun.run_uuid == model.run_uuid).where(*active, model.key.in_(keys)))

    nan_or_value = sa.case((SqlLatestMetric.is_nan, None), else_=SqlLatestMetric.value)
    with engine(uri).connect() as conn:
        table = pd.read_sql(sa.select(SqlRun.run_uuid.label("run_id"), SqlRun.experiment_id, SqlRun.status,
                                      SqlRun.start_time, SqlRun.end_time, SqlRun.name).where(*active)
                            .order_by(SqlRun.start_time.desc()), conn)  # newest first, as search_runs
        parts = [(prefix, pd.read_sql(query, conn)) for prefix, query in (
            ("params.", keyed(SqlParam, params)), ("tags.", keyed(SqlTag, tags)),
            ("metrics.", keyed(SqlLatestMetric, metrics, nan_or_value)))]
    table["experiment_id"] = table["experiment_id"].astype(str)
    for column in ("start_time", "end_time"):
        table[column] = pd.to_datetime(table[column], unit="ms", utc=True)
    table = table.rename(columns={"name": "tags.mlflow.runName"}).set_index("run_id")
    for prefix, long in parts:
        wide = long.pivot(index="run_id", columns="key", values="value").add_prefix(prefix)
        table = table.join(wide)
    return table.reset_index()
