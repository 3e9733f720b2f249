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
    except Exception as e:
        raise UsageError(f"{what}: {database_trouble(url, e)}") from None


NOT_A_URL_HINT = "use an RDB URL such as postgresql+psycopg://USER@HOST:PORT/DB or sqlite:////ABS/PATH/optuna.db"


def database_trouble(url: str, error: BaseException) -> str:
    """Why a database did not open, in one line, with what to do about it: its driver is missing, the URL
    is no database URL, the server refused the login, it has no such database, or nothing answers there.
    PostgreSQL's and MySQL's own words tell them apart (the drivers raise one OperationalError for all)."""
    shown = redact(str(url))
    if isinstance(error, ImportError):
        return f"{shown} needs its database driver ({first_line(error)}): {DRIVER_HINT}"
    if isinstance(error, sqlalchemy.exc.ArgumentError):  # unparsable, or a scheme no dialect has
        return f"{shown} is not a database URL ({first_line(error)}): {NOT_A_URL_HINT}"
    try:
        parts = make_url(url)
        user, host, port, name = parts.username, parts.host, parts.port, parts.database
    except Exception:
        user = host = port = name = None
    text = str(getattr(error, "orig", None) or error)
    said = redact(text.split(" failed: ")[-1].splitlines()[0].replace("FATAL:  ", "").strip())
    kind = trouble_kind(error)
    if kind == "login":
        return (f"the database server refused the login of user {user!r} to {shown} ({said}): give the role's "
                f"password in PGPASSWORD, or a line HOST:PORT:DATABASE:USER:PASSWORD in ~/.pgpass (mode 600), where "
                f"this command and every worker run; never in the URL on a command line")
    if kind == "database":
        return (f"the database server has no database {name!r} ({said}): create it (`alexnet server` creates "
                f"alexnet_mlflow and alexnet_optuna), or fix the database name in {shown}")
    if kind == "down":
        return (f"cannot reach the database {shown}: nothing answers at {host}:{port or 'the default port'} ({said}): "
                f"start the database server, or fix the host and port")
    if str(url).startswith("sqlite"):
        return (f"cannot open the SQLite database {shown} ({first_line(error)}): its folder must exist and be "
                f"writable; name it by an absolute path, sqlite:////ABS/PATH/optuna.db")
    return f"cannot reach the database {shown} ({first_line(error)}): start it or fix the URL ({PASSWORD_HINT})"


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


def trouble_kind(error: BaseException) -> str | None:
    """'login' (the server refused the user or its password), 'database' (no such database), 'down' (nothing
    answers at that address), or None, from the driver's own words."""
    text = str(getattr(error, "orig", None) or error)
    if any(w in text for w in ("no password supplied", "password authentication failed", "Access denied for user")):
        return "login"
    if "does not exist" in text and "database" in text or "Unknown database" in text:
        return "database"
    if any(w in text for w in ("Connection refused", "failed to resolve host", "could not translate host",
                               "timeout expired", "No route to host", "Can't connect to MySQL")):
        return "down"
    return None
