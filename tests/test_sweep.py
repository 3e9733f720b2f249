"""Optuna sweeps on real data, real MLflow and Optuna stores in temp folders, real worker processes.

Budget: resize 67, 256 training, 200 validation and 200 test images, batch 64, 1-2 epochs per trial;
trials are scored on validation (val/best_acc, the default objective). At epoch 1 these configs gave
(measured; CPU float noise moves them by a few images): lr 0.01 -> val acc 0.115, lr 0.05 -> 0.185,
lr 2 -> exactly 0.10 (collapsed to one class), lr 50 -> a NaN loss. That is what
makes the mixed sweep below complete, prune and diverge on cue; which complete trial wins is read
from the study, not assumed.
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import psutil
import pytest

from alexnet import UsageError, cli
from alexnet.sweep.confirm import verdict
from alexnet.sweep.spec import load_sweep
from conftest import ROOT, default_sigint, file_size_limit, wait_for

TINY = """
[set]
resize = 67
train_limit = 256
val_size = 200
test_limit = 200
batch_size = 64
epochs = {epochs}
"""


def write_sweep(folder: Path, name: str, body: str, epochs: int = 2) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(body + TINY.format(epochs=epochs))
    return path


def env_for(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "ALEXNET_HOME": str(home)}


def sweep_cli(home: Path, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alexnet", *map(str, args)], cwd=ROOT, env=env_for(home),
                          capture_output=True, text=True, timeout=timeout)


def stores(home: Path):
    """(MlflowClient, Optuna storage URL) of a temp project home."""
    return (mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlruns' / 'mlflow.db'}"),
            f"sqlite:///{home / 'mlruns' / 'optuna.db'}")


def sweep_runs(client, study: str) -> dict:
    """role -> runs of the study, children sorted by trial number."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`sweep.study` = '{study}'", max_results=1000)
    out = {}
    for r in runs:
        out.setdefault(r.data.tags["sweep.role"], []).append(r)
    out.get("trial", []).sort(key=lambda r: int(r.data.tags["sweep.trial"]))
    return out


