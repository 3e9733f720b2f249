"""`alexnet server`: the team's tracking server, on a PostgreSQL server the team runs.

It creates two databases there if they are missing (`alexnet_mlflow` for MLflow's runs, `alexnet_optuna`
for the Optuna studies: the two must not share one, both keep an `alembic_version` table) and Optuna's
tables (once, here, before many workers open them at the same moment); then it starts `mlflow server` on
the first with served artifacts (`--serve-artifacts --artifacts-destination DIR`: workers upload
checkpoints and models through the server, so no shared file system is needed), bound to an explicit
host with explicit allowed Host headers, one worker process and MLflow's job runner off. Once `/health`
answers it prints what every worker exports, then runs until Ctrl-C or SIGTERM, which stop the server.

The database password is never on a command line, in a log or in a store: it comes from PGPASSWORD (or
~/.pgpass, which libpq reads) or from `--password-file`, and reaches the MLflow server through its
environment. The URLs this command builds, prints and passes on carry none.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import sqlalchemy
from sqlalchemy.engine import URL, make_url

from alexnet import UsageError
from alexnet.compare import ui
from alexnet.sweep.study import rdb_storage
from alexnet.team.backends import DRIVER_HINT, PASSWORD_HINT, database_trouble, engine, trouble_kind
from alexnet.redact import first_line, redact

MLFLOW_DB, OPTUNA_DB = "alexnet_mlflow", "alexnet_optuna"


def server_url(database: str) -> URL:
    """`--database`, checked: a PostgreSQL server URL (`postgresql+psycopg://USER@HOST:PORT`), no password
    in it, no database named."""
    try:
        url = make_url(database)
    except Exception:
        raise UsageError(f"server: --database {redact(database)!r} is not a URL like "
                         f"postgresql+psycopg://USER@HOST:5432") from None
    if url.get_backend_name() != "postgresql":
        raise UsageError(f"server: --database {redact(database)} is not PostgreSQL (want postgresql+psycopg://USER@HOST:PORT)")
    if url.password is not None:
        raise UsageError("server: --database carries a password, which a command line shows to every user of the "
                         "machine (ps) and leaves in the shell's history: drop it from the URL and export PGPASSWORD, "
                         "or pass --password-file")
    if url.database:
        raise UsageError(f"server: --database names the server only (postgresql+psycopg://USER@HOST:PORT); "
                         f"the databases are --mlflow-db ({MLFLOW_DB}) and --optuna-db ({OPTUNA_DB})")
    return url


def read_password(path: str) -> str:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UsageError(f"server: cannot read --password-file {path} ({e.strerror})") from None
    if not lines or not lines[0].strip():
        raise UsageError(f"server: --password-file {path} is empty (want the password on its first line)")
    return lines[0].strip()


def create_databases(url: URL, names: list[str]) -> list[str]:
    """Create each database that is missing; returns those created."""
    created = []
    try:
        # CREATE DATABASE cannot run inside a transaction: autocommit, from the maintenance database.
        with engine(url.set(database="postgres")).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for name in names:
                if conn.execute(sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                                {"name": name}).first() is None:
                    conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
                    created.append(name)
    except ImportError as e:
        raise UsageError(f"server: {first_line(e)}: {DRIVER_HINT}") from None
    except Exception as e:
        if trouble_kind(e) in ("login", "down"):  # not about creating databases: say what is wrong, and its fix
            raise UsageError(f"server: --database: {database_trouble(url.set(password=None).render_as_string(), e)}") from None
        raise UsageError(f"server: cannot create the databases {', '.join(names)} on {redact(url.render_as_string())} "
                         f"({first_line(e)}): check the server, the user and its CREATEDB right, or create them "
                         f"yourself ({PASSWORD_HINT})") from None
    return created


def advertised_url(host: str, port: int, allowed_hosts: str) -> str:
    """The URL workers use: the first allowed host name (with this port unless it names one), or the
    loopback address."""
    names = [h.strip() for h in allowed_hosts.split(",") if h.strip() and "*" not in h]
    if host in ui.LOOPBACK or not names:
        return f"http://{'127.0.0.1' if host in ui.LOOPBACK else host}:{port}"
    first = names[0] if re.search(r":\d+$", names[0]) else f"{names[0]}:{port}"
    return f"http://{first}"


def start(backend_uri: str, artifacts: str, host: str, port: int, allowed_hosts: str,
          log_path: str | Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` on `backend_uri` with served artifacts; returns (process, base URL for this
    machine)."""
    return ui.launch("server", ["--serve-artifacts", "--artifacts-destination", artifacts, "--allowed-hosts",
                                allowed_hosts], backend_uri, host, port, log_path)


def serve(database: str, artifacts: str, host: str, port: int, allowed_hosts: str | None,
          password_file: str | None, mlflow_db: str, optuna_db: str) -> int:
    """`alexnet server`: databases, Optuna's tables, the MLflow server; print the exports; wait for Ctrl-C."""
    url = server_url(database)
    for name in (mlflow_db, optuna_db):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
            raise UsageError(f"server: database name {name!r}: use letters, digits and _")
    if mlflow_db == optuna_db:
        raise UsageError("server: MLflow and Optuna need databases of their own (both keep an alembic_version table)")
    if host not in ui.LOOPBACK and not allowed_hosts:
        raise UsageError(f"server: --host {host} serves every run to the network: also pass --allowed-hosts with the "
                         f"names workers use (e.g. --allowed-hosts {socket.gethostname()}:{port})")
    allowed_hosts = allowed_hosts or f"127.0.0.1:{port},localhost:{port}"
    if password_file:
        os.environ["PGPASSWORD"] = read_password(password_file)  # libpq reads it, here and in the server
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).expanduser().resolve())
        Path(artifacts).mkdir(parents=True, exist_ok=True)

    created = create_databases(url, [mlflow_db, optuna_db])
    storage = url.set(database=optuna_db).render_as_string()
    rdb_storage(storage).engine.dispose()  # Optuna's tables, made once
    proc, base = start(url.set(database=mlflow_db).render_as_string(), artifacts, host, port, allowed_hosts)

    def ready():
        print("# on every worker (and the database password as PGPASSWORD, or in ~/.pgpass):")
        print(f"export MLFLOW_TRACKING_URI={advertised_url(host, port, allowed_hosts)}")
        print(f"export ALEXNET_STORAGE={storage}", flush=True)
        print(f"server: ready at {base}; server log {proc.log_path}; Ctrl-C stops it", file=sys.stderr)

    return ui.serve_until_stopped(proc, base, "server: mlflow server",
                                  f"server: databases {mlflow_db} and {optuna_db} on {redact(url.render_as_string())}"
                                  f"{f' (created {len(created)})' if created else ''}; artifacts in {artifacts}; "
                                  f"starting mlflow server ...", ready)
