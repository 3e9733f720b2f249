"""Scaling out against real servers, as the README's "Scaling out" recipe does it, on loopback and tiny:
a throw-away PostgreSQL cluster (`scripts/throwaway-postgres`; as root its server runs as `postgres`), the
team's MLflow tracking server on it (`alexnet server`, served artifacts), a local Ray head (`ray start
--head`), and three workers that share no folder: one plain `alexnet sweep FILE` and two placed by Ray
(`alexnet sweep FILE --ray auto --workers 2`), each launcher with its own ALEXNET_HOME, data cache and
working folder (the Ray node has its own, and each Ray task a scratch folder of its own). Checkpoints and
models travel through the tracking server only.

Ray is told to stay on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: otherwise it advertises this
machine's network address, even for `--node-ip-address=127.0.0.1`). Everything a fixture starts is
stopped in its `finally`, Ray by ending only the processes of its own temp folder (`ray stop` would end
every Ray cluster of the machine).

Skips, saying why, only where PostgreSQL, psycopg or Ray are not installed: `scripts/setup --test`
(which `.ci/run` calls) installs all three.
"""

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

import mlflow
import optuna
import psutil
import pytest

from conftest import ROOT, wait_for

MISSING = [what for what, there in [
    ("PostgreSQL (apt-get install postgresql)", glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb")),
    ("psycopg (pip install -e '.[team]')", find_spec("psycopg")),
    ("Ray (pip install -e '.[ray]')", find_spec("ray")),
] if not there]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)} (scripts/setup --test installs them)")

SWEEP = """
study = "{study}"
n_trials = {n_trials}
pruner = "none"
keep_top = 2
heartbeat_seconds = 1
grace_seconds = 5

[space]
lr = {{ low = 0.005, high = 0.05, log = true }}

[set]
resize = 67
train_limit = 256
val_size = 200
test_limit = 200
batch_size = 64
epochs = 1
"""
SHARED = ("MLFLOW_TRACKING_URI", "ALEXNET_STORAGE", "ALEXNET_HOME", "ALEXNET_CACHE_DIR", "PGPASSWORD", "RAY_ADDRESS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(processes, force: bool = False) -> None:
    """SIGTERM (or at once SIGKILL, as `ray stop --force`), then SIGKILL, to these processes and everything
    under them."""
    procs = {p.pid: p for p in processes}
    for p in processes:
        try:
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    for p in procs.values():
        try:
            p.kill() if force else p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=15)


@pytest.fixture(scope="module")
def postgres():
    """`scripts/throwaway-postgres start DIR PORT`: its URL (no password) and password file."""
    folder = Path(tempfile.mkdtemp(prefix="alexnet-pg-"))  # short: the server's socket lives here
    port = free_port()
    script = ROOT / "scripts" / "throwaway-postgres"
    started = subprocess.run([script, "start", folder, str(port)], capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip() == f"postgresql+psycopg://alexnet@127.0.0.1:{port}"
        yield {"url": started.stdout.strip(), "password_file": folder / "password",
               "password": (folder / "password").read_text().strip()}
    finally:
        subprocess.run([script, "stop", folder], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """`alexnet server` on that cluster; the exports it prints, parsed."""
    folder = tmp_path_factory.mktemp("server")
    out, err, port = folder / "stdout", folder / "stderr", free_port()
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "alexnet", "server", "--database", postgres["url"],
                                 "--artifacts", folder / "artifacts", "--host", "127.0.0.1", "--port", str(port),
                                 "--password-file", postgres["password_file"]],
                                cwd=folder, stdout=o, stderr=e, env={k: v for k, v in os.environ.items() if k not in SHARED})
    try:
        def ready():
            assert proc.poll() is None, err.read_text()
            return "export ALEXNET_STORAGE=" in out.read_text()
        wait_for(ready, 180, "alexnet server to print the exports", every=0.3)
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", out.read_text(), re.M))
        yield {"exports": exports, "artifacts": folder / "artifacts", "proc": proc, "stderr": err,
               "log": Path(tempfile.gettempdir()) / f"alexnet-server-{port}.log"}
    finally:
        proc.send_signal(signal.SIGTERM)  # alexnet server stops the mlflow server, then exits
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_tree([psutil.Process(proc.pid)])
        for log in Path(tempfile.gettempdir()).glob(f"alexnet-server-{port}.log"):
            log.unlink()


