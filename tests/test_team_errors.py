"""The team's set-up going wrong, in one line each: servers that do not answer at start (nothing is
created), a password on a command line (refused, never echoed), Ray options without Ray, and a worker
that loses the tracking server mid-trial (a real `mlflow server`, killed): it stops in one line and its
trial is queued again for another worker; a worker that loses the database behind the Optuna storage (a
real PostgreSQL, stopped): it stops in one line, and the same command retries the trial once the
database is back."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from filelock import FileLock

from alexnet.compare import ui
from conftest import ROOT, default_sigint, wait_for

SWEEP = """
study = "lost"
n_trials = 1
pruner = "none"
heartbeat_seconds = 1
grace_seconds = 4
[space]
lr = { low = 0.005, high = 0.05, log = true }
[set]
resize = 67
train_limit = 256
val_size = 200
test_limit = 200
batch_size = 64
epochs = 3
"""


def alexnet(home: Path, *args, env=None, timeout=120):
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ALEXNET_STORAGE", "PGPASSWORD")}
    return subprocess.run([sys.executable, "-m", "alexnet", *map(str, args)], cwd=home, capture_output=True, text=True,
                          timeout=timeout, env={**base, "ALEXNET_HOME": str(home), **(env or {})})


def launch_logged(command: list, cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """The command in the background, its output in the file `log`: a pipe nobody reads until the end can
    fill and stall it. Ctrl-C acts on it as in a terminal."""
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=default_sigint)


def closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again once this returns: nothing listens there


@pytest.mark.parametrize("args,message", [
    (["--storage", "postgresql+psycopg://alexnet@127.0.0.1:{port}/alexnet_optuna"],
     "sweep: --storage: cannot reach the database postgresql+psycopg://alexnet@127.0.0.1:{port}/alexnet_optuna"),
    (["--tracking-uri", "http://127.0.0.1:{port}"], "tracking: cannot reach the tracking server http://127.0.0.1:{port}"),
    (["--ray", "auto"], "sweep: --ray: the workers run on other machines: the tracking store must be a tracking server"),
    (["--ray", "127.0.0.1:{port}", "--tracking-uri", "http://user:hunter2@127.0.0.1:{port}",
      "--storage", "postgresql+psycopg://alexnet@127.0.0.1:{port}/alexnet_optuna"],
     "sweep: --ray: the tracking URI carries a credential, which would travel with every task"),
    (["--gpus-per-worker", "1"], "--gpus-per-worker and --cpus-per-worker ask Ray for resources: add --ray ADDRESS"),
])
def test_a_sweep_whose_servers_do_not_answer_stops_in_one_line_creating_nothing(tmp_path, args, message):
    (tmp_path / "s.toml").write_text(SWEEP)
    port = closed_port()
    result = alexnet(tmp_path, "sweep", "s.toml", *[a.format(port=port) for a in args])
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message.format(port=port) in result.stderr
    assert "hunter2" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]  # no store was created


def test_the_server_refuses_a_password_on_its_command_line_without_echoing_it(tmp_path):
    result = alexnet(tmp_path, "server", "--database", "postgresql+psycopg://alexnet:hunter2@127.0.0.1:5432",
                     "--artifacts", tmp_path / "a", "--host", "127.0.0.1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--database carries a password" in result.stderr and "hunter2" not in result.stderr
    wide = alexnet(tmp_path, "server", "--database", "postgresql+psycopg://alexnet@127.0.0.1:5432",
                   "--artifacts", tmp_path / "a", "--host", "0.0.0.0")
    assert wide.returncode == 2 and "also pass --allowed-hosts" in wide.stderr
    assert not (tmp_path / "a").exists()


def test_a_worker_that_loses_the_tracking_server_mid_trial_stops_in_one_line_and_queues_its_trial(tmp_path):
    """A real `mlflow server` (SQLite behind it, served artifacts), SIGKILLed while the trial trains; MLflow's
    client retries are turned off so the loss shows at once."""
    (tmp_path / "s.toml").write_text(SWEEP)
    port = closed_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'server.db'}", "--serve-artifacts", "--artifacts-destination",
                               tmp_path / "artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    server.log_path = os.devnull
    uri = f"http://127.0.0.1:{port}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    try:
        ui.wait_ready(server, uri)
        log = tmp_path / "launcher.log"
        launcher = launch_logged(
            [sys.executable, "-m", "alexnet", "sweep", "s.toml", "--storage", storage, "--tracking-uri", uri], tmp_path,
            {**os.environ, "ALEXNET_HOME": str(tmp_path), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}, log)
        client = mlflow.MlflowClient(tracking_uri=uri)

        def training():  # the trial's run exists and has logged its first epoch
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`sweep.trial` = '0'")
            return runs and "test/acc" in runs[0].data.metrics
        wait_for(training, 180, "the trial to train its first epoch", every=0.3, proc=launcher, log=log)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        launcher.wait(timeout=180)
        err = log.read_text()
    finally:
        for proc in (server, locals().get("launcher")):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL) if proc is server else proc.kill()
                proc.wait()
    lines = [line for line in err.splitlines() if "worker 0: error:" in line]
    assert len(lines) == 1 and "lost the tracking server during trial 0" in lines[0], err[-3000:]
    assert "the trial is queued again for another worker" in lines[0]
    assert "Traceback" not in err and launcher.returncode == 1
    assert "alexnet sweep: error: lost the tracking server" in err  # the launcher too, in one line
    trials = optuna.load_study(study_name="lost", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"] and trials[1].params == trials[0].params


def postgres_missing() -> str:
    import glob
    from importlib.util import find_spec

    if not (glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb")):
        return "PostgreSQL is not installed (scripts/setup --test installs it)"
    return "" if find_spec("psycopg") else "psycopg is not installed (pip install -e '.[team]')"


@pytest.mark.skipif(bool(postgres_missing()), reason=postgres_missing())
def test_a_worker_that_loses_the_database_mid_trial_stops_in_one_line_and_the_same_command_retries_it(tmp_path):
    """A real PostgreSQL behind the Optuna storage (scripts/throwaway-postgres), stopped while the trial trains:
    the worker and the launcher stop in one line each, the trial's run does not stay RUNNING, and once the
    database is back the same command fails the trial by its stale heartbeat and trains it again."""
    import psycopg

    # Its folder: short (the server's socket lives there) and where the `postgres` user can reach it as root.
    script, pg, port = ROOT / "scripts" / "throwaway-postgres", Path(tempfile.mkdtemp(prefix="alexnet-pg-")), closed_port()
    url = subprocess.run(["bash", script, "start", pg, str(port)], capture_output=True, text=True, check=True).stdout
    password = (pg / "password").read_text().strip()
    launcher = None
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="alexnet", password=password, dbname="postgres",
                             autocommit=True) as db:
            db.execute("CREATE DATABASE lost_optuna")
        storage = f"{url.strip()}/lost_optuna"
        (tmp_path / "s.toml").write_text(SWEEP)
        env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ALEXNET_STORAGE")},
               "ALEXNET_HOME": str(tmp_path), "PGPASSWORD": password}
        command = [sys.executable, "-m", "alexnet", "sweep", "s.toml", "--storage", storage]
        log = tmp_path / "launcher.log"
        launcher = launch_logged(command, tmp_path, env, log)
        def trial_runs():
            if not (tmp_path / "mlruns" / "mlflow.db").exists():
                return []
            # The launcher creates the database under this lock (store.set_up_store). An MlflowClient opens its
            # store as it is made: made before the database, or while it is half-made, it would run MLflow's
            # table creation beside the launcher's.
            with FileLock(str(tmp_path / "mlruns" / ".mlflow.db.lock")):
                client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}?timeout=60")
            return client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      "tags.`sweep.role` = 'trial'")

        wait_for(lambda: any("test/acc" in r.data.metrics for r in trial_runs()), 180,
                 "the trial to train its first epoch", every=0.3, proc=launcher, log=log)
        subprocess.run(["bash", script, "stop", pg], capture_output=True, check=True)
        launcher.wait(timeout=180)
        err = log.read_text()
        lines = [line for line in err.splitlines() if "worker 0: error:" in line]
        assert len(lines) == 1 and "lost the database" in lines[0], err[-3000:]
        assert "Traceback" not in err and launcher.returncode != 0
        assert [r.info.status for r in trial_runs()] != ["RUNNING"]  # ended, not left running

        subprocess.run(["bash", script, "start", pg, str(port)], capture_output=True, check=True)
        time.sleep(5)  # the trial's last heartbeat is now older than grace_seconds (4)
        again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        trials = optuna.load_study(study_name="lost", storage=storage.replace("alexnet@", f"alexnet:{password}@")).trials
        assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"] and trials[1].params == trials[0].params
        assert sorted(r.info.status for r in trial_runs())[-1] == "FINISHED" and len(trial_runs()) == 2
    finally:
        if launcher is not None and launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        subprocess.run(["bash", script, "stop", pg], capture_output=True)
        shutil.rmtree(pg, ignore_errors=True)
