"""Where the project's files live, without importing MLflow, Optuna or torch.

The project home is `$ALEXNET_HOME`, else the checkout the package runs from, else the current folder.
Its `mlruns/` holds the default stores: MLflow's SQLite database `mlruns/mlflow.db` with the artifacts
in `mlruns/artifacts/`, and Optuna's own SQLite database `mlruns/optuna.db` (the two must not share a
file: both keep an `alembic_version` table). `MLFLOW_TRACKING_URI` (or `--tracking-uri`) points
MLflow elsewhere, `--storage` (or `$ALEXNET_STORAGE`) points Optuna elsewhere.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import parse_qsl

from alexnet.redact import redact

# A SQLite writer waits this long for another's lock before "database is locked": MLflow's store and
# Optuna's storage alike (Python's default is 5 s; parallel workers hold the lock longer than that).
SQLITE_TIMEOUT_S = 60


def project_root() -> Path:
    """`$ALEXNET_HOME`, else the checkout the package lives in, else the current folder."""
    if os.environ.get("ALEXNET_HOME"):
        return Path(os.environ["ALEXNET_HOME"]).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[1]
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


def mlruns_dir() -> Path:
    return project_root() / "mlruns"


def artifacts_dir() -> Path:
    """Where the default store keeps artifacts (checkpoints, models, plots)."""
    return mlruns_dir() / "artifacts"


def with_busy_timeout(uri: str) -> str:
    """A SQLite URI that waits `SQLITE_TIMEOUT_S` for a lock (`?timeout=`, read by SQLAlchemy's
    SQLite driver); other URIs unchanged, and a timeout the user gave is kept."""
    if not uri.startswith("sqlite:"):
        return uri
    path, _, query = uri.partition("?")
    if "timeout" in dict(parse_qsl(query)):
        return uri
    return f"{path}?{query + '&' if query else ''}timeout={SQLITE_TIMEOUT_S}"


def default_tracking_uri() -> str:
    return with_busy_timeout(f"sqlite:///{mlruns_dir() / 'mlflow.db'}")


def tracking_uri() -> str:
    """The MLflow store this process uses: `$MLFLOW_TRACKING_URI`, else the project's own."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def is_local_default(uri: str) -> bool:
    """Whether `uri` is the project's own SQLite store (whatever its query string)."""
    return uri.split("?")[0] == f"sqlite:///{mlruns_dir() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    if not uri.startswith("sqlite:///") or uri.split("?")[0] == "sqlite:///:memory:":
        return None
    return Path(uri.split("?")[0].removeprefix("sqlite:///"))


def default_storage() -> str:
    """The Optuna storage: `$ALEXNET_STORAGE`, else the project's `mlruns/optuna.db`."""
    return os.environ.get("ALEXNET_STORAGE") or f"sqlite:///{mlruns_dir() / 'optuna.db'}"


def where(uri: str) -> str:
    """A store's URI as people read it: without the SQLite timeout the project adds."""
    return uri.replace(f"?timeout={SQLITE_TIMEOUT_S}", "")


announced = False  # reset by the CLI for each command


def announce(experiment: str | None, uri: str | None = None) -> None:
    """Say on stderr, once per command, which store and experiment it uses (passwords masked): with a
    virtualenv installed from another clone, the store is that clone's unless ALEXNET_HOME says."""
    global announced
    if not announced:
        announced = True
        which = f"experiment {experiment!r}" if experiment else "all experiments"
        print(f"alexnet: store {redact(where(uri or tracking_uri()))}, {which}", file=sys.stderr)