def team_env(postgres, server, folder: Path, **more) -> dict:
    """A worker machine's environment: the exports, the password, a home, data cache and folder of its own."""
    env = {k: v for k, v in os.environ.items() if k not in SHARED}
    return {**env, **server["exports"], "PGPASSWORD": postgres["password"], "ALEXNET_HOME": str(folder),
            "ALEXNET_CACHE_DIR": str(folder / "cache"), "TMPDIR": str(folder), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            **more}


@pytest.fixture(scope="module")
def ray_head(postgres, server, tmp_path_factory):
    """`ray start --head` on loopback, its node with a folder and the team's environment of its own."""
    node = tmp_path_factory.mktemp("ray-node")
    temp = tempfile.mkdtemp(prefix="ar-", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    address = f"127.0.0.1:{free_port()}"
    ray = Path(sys.executable).parent / "ray"
    try:
        started = subprocess.run([ray, "start", "--head", f"--port={address.split(':')[1]}", "--num-cpus=2",
                                  "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                                 cwd=node, env=team_env(postgres, server, node), capture_output=True, text=True,
                                 timeout=180)
        assert started.returncode == 0, started.stderr[-3000:]
        yield {"address": address, "folder": node}
    finally:
        ours = [p for p in psutil.process_iter(["cmdline"]) if any(temp in a for a in p.info["cmdline"] or [])]
        kill_tree(ours, force=True)
        shutil.rmtree(temp, ignore_errors=True)


def launch(args, folder: Path, env: dict, study: str, n_trials: int) -> subprocess.Popen:
    (folder / "sweep.toml").write_text(SWEEP.format(study=study, n_trials=n_trials))
    return subprocess.Popen([sys.executable, "-m", "alexnet", "sweep", "sweep.toml", *args], cwd=folder, env=env,
                            stdout=open(folder / "stdout", "w"), stderr=open(folder / "stderr", "w"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def workers_under(*folders) -> list:
    """Live sweep worker processes whose working folder is under one of `folders`."""
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd, cwd = " ".join(p.info["cmdline"] or []), p.info["cwd"] or ""
        if "alexnet.sweep.worker" in cmd and any(cwd.startswith(str(f)) for f in folders):
            found.append(p)
    return found


def test_three_workers_two_through_ray_share_one_study_through_the_servers(postgres, server, ray_head, tmp_path,
                                                                           monkeypatch):
    """One plain worker and two Ray workers join one study and one parent run; the plain worker is killed
    with SIGKILL mid-trial and a Ray worker retries its trial; the count is exact, every trial a child
    run with its state mirrored, checkpoints and the model readable over HTTP, nothing left RUNNING,
    no worker left, no password stored."""
    n_trials, study_name = 5, "team"
    plain, driver = tmp_path / "plain", tmp_path / "ray-driver"
    plain.mkdir(), driver.mkdir()
    launchers = [launch([], plain, team_env(postgres, server, plain), study_name, n_trials),
                 launch(["--ray", "auto", "--workers", "2"], driver,
                        team_env(postgres, server, driver, RAY_ADDRESS=ray_head["address"]), study_name, n_trials)]
    uri, storage = server["exports"]["MLFLOW_TRACKING_URI"], server["exports"]["ALEXNET_STORAGE"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    monkeypatch.setenv("PGPASSWORD", postgres["password"])  # this process reads the study too
    try:
        # The plain launcher's worker, once its trial's run carries its pid: SIGKILL.
        wait_for(lambda: workers_under(plain), 120, "the plain worker to start", every=0.2)
        (worker,) = workers_under(plain)

        def its_run_started():
            return client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      f"tags.pid = '{worker.pid}' and attributes.status = 'RUNNING'")
        wait_for(its_run_started, 180, "the plain worker's trial to start", every=0.5)
        worker.kill()
        launchers[0].wait(timeout=400)
        # The plain launcher has stopped short while the Ray workers go on: it leaves the parent RUNNING.
        [mid_parent] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                          f"tags.`sweep.study` = '{study_name}' and tags.`sweep.role` = 'parent'")
        ray_went_on = launchers[1].poll() is None
        launchers[1].wait(timeout=400)
    finally:
        for proc in launchers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=150)
                except subprocess.TimeoutExpired:
                    kill_tree([psutil.Process(proc.pid)])
    plain_err, ray_err = (plain / "stderr").read_text(), (driver / "stderr").read_text()
    assert launchers[0].returncode == 1 and "was killed by SIGKILL" in plain_err, plain_err[-3000:]
    assert launchers[1].returncode == 0, ray_err[-3000:]
    assert mid_parent.info.status == "RUNNING" or not ray_went_on
    assert "Traceback" not in plain_err + ray_err
    assert "on the Ray cluster 127.0.0.1:" in ray_err and "the cluster has no GPU: the workers train on their CPUs" in ray_err

    # Exactly n_trials finished: the killed trial FAIL, retried with its params; nothing RUNNING or WAITING.
    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials()
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == n_trials and states.count("FAIL") == 1 and len(states) == n_trials + 1, states
    (killed,) = [t for t in trials if t.state.name == "FAIL"]
    (retry,) = [t for t in trials if t.system_attrs.get("retry_history") == [killed.number]]
    assert retry.state.name == "COMPLETE" and retry.params == killed.params
    assert retry.user_attrs["worker"] != killed.user_attrs["worker"]

    # One parent run, one child per trial, states mirrored; three workers trained.
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.`sweep.study` = '{study_name}'")
    (parent,) = [r for r in runs if r.data.tags["sweep.role"] == "parent"]
    assert parent.info.status == "FINISHED"
    children = {int(r.data.tags["sweep.trial"]): r for r in runs if r.data.tags["sweep.role"] == "trial"}
    assert sorted(children) == [t.number for t in trials]
    mirror = {"COMPLETE": "FINISHED", "FAIL": "FAILED"}
    for t in trials:
        run = children[t.number]
        assert run.info.status == mirror[t.state.name] and t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert children[killed.number].data.tags["failure_reason"] == "worker_lost"
    assert len({r.data.tags["sweep.worker"] for r in children.values()}) == 3
    assert not client.search_runs([parent.info.experiment_id], "attributes.status = 'RUNNING'")

    # Over HTTP: metrics, the kept trials' checkpoints and model; the others' deleted through the server.
    from alexnet.tracking import run_files
    from alexnet.sweep.study import ranked

    kept = {t.number for t in ranked(study, "maximize")[:2]}
    mlflow.set_tracking_uri(uri)
    try:
        for t in trials:
            run = children[t.number]
            files = [f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")]
            models = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")
            assert bool(files) == bool(models) == (t.number in kept), t.number
            if t.state.name == "COMPLETE":
                [acc] = client.get_metric_history(run.info.run_id, "val/acc")  # the objective: val/best_acc
                assert acc.step == 1 and acc.value == pytest.approx(t.value)
        best = children[min(kept)]
        state = run_files.fetch_best(best.info.run_id)
        assert state["epoch"] == 1 and "model" in state
        [model] = client.search_logged_models([best.info.experiment_id], f"source_run_id = '{best.info.run_id}'")
        import torch
        net = mlflow.pytorch.load_model(model.model_uri, dst_path=str(tmp_path))
        assert net(torch.zeros(2, 1, 67, 67)).shape == (2, 10)
    finally:
        mlflow.set_tracking_uri(None)

    # Nothing travelled through a shared folder; no worker is left; the password is stored nowhere.
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:/") for r in [parent, *children.values()])
    for folder in (plain, driver, ray_head["folder"]):
        assert not list(folder.rglob("*.pt")), folder
    assert not workers_under(plain, driver, ray_head["folder"])
    stored = [str(parent.data.tags), *(str(r.data.tags) + str(r.data.params) for r in children.values()),
              str([t.user_attrs for t in trials]), str(study.user_attrs), server["log"].read_text()]
    assert not [s for s in stored if postgres["password"] in s]


def artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += artifact_paths(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def datasets(run) -> list:
    """A run's dataset inputs: name, digest and context, in order."""
    return sorted((i.dataset.name, i.dataset.digest, tuple((t.key, t.value) for t in i.tags))
                  for i in run.inputs.dataset_inputs)


def test_push_moves_a_local_sweep_to_the_team_servers_where_it_resumes(postgres, server, tmp_path, monkeypatch):
    """A sweep run on a laptop's own stores, pushed with one command: every run arrives whole (params,
    metric histories with steps and timestamps, tags, artifacts, logged models, parent links, times and
    states, new ids), the study with its run ids rewritten; pushing again copies nothing twice; the same
    sweep command then resumes the study on the team's servers under the same parent run."""
    laptop, team = tmp_path / "laptop", tmp_path / "team"
    laptop.mkdir(), team.mkdir()
    (laptop / "sweep.toml").write_text(SWEEP.format(study="moved", n_trials=1))
    (team / "sweep.toml").write_text(SWEEP.format(study="moved", n_trials=2))
    own = {k: v for k, v in os.environ.items() if k not in SHARED}
    local = {**own, "ALEXNET_HOME": str(laptop), "ALEXNET_CACHE_DIR": str(laptop / "cache")}
    alexnet = [sys.executable, "-m", "alexnet"]
    result = subprocess.run([*alexnet, "sweep", "sweep.toml", "--quiet"], cwd=laptop, env=local, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    uri, storage = server["exports"]["MLFLOW_TRACKING_URI"], server["exports"]["ALEXNET_STORAGE"]
    command = [*alexnet, "push", "--study", "moved", "--to-tracking-uri", uri, "--to-storage", storage]
    pushed = subprocess.run(command, cwd=laptop, env={**local, "PGPASSWORD": postgres["password"]},
                            capture_output=True, text=True, timeout=300)
    assert pushed.returncode == 0, pushed.stderr[-3000:]

    src = mlflow.MlflowClient(tracking_uri=f"sqlite:///{laptop / 'mlruns' / 'mlflow.db'}")
    dst = mlflow.MlflowClient(tracking_uri=uri)

    def study_runs(client):
        return client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`sweep.study` = 'moved'")
    copies = {r.data.tags["pushed.from_run_id"]: r for r in study_runs(dst)}
    originals = study_runs(src)
    assert len(originals) == 2 and sorted(copies) == sorted(r.info.run_id for r in originals)  # a parent, a trial
    for run in originals:
        copy = copies[run.info.run_id]
        assert copy.info.run_id != run.info.run_id
        assert (copy.info.status, copy.info.start_time, copy.info.end_time, copy.info.run_name) == \
            (run.info.status, run.info.start_time, run.info.end_time, run.info.run_name)
        assert copy.data.params == run.data.params and copy.data.metrics == run.data.metrics
        drop = ("mlflow.parentRunId", "pushed.from_run_id")
        assert {k: v for k, v in copy.data.tags.items() if k not in drop} == \
            {k: v for k, v in run.data.tags.items() if k not in drop}
        if "mlflow.parentRunId" in run.data.tags:
            assert copy.data.tags["mlflow.parentRunId"] == copies[run.data.tags["mlflow.parentRunId"]].info.run_id
        for key in run.data.metrics:
            assert [(m.step, m.value, m.timestamp) for m in dst.get_metric_history(copy.info.run_id, key)] == \
                [(m.step, m.value, m.timestamp) for m in src.get_metric_history(run.info.run_id, key)]
        assert artifact_paths(dst, copy.info.run_id) == artifact_paths(src, run.info.run_id)
        assert copy.info.artifact_uri.startswith("mlflow-artifacts:/")  # through the server, not a shared folder
        assert datasets(copy) == datasets(run) and (datasets(run) or "mlflow.parentRunId" not in run.data.tags)
        models = dst.search_logged_models([copy.info.experiment_id], f"source_run_id = '{copy.info.run_id}'")
        assert len(models) == len(src.search_logged_models([run.info.experiment_id],
                                                           f"source_run_id = '{run.info.run_id}'"))
    [model] = [m for r in copies.values() for m in dst.search_logged_models([r.info.experiment_id],
                                                                             f"source_run_id = '{r.info.run_id}'")][:1]
    import torch
    mlflow.set_tracking_uri(uri)
    try:
        assert mlflow.pytorch.load_model(model.model_uri, dst_path=str(tmp_path))(torch.zeros(1, 1, 67, 67)).shape == (1, 10)
    finally:
        mlflow.set_tracking_uri(None)

    monkeypatch.setenv("PGPASSWORD", postgres["password"])
    before = optuna.load_study(study_name="moved", storage=f"sqlite:///{laptop / 'mlruns' / 'optuna.db'}")
    after = optuna.load_study(study_name="moved", storage=storage)
    assert after.user_attrs["mlflow_parent_run_id"] == copies[before.user_attrs["mlflow_parent_run_id"]].info.run_id
    for old, new in zip(before.trials, after.trials, strict=True):
        assert (new.number, new.state, new.params, new.values, new.datetime_start, new.datetime_complete) == \
            (old.number, old.state, old.params, old.values, old.datetime_start, old.datetime_complete)
        assert new.user_attrs["mlflow_run_id"] == copies[old.user_attrs["mlflow_run_id"]].info.run_id

    again = subprocess.run(command, cwd=laptop, env={**local, "PGPASSWORD": postgres["password"]},
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already" in again.stderr, again.stderr[-3000:]
    assert len(study_runs(dst)) == 2

    # On the team's servers the same command resumes it: one more trial, under the pushed parent run.
    resumed = subprocess.run([*alexnet, "sweep", "sweep.toml", "--quiet"], cwd=team, env=team_env(postgres, server, team),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = optuna.load_study(study_name="moved", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    runs = study_runs(dst)
    (parent,) = [r for r in runs if r.data.tags["sweep.role"] == "parent"]
    assert parent.info.run_id == after.user_attrs["mlflow_parent_run_id"] and parent.info.status == "FINISHED"
    assert len([r for r in runs if r.data.tags["sweep.role"] == "trial"]) == 2


def test_ctrl_c_on_a_ray_launcher_stops_every_worker_and_leaves_nothing_running(postgres, server, ray_head, tmp_path,
                                                                                monkeypatch):
    """SIGINT to `alexnet sweep FILE --ray auto --workers 2` while both trials run: every Ray task is
    cancelled, each worker ends its trial KILLED and queues it again, exit 130; nothing RUNNING in Optuna
    or MLflow, no worker process left."""
    driver = tmp_path / "driver"
    driver.mkdir()
    env = team_env(postgres, server, driver, RAY_ADDRESS=ray_head["address"])
    # First, asking a cluster without GPUs for a GPU share: one line at start, nothing created.
    launch(["--ray", "auto", "--workers", "2", "--gpus-per-worker", "0.5"], driver, env, "interrupted", 4).wait(120)
    err = (driver / "stderr").read_text()
    assert err.count("\n") == 1 and "--gpus-per-worker 0.5, but no node of the Ray cluster has a GPU" in err, err
    monkeypatch.setenv("PGPASSWORD", postgres["password"])
    assert "interrupted" not in optuna.study.get_all_study_names(server["exports"]["ALEXNET_STORAGE"])

    launcher = launch(["--ray", "auto", "--workers", "2"], driver, env, "interrupted", 4)
    uri, storage = server["exports"]["MLFLOW_TRACKING_URI"], server["exports"]["ALEXNET_STORAGE"]
    client = mlflow.MlflowClient(tracking_uri=uri)

    def both_running():
        try:
            trials = optuna.load_study(study_name="interrupted", storage=storage).trials
        except KeyError:  # not created yet
            return False
        started = [t.user_attrs["mlflow_run_id"] for t in trials if t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs]
        return len(started) == 2 and all("pid" in client.get_run(r).data.tags for r in started)
    try:
        wait_for(both_running, 180, "both Ray workers' trials to start", every=0.5)
        launcher.send_signal(signal.SIGINT)
        launcher.wait(timeout=200)
    finally:
        if launcher.poll() is None:
            kill_tree([psutil.Process(launcher.pid)])
    err = (driver / "stderr").read_text()
    assert launcher.returncode == 130, err[-3000:]
    assert "interrupted: stopping the workers" in err and "Traceback" not in err
    trials = optuna.load_study(study_name="interrupted", storage=storage).trials
    assert sorted(t.state.name for t in trials) == ["FAIL", "FAIL", "WAITING", "WAITING"]
    assert all(t.user_attrs["fail_reason"] == "interrupted" for t in trials if t.state.name == "FAIL")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`sweep.study` = 'interrupted'")
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED", "KILLED"]  # the parent and both trials
    assert not workers_under(driver, ray_head["folder"])
