"""Failures said in one line each, with the hint that fits: database errors told apart against a real
throw-away PostgreSQL (scripts/throwaway-postgres): a refused login, an unknown database, a server that is
down, a URL that is no database URL; each exit 2 with nothing created. And no library text reaches a user:
an empty leaderboard is one line, never pandas' "Empty DataFrame"."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from alexnet import UsageError
from alexnet.compare import runs
from conftest import ROOT
from test_team_errors import closed_port, postgres_missing

SWEEP = """
study = "db"
n_trials = 1
pruner = "none"
[space]
lr = { low = 0.005, high = 0.05, log = true }
[set]
resize = 67
train_limit = 256
val_size = 200
test_limit = 200
epochs = 1
"""


def alexnet(home: Path, *args, env=None):
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ALEXNET_STORAGE", "PGPASSWORD")}
    return subprocess.run([sys.executable, "-m", "alexnet", *map(str, args)], cwd=home, capture_output=True, text=True,
                          timeout=120, env={**base, "ALEXNET_HOME": str(home), "PGPASSFILE": str(home / "no-pgpass"),
                                            **(env or {})})


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL on loopback: (URL of its server without a database, the role's password)."""
    if postgres_missing():
        pytest.skip(postgres_missing())
    script, folder, port = ROOT / "scripts" / "throwaway-postgres", Path(tempfile.mkdtemp(prefix="alexnet-pg-")), closed_port()
    url = subprocess.run(["bash", script, "start", folder, str(port)], capture_output=True, text=True, check=True)
    try:
        yield url.stdout.strip(), (folder / "password").read_text().strip()
    finally:
        subprocess.run(["bash", script, "stop", folder], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def refused(result, *words):
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    for w in words:
        assert w in result.stderr, result.stderr
    assert "sqlite:////ABS/PATH" not in result.stderr  # the hint for a bad URL, wrong for these
    assert "Traceback" not in result.stderr and "sqlalche.me" not in result.stderr


def only_the_sweep_file(home: Path):
    assert sorted(p.name for p in home.iterdir()) == ["s.toml"]  # no store, no study, no folder


def test_a_refused_password_says_where_the_password_comes_from(tmp_path, postgres):
    url, password = postgres
    (tmp_path / "s.toml").write_text(SWEEP)
    none = alexnet(tmp_path, "sweep", "s.toml", "--storage", f"{url}/postgres")
    refused(none, "the database server refused the login of user 'alexnet'", "no password supplied", "PGPASSWORD",
            "~/.pgpass")
    wrong = alexnet(tmp_path, "sweep", "s.toml", "--storage", f"{url}/postgres", env={"PGPASSWORD": "not-" + password})
    refused(wrong, "refused the login of user 'alexnet'", "password authentication failed", "PGPASSWORD")
    assert "not-" + password not in wrong.stderr
    only_the_sweep_file(tmp_path)


def test_the_team_server_says_its_login_was_refused(tmp_path, postgres):
    url, _ = postgres
    result = alexnet(tmp_path, "server", "--database", url, "--artifacts", tmp_path / "artifacts", "--host", "127.0.0.1")
    refused(result, "server: --database: the database server refused the login of user 'alexnet'", "PGPASSWORD")


def test_an_unknown_database_is_named(tmp_path, postgres):
    url, password = postgres
    (tmp_path / "s.toml").write_text(SWEEP)
    result = alexnet(tmp_path, "sweep", "s.toml", "--storage", f"{url}/no_such_db", env={"PGPASSWORD": password})
    refused(result, "the database server has no database 'no_such_db'", "alexnet server")
    assert "PGPASSWORD" not in result.stderr  # the login was fine
    only_the_sweep_file(tmp_path)


def test_a_server_that_is_down_says_nothing_answers(tmp_path):
    (tmp_path / "s.toml").write_text(SWEEP)
    port = closed_port()
    result = alexnet(tmp_path, "sweep", "s.toml", "--storage", f"postgresql+psycopg://alexnet@127.0.0.1:{port}/optuna",
                     env={"PGPASSWORD": "x"})
    refused(result, f"cannot reach the database postgresql+psycopg://alexnet@127.0.0.1:{port}/optuna",
            f"nothing answers at 127.0.0.1:{port}", "Connection refused", "start the database server")
    only_the_sweep_file(tmp_path)


@pytest.mark.parametrize("storage, words", [
    ("localhost:5432/optuna", "is not a database URL"),
    ("http://127.0.0.1:5000", "is a web address, not a database URL: the tracking server goes to --tracking-uri"),
])
def test_a_url_that_is_no_database_url(tmp_path, storage, words):
    (tmp_path / "s.toml").write_text(SWEEP)
    result = alexnet(tmp_path, "sweep", "s.toml", "--storage", storage)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert words in result.stderr and "sqlite:////ABS/PATH/optuna.db" in result.stderr
    only_the_sweep_file(tmp_path)


def test_a_worker_without_the_password_is_told_so(home, postgres):
    """A worker opens the storage itself (a Ray node, another terminal): a refused login there gets the same
    hint, not the one for a bad URL. And `confirm` on a database that is not there names it."""
    import dataclasses

    from alexnet.sweep import study
    from alexnet.sweep.spec import load_sweep

    url, password = postgres
    (home / "s.toml").write_text(SWEEP)
    os.environ.pop("PGPASSWORD", None)
    sweep = dataclasses.replace(load_sweep(home / "s.toml"), storage=f"{url}/postgres")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGPASSFILE", str(home / "no-pgpass"))
        with pytest.raises(UsageError) as e:
            study.open_storage(sweep)
        assert "refused the login of user 'alexnet'" in str(e.value) and "PGPASSWORD" in str(e.value)
        patch.setenv("PGPASSWORD", password)
        with pytest.raises(UsageError) as e:
            study.load_study("db", f"{url}/missing_optuna")
        assert "confirm: the Optuna storage: the database server has no database 'missing_optuna'" in str(e.value)


def test_an_empty_board_is_one_line(home, monkeypatch):
    """A sweep whose workers all failed has no trial runs: its summary ends with one line, not pandas' repr."""
    monkeypatch.setattr(runs, "search", lambda *a, **k: pd.DataFrame())
    board = runs.leaderboard(sweep="demo", limit=10)
    assert runs.format_table(board, {"sweep": "demo"}) == "no runs in sweep 'demo' yet"
    assert runs.format_table(board).startswith("no runs in experiment 'alexnet-fashion-mnist' yet")
    board.attrs["selected"] = 1  # its parent run only: the trial filter left nothing
    text = runs.format_table(board, {"sweep": "demo"})
    assert text == "no trial runs in sweep 'demo' yet (no trial started a run)"
    for leak in ("Empty DataFrame", "Columns:", "Index:"):
        assert leak not in text
