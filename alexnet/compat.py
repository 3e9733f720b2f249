"""The one home of MLflow's and Optuna's private names: everything here reaches past what the two libraries
document, and nothing outside this module may (`tests/test_compat.py` scans `alexnet/` for underscore
names and internal modules of either library, and checks each use below against the installed versions,
failing with "MLflow X.Y changed NAME: ..." when one moved).

Supported: MLflow >=3.17,<3.18 and Optuna >=5.0,<6 (`pyproject.toml`). MLflow's minor releases change the
internals used here (the SQL store's table models, the system-metrics monitor); Optuna keeps its public
API within a major version, and nothing of its internals is used.

What the project uses, and why there is no public way:
- `sql_experiments`, `sql_runs`: the leaderboard's runs read from the store's tables over MLflow's own
  table models. `mlflow.search_runs` builds an object for every param, tag and metric of every run:
  over 10,000 runs it took 8.2 s, the whole `alexnet runs` command on this path 2.7-3.6 s.
- `SystemMetrics`: MLflow's system-metrics monitor for a run the client API created (the public switch,
  `mlflow.start_run(log_system_metrics=True)`, needs MLflow's active run, which the run lifecycle never
  uses), with its samples held back until the run's first epoch is logged (see the class).
- `context_tags`: the tags `mlflow.start_run` gives a run (source, user, git commit) for a run the client
  API creates.
- `warm_up_requirements`: MLflow's map of installed packages, built once a process, early (1.4-3.3 s).
- `delete_artifacts`: MLflow's client can list and log artifacts but not delete them.

Public (imported anywhere): `mlflow`, `mlflow.entities`, `mlflow.exceptions`, `mlflow.client`,
`mlflow.pytorch`, `mlflow.data` (and `mlflow.data.schema`, whose `TensorDatasetSchema` its reference
documents), `mlflow.models`, `mlflow.types`, `mlflow.artifacts`; `optuna` and its documented packages in
`PUBLIC_MODULES`. Every import here is inside a function, so importing this module costs nothing.
"""

from __future__ import annotations

import functools

MLFLOW_SUPPORTED = ">=3.17,<3.18"
OPTUNA_SUPPORTED = ">=5.0,<6"

# The modules the libraries document; any other module of theirs is internal (tests/test_compat.py).
PUBLIC_MODULES = frozenset({
    "mlflow", "mlflow.entities", "mlflow.exceptions", "mlflow.client", "mlflow.pytorch", "mlflow.data",
    "mlflow.data.schema", "mlflow.models", "mlflow.types", "mlflow.artifacts",
    "optuna", "optuna.samplers", "optuna.pruners", "optuna.storages", "optuna.trial", "optuna.distributions",
    "optuna.study", "optuna.visualization", "optuna.visualization.matplotlib", "optuna.exceptions",
    "optuna.importance", "optuna.logging",
})

# A dataset input's tag saying which split it is (the UI's Dataset column shows it). MLflow's constant
# lives in an internal module; the value is what its stores hold.
DATASET_CONTEXT = "mlflow.data.context"


# --- The leaderboard's SQL fast path over MLflow's table models ---

def tables():
    """MLflow's SQLAlchemy models of its store's tables: experiments, runs, params, tags, latest metrics."""
    from mlflow.store.tracking.dbmodels import models
    return models.SqlExperiment, models.SqlRun, models.SqlParam, models.SqlTag, models.SqlLatestMetric


@functools.cache
def engine(uri: str):
    import sqlalchemy as sa
    return sa.create_engine(uri, poolclass=sa.pool.NullPool)


def sql_experiments(uri: str) -> dict[str, str]:
    """{name: id} of the store's active experiments."""
    import sqlalchemy as sa
    experiment = tables()[0]
    with engine(uri).connect() as conn:
        rows = conn.execute(sa.select(experiment.name, experiment.experiment_id)
                            .where(experiment.lifecycle_stage == "active")).all()
    return {name: str(exp_id) for name, exp_id in rows}


