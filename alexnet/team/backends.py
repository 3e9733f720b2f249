"""A team's shared servers seen from a client: does a database answer (one line if not, before anything
is created), and does an error mean that a server was lost mid-way (the tracking server, or the
database behind the Optuna storage), so that a sweep worker stops in one line and leaves its trial to be
retried elsewhere instead of failing it as if the trial itself were at fault; and does an error mean that
a server that answered refused a call (`server_rejected`), so that the trial is retried with the same
params. Torch-free."""

from __future__ import annotations

import sys

import requests
import sqlalchemy
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from alexnet import UsageError
from alexnet.redact import first_line, redact

DRIVER_HINT = "install the PostgreSQL driver: pip install 'alexnet-sweeps[team]' (psycopg), URLs postgresql+psycopg://..."
PASSWORD_HINT = "the password comes from PGPASSWORD or ~/.pgpass, never from the URL on a command line"


def engine(url: str | URL) -> sqlalchemy.Engine:
    """An engine that opens a fresh connection each time and gives up on an unreachable server in 10 s."""
    connect_args = {"connect_timeout": 10} if make_url(url).get_backend_name() == "postgresql" else {}
    return sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=connect_args)


def check_database(url: str, what: str) -> None:
    """Connect once to the database of `url`; a UsageError in one line if it does not answer. SQLite
    files are made on first use: nothing to check."""
    if url.startswith("sqlite"):
        return
    try:
        with engine(url).connect():
            pass
    except ImportError as e:
        raise UsageError(f"{what}: {redact(url)} needs its database driver ({first_line(e)}): {DRIVER_HINT}") from None
    except Exception as e:
        raise UsageError(f"{what}: cannot reach the database {redact(url)} ({first_line(e)}): start it or fix the "
                         f"URL ({PASSWORD_HINT})") from None


def lost_connection(error: BaseException | None) -> str | None:
    """'the tracking server' or 'the database' if `error`, or an error behind it, says the connection to it
    was lost (refused, reset, timed out, or the server answering only errors until MLflow's retries ran
    out); else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                              requests.exceptions.RetryError)):
            return "the tracking server"
        if isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or \
                (isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated):
            return "the database"
        error = error.__cause__ or error.__context__
    return None


def server_rejected(error: BaseException | None) -> str | None:
    """'the tracking server' or 'the database' if `error`, or an error behind it, is a server that answered
    refusing a call: MLflow's tracking server (any RestException: it returns the errors of its own
    database, such as two writers colliding on a key, as BAD_REQUEST) or a database's error (a SQL
    tracking store, the Optuna storage). Not the trial's params' doing, as divergence or a bad value is."""
    rest = sys.modules.get("mlflow.exceptions")  # an MLflow error comes only from a process that imported it
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if rest is not None and isinstance(error, rest.RestException):
            return "the tracking server"
        if isinstance(error, sqlalchemy.exc.SQLAlchemyError):
            return "the database"
        error = error.__cause__ or error.__context__
    return None
