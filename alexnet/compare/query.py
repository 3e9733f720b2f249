"""The leaderboard's runs from a SQL store (SQLite, PostgreSQL, MySQL) in four queries: the runs, and of
their params, tags and latest metrics only the keys the board shows, read into pandas directly in the
shape `mlflow.search_runs` returns (`run_id`, `status`, `start_time`, `end_time`, `params.K`, `tags.K`,
`metrics.K`). MLflow's search API builds an object for every param, tag and metric of every run: over
10,000 runs it took 8.2 s, while the whole `alexnet runs` command on this path took 2.7-3.6 s (over 1,000
runs, 1.5 s against 2.2 s). It also spares `alexnet runs` importing MLflow's tracking store (about 1 s).
The queries go over MLflow's own table models, which are not public: they live in `alexnet/compat.py`,
tested row for row against `mlflow.search_runs`. A tracking server goes through `mlflow.search_runs`."""

from __future__ import annotations

from alexnet import compat

SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def is_sql(uri: str) -> bool:
    return uri.split(":")[0].split("+")[0] in SQL_SCHEMES


experiments = compat.sql_experiments
runs = compat.sql_runs