def sql_runs(uri: str, experiment_ids: list[str] | None, params: list[str], tags: list[str], metrics: list[str]):
    """The active runs of `experiment_ids` (None: every experiment), newest first, with the named params,
    tags and latest metrics as columns, in `mlflow.search_runs`' shape (`run_id`, `experiment_id`,
    `status`, `start_time`, `end_time`, `params.K`, `tags.K`, `metrics.K`, the name as
    `tags.mlflow.runName`): four queries, reading only the keys asked for."""
    import pandas as pd
    import sqlalchemy as sa
    _, run, param, tag, latest = tables()
    active = [run.lifecycle_stage == "active"]
    if experiment_ids is not None:
        active.append(run.experiment_id.in_([int(e) for e in experiment_ids]))

    def keyed(model, keys, value=None):
        value = value if value is not None else model.value
        return (sa.select(model.run_uuid.label("run_id"), model.key, value.label("value"))
                .join(run, run.run_uuid == model.run_uuid).where(*active, model.key.in_(keys)))

    nan_or_value = sa.case((latest.is_nan, None), else_=latest.value)
    with engine(uri).connect() as conn:
        table = pd.read_sql(sa.select(run.run_uuid.label("run_id"), run.experiment_id, run.status,
                                      run.start_time, run.end_time, run.name).where(*active)
                            .order_by(run.start_time.desc()), conn)  # newest first, as search_runs
        parts = [(prefix, pd.read_sql(query, conn)) for prefix, query in (
            ("params.", keyed(param, params)), ("tags.", keyed(tag, tags)),
            ("metrics.", keyed(latest, metrics, nan_or_value)))]
    table["experiment_id"] = table["experiment_id"].astype(str)
    for column in ("start_time", "end_time"):
        table[column] = pd.to_datetime(table[column], unit="ms", utc=True)
    table = table.rename(columns={"name": "tags.mlflow.runName"}).set_index("run_id")
    for prefix, long in parts:
        wide = long.pivot(index="run_id", columns="key", values="value").add_prefix(prefix)
        table = table.join(wide)
    return table.reset_index()


# --- A run created with the client API, given what `mlflow.start_run` would give it ---

def context_tags(tags: dict[str, str]) -> dict[str, str]:
    """`tags` with MLflow's context tags added (source name and type, user, git commit), as
    `mlflow.start_run` resolves them; `tags` win."""
    from mlflow.tracking.context.registry import resolve_tags
    return resolve_tags(tags)


@functools.cache
def _system_metrics_class():
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    import threading

    class SystemMetrics(SystemMetricsMonitor):
        """MLflow's system metrics (`system/...`), held back until `release()`: tracking releases them once
        the run's first epoch is logged, objective first, so the objective is the run's first metric.
        MLflow's compare page plots a run's first metric, which would otherwise be
        `system/cpu_utilization_percentage` (sampled every 10 s, long before an epoch ends). Nothing is
        lost: held samples are logged on release."""

        def __init__(self, run_id: str, resume_logging: bool):
            super().__init__(run_id, resume_logging=resume_logging)
            self.held, self.released = [], threading.Event()
            if resume_logging:  # a resumed run has its metrics in order already
                self.released.set()

        def release(self) -> None:
            self.released.set()

        def publish_metrics(self, metrics):
            if not self.released.is_set():
                self.held.append(metrics)
                for monitor in self.monitors:
                    monitor.clear_metrics()
                return
            held, self.held = self.held, []
            for sample in held + [metrics]:
                super().publish_metrics(sample)

        def finish(self):
            super().finish()
            held, self.held = self.held, []
            for sample in held:  # the run ended before its first epoch was logged
                super().publish_metrics(sample)
            if held:
                self.mlflow_logger.flush()

    return SystemMetrics


def __getattr__(name: str):
    """`compat.SystemMetrics(run_id, resume_logging)`: the class is built on first use, so that importing
    this module imports nothing of MLflow's."""
    if name == "SystemMetrics":
        return _system_metrics_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def preload_sql_store() -> None:
    """Import MLflow's SQL tracking store (about 0.9 s), which a worker's first run would otherwise import:
    a sweep worker does it while the launcher checks the device, the data and the stores."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def warm_up_requirements() -> None:
    """Build MLflow's map of installed packages (module -> distributions), which `log_model` checks the
    model's requirements against: built once a process and cached by MLflow."""
    from mlflow.utils import requirements_utils
    requirements_utils._init_modules_to_packages_map()


# --- Artifacts ---

def delete_artifacts(artifact_uri: str, path: str | None = None) -> None:
    """Delete what lies under an artifact location (or its `path`): the local store's files, or a
    server's (`--serve-artifacts`)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    get_artifact_repository(artifact_uri).delete_artifacts(path)