def checkpoint_files(client, run) -> list:
    return [f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")]


# --- One mixed sweep: complete, pruned and diverged trials; retention; the parent run ---

MIXED = """
study = "mixed"
n_trials = 4
pruner = "median"
pruner_startup_trials = 1
pruner_warmup_epochs = 0
keep_top = 1
heartbeat_seconds = 1
grace_seconds = 4
enqueue_base = false

[space]
lr = { low = 0.001, high = 100.0, log = true }
dropout = { low = 0.0, high = 0.8 }
"""


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Four trials queued with Optuna's own API, then one command runs them: the baseline (lr 0.01,
    marked as the sweep marks it), lr 0.05 (completes), lr 50 (diverges), lr 2 (below the median after
    epoch 1: pruned). Resuming, and the sweep queueing its own baseline, are tested further down."""
    home = tmp_path_factory.mktemp("mixed")
    path = write_sweep(home, "mixed", MIXED)
    client, storage = stores(home)
    (home / "mlruns").mkdir(exist_ok=True)
    queued = optuna.create_study(study_name="mixed", storage=storage, direction="maximize")
    queued.enqueue_trial({"lr": 0.01, "dropout": 0.5}, user_attrs={"baseline": True})
    for lr in (0.05, 50.0, 2.0):
        queued.enqueue_trial({"lr": lr, "dropout": 0.5})
    result = sweep_cli(home, "sweep", path)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="mixed", storage=storage)
    return {"home": home, "path": path, "result": result, "client": client, "study": study,
            "parent": study.user_attrs["mlflow_parent_run_id"]}


def test_a_sweep_is_one_parent_run_with_one_child_per_trial_states_mirrored(mixed):
    study, client = mixed["study"], mixed["client"]
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "PRUNED"]
    assert [t.params["lr"] for t in trials] == [0.01, 0.05, 50.0, 2.0]
    assert [t.number for t in trials if t.user_attrs.get("baseline")] == [0]

    runs = sweep_runs(client, "mixed")
    (parent,) = runs["parent"]
    assert parent.info.run_id == mixed["parent"]
    assert parent.info.status == "FINISHED"
    children = runs["trial"]
    assert [r.data.tags["sweep.trial"] for r in children] == ["0", "1", "2", "3"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert [r.info.status for r in children] == ["FINISHED", "FINISHED", "FAILED", "KILLED"]
    assert [t.user_attrs["mlflow_run_id"] for t in trials] == [r.info.run_id for r in children]
    pruned = children[3]
    assert pruned.data.tags["sweep.state"] == "PRUNED" and pruned.data.tags["sweep.pruned_epoch"] == "1"
    assert trials[3].intermediate_values == {1: 0.1}
    # MLflow has no PRUNED state: the run says it was pruned, not that it failed.
    assert pruned.data.tags["killed_reason"] == "pruned"
    assert "**Pruned** by the sweep's median pruner at epoch 1 of 2" in pruned.data.tags["mlflow.note.content"]
    assert "not a failure" in pruned.data.tags["mlflow.note.content"]
    assert children[0].data.tags["mlflow.note.content"].startswith("Trial 0 of sweep 'mixed', the baseline")
    # Every trial records what a single run records.
    for r in children:
        assert float(r.data.params["lr"]) == trials[int(r.data.tags["sweep.trial"])].params["lr"]
        assert "test/acc" in r.data.metrics or r.data.tags.get("failure_reason") == "diverged"

    # One line per finished trial.
    lines = mixed["result"].stderr
    for number, state in [(0, "COMPLETE"), (1, "COMPLETE"), (2, "FAIL"), (3, "PRUNED")]:
        assert f"trial   {number} {state}" in lines
    assert "pruned at epoch 1 of 2" in lines and "diverged" in lines
    out = mixed["result"].stdout
    assert f"best: trial {study.best_trial.number}" in out
    assert "pruning: 1 of 4 trials stopped early, saving 1 of 8 epochs (12%)" in out
    # Before it starts, the sweep names its store and says what a trial will write.
    assert lines.startswith("alexnet: store sqlite:///") and "experiment 'alexnet-fashion-mnist'" in lines.splitlines()[0]
    assert "disk: a trial writes up to 262 MB (87 MB each for last.pt, best.pt and the model: 21,598,922 parameters " \
           "at resize 67); the top 1 keep 175 MB each" in lines
    # The leaderboard shows the pruned trial as PRUNED, with the epoch it stopped at.
    [row] = [line for line in out.splitlines() if "mixed-trial-3" in line]
    assert "PRUNED" in row and " 1/2 " in row


def test_a_diverging_trial_is_recorded_with_its_reason_and_the_sweep_goes_on(mixed):
    study, client = mixed["study"], mixed["client"]
    failed = study.trials[2]
    assert failed.state.name == "FAIL" and failed.user_attrs["fail_reason"].startswith("diverged: training loss became nan")
    run = client.get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == "diverged"
    assert study.trials[3].state.name == "PRUNED"  # the trial after it still ran


def test_retention_keeps_checkpoints_and_model_of_the_top_k_trials_only(mixed):
    study, client = mixed["study"], mixed["client"]
    best = min((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: (-t.value, t.number))
    for r in sweep_runs(client, "mixed")["trial"]:
        kept = r.data.tags["sweep.trial"] == str(best.number)
        assert bool(checkpoint_files(client, r)) == kept, r.data.tags["sweep.trial"]
        assert (r.data.tags.get("checkpoints") == "deleted") == (not kept)
        models = client.search_logged_models(experiment_ids=[r.info.experiment_id],
                                             filter_string=f"source_run_id = '{r.info.run_id}'")
        assert bool(models) == kept
        # Params, metrics and plots stay (the diverged trial has no epoch, so no curves).
        assert r.data.params["dropout"] == "0.5"
        if "test/acc" in r.data.metrics:
            assert "learning_curves.png" in [f.path for f in client.list_artifacts(r.info.run_id)]


def test_the_parent_run_gets_best_params_trials_csv_and_plots(mixed):
    client = mixed["client"]
    parent = client.get_run(mixed["parent"])
    best = mixed["study"].best_trial
    assert parent.data.tags["best.trial"] == str(best.number) and parent.data.tags["best.lr"] == str(best.params["lr"])
    assert parent.data.metrics["sweep/best_value"] == mixed["study"].best_value
    assert parent.data.metrics["sweep/finished_trials"] == 4
    assert parent.data.metrics["sweep/epochs_saved_by_pruning"] == 1
    assert parent.data.tags["mlflow.note.content"].startswith("Sweep 'mixed' (Optuna): maximize val/best_acc")
    assert f"Best: trial {best.number}" in parent.data.tags["mlflow.note.content"]
    files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_params.json", "sweep.toml", "plots"} <= files
    plots = {f.path for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/intermediate_values.png", "plots/parallel_coordinate.png",
            "plots/param_importances.png"} <= plots
    csv = (Path(parent.info.artifact_uri.removeprefix("file://")) / "trials.csv").read_text().splitlines()
    assert len(csv) == 5 and "params_lr" in csv[0]


def test_confirm_reruns_top_and_baseline_with_fresh_seeds(mixed):
    result = sweep_cli(mixed["home"], "confirm", "mixed", "--top", 2, "--seeds", 2, "--quiet")
    assert result.returncode == 0, result.stderr
    out = result.stdout  # the top 2 are trials 0 (the baseline) and 1, in either order
    table, final = out.split("winner beats the baseline? ")
    assert table.startswith("val/best_acc over 2 fresh seeds")
    assert "baseline = trial 0" in table and "trial 1" in table and table.count("+/-") == 2
    assert final.startswith(("yes: ", "no: ", "cannot tell: "))
    assert "\nfinal test accuracy (test/acc_at_best_val" in final  # read only after the verdict
    runs = sweep_runs(mixed["client"], "mixed")["confirm"]
    assert len(runs) == 4 and {r.data.tags["sweep.seed"] for r in runs} == {"1000", "1001"}
    assert all(r.data.tags["mlflow.parentRunId"] == mixed["parent"] for r in runs)
    # A confirm run is there for its metric: its checkpoints and model are gone once it ends.
    assert all(r.data.tags["checkpoints"] == "deleted" and not checkpoint_files(mixed["client"], r) for r in runs)
    parent = mixed["client"].get_run(mixed["parent"])
    assert parent.data.tags["confirm.verdict"] in out
    # What `alexnet promote` reads from it (tests/test_promote.py writes the same keys).
    confirmed = json.loads(Path(mixed["client"].download_artifacts(mixed["parent"], "confirm.json",
                                                                    str(mixed["home"]))).read_text())
    assert {"winner", "verdict", "beats_baseline", "winner_trial", "winner_run_id", "p_value", "seeds", "objective",
            "direction", "final_test_metric", "configs"} <= set(confirmed)
    winner = next(c for c in confirmed["configs"] if c["label"] == confirmed["winner"])
    assert winner["run_id"] == mixed["study"].trials[winner["trial"]].user_attrs["mlflow_run_id"]
    assert confirmed["beats_baseline"] == confirmed["verdict"].startswith("yes:")
    # The verdict follows from the recorded values: Welch against the baseline, Holm over the top configurations.
    judged = verdict([{**c, "finite": [v for v in c["values"] if math.isfinite(v)]} for c in confirmed["configs"]],
                     "maximize")
    assert judged.words == confirmed["verdict"] and judged.compared == confirmed["compared"] == 1  # trial 1 alone
    assert all({"label", "params", "values", "mean", "std", "trial", "run_id", "test_values", "test_mean",
                "test_std"} <= set(c) for c in confirmed["configs"])


def test_a_trial_that_reaches_its_last_epoch_completes_and_is_never_pruned(tmp_path):
    """1-epoch trials under a median pruner that may prune from the first finished trial on. The second
    trial (lr 2: test accuracy 0.10 at epoch 1, below the first's) is below the median at its first
    epoch, which is also its last: pruning it then would save nothing, so it completes."""
    path = write_sweep(tmp_path, "last", """
study = "last"
n_trials = 2
pruner = "median"
pruner_startup_trials = 1
pruner_warmup_epochs = 0
enqueue_base = false
[space]
lr = { low = 0.001, high = 100.0, log = true }
""", epochs=1)
    client, storage = stores(tmp_path)
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    queued = optuna.create_study(study_name="last", storage=storage, direction="maximize")
    for lr in (0.05, 2.0):
        queued.enqueue_trial({"lr": lr})
    result = sweep_cli(tmp_path, "sweep", path, "--quiet")
    assert result.returncode == 0, result.stderr
    trials = optuna.load_study(study_name="last", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert trials[1].value < trials[0].value  # below the median: at any earlier epoch it would be pruned
    assert [r.info.status for r in sweep_runs(client, "last")["trial"]] == ["FINISHED", "FINISHED"]
    assert "pruning: 0 of 2 trials stopped early, saving 0 of 2 epochs (0%)" in result.stdout


# --- Ctrl-C, then kill -9 of a worker, then the same command again ---

def wait_for_trial(storage: str, study: str, number: int, started_after: str = "") -> None:
    """Until trial `number` is RUNNING in its own MLflow run (a retry inherits its original's run id)."""
    def running():
        try:
            trials = optuna.load_study(study_name=study, storage=storage).trials
        except Exception:  # the launcher is still creating the storage
            return False
        return len(trials) > number and trials[number].state.name == "RUNNING" \
            and trials[number].user_attrs.get("mlflow_run_id", started_after) != started_after

    wait_for(running, 120, f"trial {number} to start", every=0.3)


def test_ctrl_c_then_kill_9_then_the_same_command_completes_exactly(tmp_path):
    """One study of 1 trial, three commands. Ctrl-C (SIGINT to the launcher, as a terminal sends it)
    mid-trial: exit 130, the trial FAIL (interrupted) and a WAITING copy of its params, nothing RUNNING,
    its run and the parent KILLED. The next command runs the copy; kill -9 of its worker: exit 1, the
    trial left RUNNING (nobody can tell yet). The same command again waits for the dead trial's heartbeat
    to go stale, fails it and retries it with the same params: exactly 1 finished trial, one parent run."""
    path = write_sweep(tmp_path, "killed", """
study = "killed"
n_trials = 1
pruner = "none"
heartbeat_seconds = 1
grace_seconds = 4
[space]
lr = { low = 0.005, high = 0.05, log = true }
""")
    client, storage = stores(tmp_path)
    cmd = [sys.executable, "-m", "alexnet", "sweep", str(path)]

    def launch():
        return subprocess.Popen(cmd, cwd=ROOT, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=default_sigint)

    # 1. Ctrl-C mid-trial.
    launcher = launch()
    try:
        wait_for_trial(storage, "killed", 0)
        launcher.send_signal(signal.SIGINT)
        out, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 130, err
    assert "interrupted" in err and "run the same command again to resume" in err
    study = optuna.load_study(study_name="killed", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]
    first, queued = study.trials
    assert first.user_attrs["fail_reason"] == "interrupted" and queued.params == first.params
    assert first.user_attrs["baseline"] and first.params == {"lr": 0.01}  # the sweep queued its base first
    assert client.get_run(first.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "KILLED"

    # 2. The queued copy runs; kill -9 of its worker.
    launcher = launch()
    try:
        wait_for_trial(storage, "killed", 1, started_after=first.user_attrs["mlflow_run_id"])
        (worker,) = psutil.Process(launcher.pid).children()
        assert "alexnet.sweep" in " ".join(worker.cmdline())
        os.kill(worker.pid, signal.SIGKILL)
        out, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 1 and "killed by SIGKILL" in err
    study = optuna.load_study(study_name="killed", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "RUNNING"]
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "KILLED"

    # 3. The same command again.
    again = subprocess.run(cmd, cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr and "retried as trial 2" in again.stderr
    study = optuna.load_study(study_name="killed", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL", "COMPLETE"]  # the baseline not queued again
    retry = study.trials[2]
    assert retry.params == first.params and retry.system_attrs["retry_history"] == [0, 1]
    runs = sweep_runs(client, "killed")
    assert [r.info.status for r in runs["trial"]] == ["KILLED", "FAILED", "FINISHED"]
    lost = client.get_run(study.trials[1].user_attrs["mlflow_run_id"])
    assert lost.data.tags["failure_reason"] == "worker_lost" and lost.data.tags["sweep.retry_of"] == "0"
    assert client.get_run(retry.user_attrs["mlflow_run_id"]).data.tags["sweep.retry_of"] == "1"
    assert len(runs["parent"]) == 1 and runs["parent"][0].info.status == "FINISHED"


def test_a_killed_launcher_leaves_its_parent_run_stale_not_running(home, capsys):
    """kill -9 of the launcher (and its workers) once the parent run exists: MLflow still says RUNNING,
    `alexnet runs` says STALE, and --kill-stale ends it KILLED, naming the sweep command that resumes it."""
    path = write_sweep(home, "orphan", """
study = "orphan"
n_trials = 1
[space]
lr = { low = 0.005, high = 0.05, log = true }
""")
    client, storage = stores(home)
    launcher = subprocess.Popen([sys.executable, "-m", "alexnet", "sweep", str(path)], cwd=ROOT, env=env_for(home),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def parent_tagged():  # the study names its parent run once both stores are set up; the launcher then tags it
        try:
            parent_id = optuna.load_study(study_name="orphan", storage=storage).user_attrs["mlflow_parent_run_id"]
            return "pid" in client.get_run(parent_id).data.tags
        except Exception:
            return False

    try:
        wait_for(parent_tagged, 120, "the launcher's pid on the parent run", every=0.2)
        workers = psutil.Process(launcher.pid).children()
    finally:
        launcher.kill()
        launcher.wait()
    for w in workers:
        w.kill()
    psutil.wait_procs(workers, timeout=30)
    (parent,) = sweep_runs(client, "orphan")["parent"]
    assert parent.info.status == "RUNNING" and parent.data.tags["pid"] == str(launcher.pid)

    assert cli.main(["runs", "--json"]) == 0  # in this process, on the same store (the `home` fixture)
    row = {r["run_id"]: r for r in json.loads(capsys.readouterr().out)}[parent.info.run_id]
    assert row["status"] == "STALE" and f"process {launcher.pid} is gone" in row["stale"]
    assert cli.main(["runs", "--kill-stale"]) == 0
    assert f"marked run {parent.info.run_id} KILLED" in (err := capsys.readouterr().err)
    assert f"resume it with: alexnet sweep {path}" in err
    assert client.get_run(parent.info.run_id).info.status == "KILLED"


# --- parallel workers ---

def test_two_parallel_workers_finish_the_count_without_duplicates(tmp_path):
    path = write_sweep(tmp_path, "pair", """
study = "pair"
n_trials = 3
pruner = "none"
keep_top = 2
heartbeat_seconds = 1
grace_seconds = 4
[space]
lr = { low = 0.005, high = 0.05, log = true }
dropout = { low = 0.0, high = 0.8 }
""", epochs=1)
    result = sweep_cli(tmp_path, "sweep", path, "--workers", 2)
    assert result.returncode == 0, result.stderr
    client, storage = stores(tmp_path)
    study = optuna.load_study(study_name="pair", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    params = [json.dumps(t.params, sort_keys=True) for t in study.trials]
    assert len(set(params)) == 3
    runs = sweep_runs(client, "pair")["trial"]
    assert sorted(int(r.data.tags["sweep.trial"]) for r in runs) == [0, 1, 2]
    assert {r.data.tags["sweep.worker"] for r in runs} == {"0", "1"}  # both workers trained
    kept = [r for r in runs if checkpoint_files(client, r)]
    dropped = [r for r in runs if not checkpoint_files(client, r)]
    assert len(kept) == 2
    value = {str(t.number): t.value for t in study.trials}
    assert min(value[r.data.tags["sweep.trial"]] for r in kept) >= max(value[r.data.tags["sweep.trial"]] for r in dropped)


def test_a_full_disk_stops_the_sweep_and_the_same_command_reruns_the_trial(tmp_path):
    """A trial whose checkpoint cannot be written (a file-size limit stands in for a full disk) fails,
    is queued again and stops its worker with one line, instead of every later trial failing the same
    way; once there is room, the same command runs it again and completes the count."""
    path = write_sweep(tmp_path, "full", """
study = "full"
n_trials = 1
pruner = "none"
[space]
lr = { low = 0.005, high = 0.05, log = true }
""", epochs=1)
    # 8 MB: the stores stay under it; a trial's checkpoint (about 19 MB) does not.
    result = subprocess.run([sys.executable, "-m", "alexnet", "sweep", str(path), "--quiet"], cwd=ROOT,
                            env=env_for(tmp_path), capture_output=True, text=True, timeout=300,
                            preexec_fn=file_size_limit(8 << 20))
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert line.startswith("alexnet sweep: worker 0: error: trial 0 failed: ")
    assert "File too large" in line and "run the same command" in line
    assert "Traceback" not in result.stderr
    client, storage = stores(tmp_path)
    study = optuna.load_study(study_name="full", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]
    assert study.trials[1].system_attrs["retry_history"] == [0]
    [run] = sweep_runs(client, "full")["trial"]
    assert run.info.status == "FAILED" and run.data.tags["sweep.state"] == "FAIL"
    assert client.get_run(sweep_runs(client, "full")["parent"][0].info.run_id).info.status == "KILLED"

    result = sweep_cli(tmp_path, "sweep", path, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="full", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].params == study.trials[0].params


def test_retention_ranks_and_reads_states_from_one_snapshot(monkeypatch):
    """A trial that completes while a worker's retention runs (another worker's trial) must not be taken
    for a finished trial outside the top K: its checkpoints would go, though it may be the best."""
    from types import SimpleNamespace as NS

    from alexnet.tracking import disk
    from alexnet.sweep import retention

    def trial(number, state, value):
        return NS(number=number, state=NS(name=state), values=None if value is None else [value], constraints={},
                  user_attrs={})

    before = [trial(0, "COMPLETE", 0.5), trial(1, "COMPLETE", 0.4), trial(2, "RUNNING", None)]
    after = [trial(0, "COMPLETE", 0.5), trial(1, "COMPLETE", 0.4), trial(2, "COMPLETE", 0.9)]
    snapshots = [before, after]  # trial 2 completes right after the first read
    study = NS(get_trials=lambda deepcopy=False: snapshots.pop(0) if len(snapshots) > 1 else snapshots[0],
               user_attrs={})
    runs = [NS(data=NS(tags={"sweep.trial": str(n)}), info=NS(status="FINISHED", run_id=f"run{n}")) for n in range(3)]
    monkeypatch.setattr(retention, "trial_runs", lambda *args, **kwargs: runs)
    deleted = []
    monkeypatch.setattr(disk, "delete_checkpoints", lambda run_id: deleted.append(run_id) or 0)
    spec = NS(study="s", direction="maximize", keep_top=2, cost="", config={"experiment": "e"})
    retention.retain(study, spec)
    assert deleted == []  # the top 2 then were trials 0 and 1; trial 2 was still running
    retention.retain(study, spec)  # the next pass sees trial 2 finished and best
    assert deleted == ["run1"]


# --- bad sweep files ---

BAD = [
    ("n_trial = 3\n[space]\nlr = { low = 0.001, high = 0.1 }", "unknown key 'n_trial'"),
    ("[space]\nlearning_rate = { low = 0.001, high = 0.1 }", "unknown key 'learning_rate'"),
    ("[space]\nlr = { low = 0.1, high = 0.001 }", "low 0.1 > high 0.001"),
    ("[space]\nresize = { choices = [67, 32] }", "the network needs resize >= 67"),
    ("sampler = \"cmaes\"\n[space]\nlr = { low = 0.001, high = 0.1 }", "sampler = 'cmaes' is not allowed"),
    ("pruner = \"asha\"\n[space]\nlr = { low = 0.001, high = 0.1 }", "pruner = 'asha' is not allowed"),
    ("[space]\nlr = { low = 0.02, high = 0.1 }", "base value 0.01 is outside the space"),
    ("objective = \"test/best_acc\"\n[space]\nlr = { low = 0.001, high = 0.1 }",
     "objective = 'test/best_acc' is a test metric: selecting on the test set biases"),
    ("[set]\nval_size = 0\n[space]\nlr = { low = 0.001, high = 0.1 }",
     "objective = 'val/best_acc' needs a validation split, but val_size = 0"),
]


@pytest.mark.parametrize("body,message", BAD)
def test_bad_sweep_files_are_one_clear_error(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_sweep(path)


def test_a_bad_sweep_file_exits_2_with_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD[3][0])
    result = sweep_cli(tmp_path, "sweep", path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "space.resize" in result.stderr
    assert not (tmp_path / "mlruns").exists()  # nothing was created


def test_objective_names_are_the_trainers_metrics():
    from alexnet.sweep.spec import OBJECTIVES
    from alexnet.training.train import EpochRecord

    validated = EpochRecord(*[0] * 9, val_acc=0, best_val_acc=0, test_acc_at_best_val=0)
    assert list(OBJECTIVES) == list(validated.metrics())
    assert set(EpochRecord(*[0] * 9).metrics()) < set(OBJECTIVES)  # without a validation split, the chapter's keys


def test_every_sweep_file_key_is_in_the_help_and_the_reference(tmp_path):
    """`alexnet sweep --help` lists every key a sweep file takes, from `Sweep`'s documented fields; the
    manual's generated reference of sweep-file keys has each of them too."""
    from alexnet.sweep.spec import FILE_KEYS

    result = sweep_cli(tmp_path, "sweep", "--help")
    assert result.returncode == 0
    helped = result.stdout.split("sweep-file keys (default, meaning):")[1]
    import runpy

    readme = runpy.run_path(str(ROOT / "docs" / "gen_reference.py"))["sweep_page"]()
    for key in sorted(FILE_KEYS) + ["[space]", "[set]"]:
        assert f"\n  {key} " in helped, key
        assert f"| `{key}` |" in readme, key


def test_the_shipped_sweep_files_load_and_select_on_a_validation_split():
    default = load_sweep(ROOT / "sweeps" / "default.toml")
    assert default.study == "default" and set(default.space) == {"lr", "dropout", "resize"}
    assert (default.objective, default.config["val_size"]) == ("val/best_acc", 5000)  # a sweep's default split
    assert load_sweep(ROOT / "sweeps" / "smoke.toml").config["val_size"] == 1000  # its [set] says otherwise
    assert default.config["resize"] == 224 and 224 in default.space["resize"]["choices"]
    smoke = load_sweep(ROOT / "sweeps" / "smoke.toml", ["resize=67"])
    assert "resize" not in smoke.space and smoke.config["resize"] == 67  # --set fixes a searched field
    cost = load_sweep(ROOT / "sweeps" / "cost.toml")  # accuracy against FLOPs: two objectives, no pruner
    assert (cost.cost, cost.pruner, cost.config["val_size"]) == ("flops", "none", 500) and "resize" in cost.space


def test_dry_run_runs_the_machinery_tiny_in_a_temporary_store(tmp_path):
    result = sweep_cli(tmp_path, "sweep", ROOT / "sweeps" / "smoke.toml", "--dry-run", "--n-trials", 1)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "would run study 'smoke': 1 trials" in out and "space: lr log-uniform" in out
    assert "1 child runs (trial 0 FINISHED)" in out and "checkpoints kept for 1" in out
    assert "optimization_history.png" in out and "dry run: OK" in out
    home = out.split("worker(s) in ")[1].split(" ")[0]
    assert not Path(home).exists() and not (tmp_path / "mlruns").exists()  # temporary, and gone


def test_workers_get_a_share_of_the_cores_and_gpus_round_robin(monkeypatch):
    from alexnet.sweep import local_workers

    monkeypatch.setattr(local_workers, "visible_gpus", lambda: ["0", "1"])
    envs = [local_workers.machine_env(i, 3, "auto") for i in range(3)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0"]
    threads = max(1, len(os.sched_getaffinity(0)) // 3)
    assert all(int(e["OMP_NUM_THREADS"]) == int(e["MKL_NUM_THREADS"]) == threads for e in envs)
    assert "CUDA_VISIBLE_DEVICES" not in local_workers.machine_env(0, 2, "cpu")  # no GPU for CPU trials
    monkeypatch.setattr(local_workers, "visible_gpus", lambda: ["0"])
    assert "CUDA_VISIBLE_DEVICES" not in local_workers.machine_env(0, 1, "auto")  # one GPU: nothing to pin


def test_workers_start_before_the_checks_and_a_refused_sweep_stops_them(tmp_path):
    """`alexnet sweep` starts its workers first (their imports overlap its checks); a sweep refused by a
    check stops them at once: one line, exit 2, no worker left, nothing created."""
    path = write_sweep(tmp_path, "refused", "[space]\nlr = { low = 0.005, high = 0.05, log = true }\n")
    proc = subprocess.Popen([sys.executable, "-m", "alexnet", "sweep", str(path), "--set", "device=cuda"], cwd=ROOT,
                            env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: psutil.Process(proc.pid).children() or proc.poll() is not None, 60, "the worker to start",
             every=0.02)
    seen = {c.pid for c in psutil.Process(proc.pid).children()} if proc.poll() is None else set()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.count("\n") == 1 and "no NVIDIA GPU" in err, err
    assert seen and not [p for p in seen if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refused.toml"]


def test_the_launchers_retention_holds_the_study_lock_and_its_failure_still_ends_the_parent(home, monkeypatch, capsys):
    """The launcher's last retention runs under the study lock, as the workers' does (two processes never
    delete one run's files), and a retention error is one line: the parent run still ends FINISHED."""
    import fcntl

    from alexnet.sweep import launcher
    from alexnet.sweep.study import study_lock

    path = write_sweep(home, "guarded", """
study = "guarded"
n_trials = 1
pruner = "none"
[space]
lr = { low = 0.005, high = 0.05, log = true }
""", epochs=1)
    sweep = load_sweep(path)
    seen = {}

    def failing_retain(study, spec):
        with open(study_lock(spec).lock_file, "a") as probe:  # another holder: a non-blocking lock fails
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen["locked"] = False
            except BlockingIOError:
                seen["locked"] = True
        raise RuntimeError("artifact server went away")

    monkeypatch.setattr(launcher, "retain", failing_retain)
    result = launcher.run_sweep(sweep, 1, quiet=True)
    assert seen == {"locked": True}
    assert result["status"] == 0 and result["complete"]
    assert "deleting old checkpoints failed (RuntimeError: artifact server went away)" in capsys.readouterr().err
    client, _ = stores(home)
    assert client.get_run(result["parent"]).info.status == "FINISHED"
