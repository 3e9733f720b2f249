"""Every bad input is refused before a run exists: exit status 2, at most two lines on stderr besides
argparse's own usage block, no traceback, and the store that was there before unchanged row for row.

The commands run in this process (`cli.main`, stderr captured at the file descriptor, so MLflow's and
torch's own log lines count too); two of them also run as real processes."""

import gzip
import os
import socket
import sqlite3
import subprocess
import sys

import mlflow
import optuna
import pytest

from alexnet import cli
from alexnet.training import datafiles
from alexnet.tracking import store
from alexnet.home import mlruns_dir
from conftest import ROOT

SWEEP = "[space]\nlr = { low = 0.001, high = 0.1, log = true }\n[set]\nresize = 67\ntrain_limit = 64\nepochs = 1\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A project home whose stores already hold a finished run and a study; files good and bad."""
    home = tmp_path_factory.mktemp("world")
    mp = pytest.MonkeyPatch()
    mp.setenv("ALEXNET_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    store.set_up_store()
    client = mlflow.MlflowClient()
    run = client.create_run(store.experiment_id(store.DEFAULT_EXPERIMENT), run_name="kept")
    client.log_param(run.info.run_id, "lr", "0.1")
    client.log_metric(run.info.run_id, "test/best_acc", 0.5, step=1)
    client.set_terminated(run.info.run_id, "FINISHED")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="known", storage=f"sqlite:///{mlruns_dir() / 'optuna.db'}")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    files = home / "files"
    files.mkdir()
    (files / "binary.toml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    (files / "unknown.toml").write_text("learning_rate = 0.1\n")
    (files / "sweep.toml").write_text(SWEEP)
    (files / "sweep-binary.toml").write_bytes(b"\xff\xfe\x00garbage")
    (files / "sweep-unknown.toml").write_text("n_trial = 3\n" + SWEEP)
    (files / "sweep-inverted.toml").write_text(SWEEP.replace("low = 0.001, high = 0.1", "low = 0.1, high = 0.001"))
    (files / "sweep-split.toml").write_text(SWEEP.replace("[space]\n", "[space]\nsplit_seed = { low = 0, high = 5 }\n"))
    (files / "a-file").write_text("not a folder")
    (files / "empty").mkdir()
    corrupt = files / "corrupt"
    corrupt.mkdir()
    source = datafiles.source_dirs()
    for name in datafiles.FILES:
        found = next(p for _, folder, _ in source if (p := datafiles._find(folder, name)))
        content = found.read_bytes() if found.suffix == ".gz" else gzip.compress(found.read_bytes())
        (corrupt / f"{name}.gz").write_bytes(content[: len(content) // 2] if "t10k-labels" in name else content)
    yield home, files
    mp.undo()


def snapshot(home):
    """Every row of every table of both databases, and the artifact files."""
    rows = {}
    for db in ("mlflow.db", "optuna.db"):
        with sqlite3.connect(home / "mlruns" / db) as conn:
            for (table,) in conn.execute("select name from sqlite_master where type = 'table'"):
                rows[(db, table)] = sorted(map(repr, conn.execute(f"select * from {table}")))
    rows["artifacts"] = sorted(str(p.relative_to(home)) for p in (home / "mlruns" / "artifacts").rglob("*"))
    return rows


def taken_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


F = "{files}"
UNREACHABLE = "http://127.0.0.1:9"
CASES = [
    # train
    (["train", f"{F}/binary.toml"], "not a text file"),
    (["train", f"{F}/unknown.toml"], "unknown key 'learning_rate'"),
    (["train", f"{F}/missing.toml"], "no such file"),
    (["train", f"{F}/empty"], "is a folder"),
    (["train"], "name an experiment file"),
    (["train", "experiments/smoke.toml", "--set", "dropout=1"], "0 <= dropout < 1"),
    (["train", "experiments/smoke.toml", "--set", "lr=fast"], "lr must be a number"),
    (["train", "experiments/smoke.toml", "--set", "resize=32"], "67 <= resize"),
    (["train", "experiments/smoke.toml", "--set", "device=cuda"], "no CUDA GPU"),
    (["train", "experiments/smoke.toml", "--set", "device=cuda:7"], "no CUDA GPU"),
    (["train", "experiments/smoke.toml", "--set", "device=tpu"], "cuda:N"),
    (["train", "experiments/smoke.toml", "--set", f"data_dir={F}/empty"], "holds no Fashion-MNIST files"),
    (["train", "experiments/smoke.toml", "--set", f"data_dir={F}/nowhere"], "does not exist"),
    (["train", "experiments/smoke.toml", "--set", f"data_dir={F}/corrupt"], "t10k-labels-idx1-ubyte.gz is corrupt"),
    (["train", "experiments/smoke.toml", "--tracking-uri", UNREACHABLE], "cannot reach the tracking server"),
    (["train", "experiments/smoke.toml", "--tracking-uri", "nosuchscheme://x"], "cannot use the tracking store"),
    (["train", "--resume", "0123456789abcdef0123456789abcdef"], "no run '0123456789abcdef0123456789abcdef'"),
    (["train", "--resume", "abc", "experiments/smoke.toml"], "drop the experiment file"),
    # sweep
    (["sweep", f"{F}/sweep-binary.toml"], "not a text file"),
    (["sweep", f"{F}/sweep-unknown.toml"], "unknown key 'n_trial'"),
    (["sweep", f"{F}/sweep-inverted.toml"], "low 0.1 > high 0.001"),
    (["sweep", f"{F}/sweep-split.toml"], "space.split_seed: the validation split decides what trials are compared on"),
    (["sweep", f"{F}/sweep.toml", "--storage", "oracle+oracledb://u@db/x"], "only sqlite, postgresql, mysql"),
    (["sweep", f"{F}/sweep.toml", "--storage", f"sqlite:///{F}/a-file/optuna.db"], "cannot make the folder"),
    (["sweep", f"{F}/sweep.toml", "--workers", "0"], "--workers: want 1 or more"),
    (["sweep", f"{F}/sweep.toml", "--n-trials", "-1"], "--n-trials: want 0 or more"),
    (["sweep", f"{F}/sweep.toml", "--set", "device=cuda"], "shows no NVIDIA GPU"),
    (["sweep", f"{F}/sweep.toml", "--set", f"data_dir={F}/empty"], "holds no Fashion-MNIST files"),
    (["sweep", f"{F}/sweep.toml", "--tracking-uri", UNREACHABLE], "cannot reach the tracking server"),
    # confirm
    (["confirm", "nosuch"], "no study 'nosuch'"),
    (["confirm", "known"], "was not made by `alexnet sweep`"),
    (["confirm", "known", "--top", "0"], "--top: want 1 or more"),
    (["confirm", "known", "--seeds", "1"], "--seeds: want 2 or more"),
    (["confirm", "known", "--storage", f"sqlite:///{F}/missing.db"], "no sweeps yet"),
    # runs
    (["runs", "--experiment", "nope"], "no experiment 'nope'"),
    (["runs", "--sort", "nosuchcolumn"], "cannot sort by 'nosuchcolumn'"),
    (["runs", "--status", "bogus"], "invalid choice: 'BOGUS'"),
    (["runs", "--limit", "0"], "--limit: want 1 or more"),
    (["runs", "--tracking-uri", UNREACHABLE], "cannot reach the tracking server"),
    # ui
    (["ui", "--port", "70000"], "--port: want 1 to 65535"),
    (["ui", "--host", "0.0.0.0"], "also pass --allowed-hosts"),
    (["ui", "--port", "{taken}"], "cannot listen on 127.0.0.1"),
    (["ui", "--host", "no-such-host.invalid", "--allowed-hosts", "x"], "cannot listen on no-such-host.invalid"),
    (["ui", "--experiment", "nope"], "no experiment 'nope'"),
    # summary
    (["summary", "--resize", "50"], "resize >= 67"),
    (["summary", "--resize", "big"], "--resize: want an integer"),
]


def test_bad_inputs_exit_2_in_one_or_two_lines_and_leave_the_store_as_it_was(world, capfd, monkeypatch):
    home, files = world
    monkeypatch.setenv("ALEXNET_HOME", str(home))
    before = snapshot(home)
    port = taken_port()
    try:
        for argv, words in CASES:
            argv = [a.replace(F, str(files)).replace("{taken}", str(port.getsockname()[1])) for a in argv]
            os.environ.pop("MLFLOW_TRACKING_URI", None)  # each command sets it for its children
            try:
                status = cli.main(argv)
            except SystemExit as e:  # argparse's own errors
                status = e.code
            finally:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            err = capfd.readouterr().err
            lines = [line for line in err.splitlines() if line.strip()]
            if lines and lines[0].startswith("usage:"):  # argparse's usage block, then its one error line
                lines = [line for line in lines if line.startswith("alexnet")]
            assert status == 2, (argv, err)
            assert 1 <= len(lines) <= 2, (argv, err)
            assert "Traceback" not in err, (argv, err)
            assert words in err, (argv, err)
            assert snapshot(home) == before, argv
    finally:
        port.close()


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ALEXNET_STORAGE")}
    return {**env, **extra}


def test_as_real_processes_too(world):
    """Two of the cases as a user meets them: a fresh process, its exit status and its whole stderr."""
    home, files = world
    for argv, words in [(["train", str(files / "binary.toml")], "not a text file"),
                        (["train", "experiments/smoke.toml", "--set", "device=cuda"], "no CUDA GPU")]:
        result = subprocess.run([sys.executable, "-m", "alexnet", *argv], cwd=ROOT, capture_output=True, text=True,
                                timeout=120, env=clean_env(ALEXNET_HOME=str(home)))
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and words in result.stderr, result.stderr


def test_a_first_command_on_a_fresh_home_prints_none_of_mlflows_own_lines(tmp_path):
    """The first command creates the store: MLflow's "Creating initial MLflow database tables..." and its
    migration lines are not the user's business."""
    result = subprocess.run([sys.executable, "-m", "alexnet", "runs"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env=clean_env(ALEXNET_HOME=str(tmp_path)))
    assert result.returncode == 0 and (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert "INFO" not in result.stderr and "database tables" not in result.stderr, result.stderr


@pytest.mark.parametrize("refused", ["host", "port"])
def test_a_ui_refused_for_its_host_or_port_leaves_a_fresh_store_uncreated(home, capfd, refused):
    """Refused before the store is opened: no database, no experiment made for a command that did not run."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = ["ui", "--host", "0.0.0.0"] if refused == "host" else ["ui", "--port", str(busy.getsockname()[1])]
        assert cli.main(args) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and ("--allowed-hosts" if refused == "host" else "cannot listen") in err
    assert not (home / "mlruns" / "mlflow.db").exists()
