"""A real `alexnet train` killed with SIGKILL mid-run shows as STALE, is resumed with
`alexnet train --resume RUN_ID` in the same MLflow run, and ends with the per-epoch metrics of an
uninterrupted run (CPU, same seed)."""

import os
import signal
import subprocess
import sys

import mlflow

from alexnet.tracking import checkpoint, store
from alexnet import cli
from alexnet.compare import runs
from conftest import ROOT, default_sigint, wait_for

SETS = ["resize=67", "lr=0.05", "epochs=3", "train_limit=128", "test_limit=100", "batch_size=16",
        "eval_batch_size=100", "seed=3"]
EXACT = ["train/loss", "train/acc", "test/acc", "test/best_acc"]  # the perf/ metrics are timings


def history(run_id):
    client = mlflow.MlflowClient()
    out = {}
    for key in EXACT:
        for m in client.get_metric_history(run_id, key):
            out.setdefault(key, {}).setdefault(m.step, set()).add(m.value)
    return out


def last_checkpoints(home) -> list:
    """The `checkpoints/last.pt` files of every run in the home's store."""
    return list((home / "mlruns" / "artifacts").glob("*/artifacts/checkpoints/last.pt"))


def test_killed_run_resumes_to_the_uninterrupted_result(home, capsys, tmp_path):
    sets = [a for s in SETS for a in ("--set", s)]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "alexnet", "train", "--quiet", os.devnull, *sets,
                             "--set", "run_name=killed"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Kill it once epoch 1's metrics are logged (after its checkpoint): it is then inside epoch 2.
        wait_for(lambda: last_checkpoints(home) or proc.poll() is not None, 300, "the first checkpoint")
        store.set_up_store()
        logged = lambda: mlflow.MlflowClient().get_metric_history(last_checkpoints(home)[0].parents[2].name, "test/acc")  # noqa: E731
        wait_for(lambda: logged() or proc.poll() is not None, 60, "the first epoch's metrics")
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    run_id = last_checkpoints(home)[0].parents[2].name

    run = mlflow.get_run(run_id)
    assert run.info.status == "RUNNING"  # the dead process could not say otherwise
    done_before = max(history(run_id)["test/acc"])
    assert 1 <= done_before < 3

    # `alexnet runs` shows it as STALE (RUNNING in MLflow, its process gone).
    assert cli.main(["runs", "--json"]) == 0
    assert '"status":"STALE"' in capsys.readouterr().out

    # A damaged checkpoint is refused before anything changes.
    [last] = last_checkpoints(home)
    good = last.read_bytes()
    last.write_bytes(good[:-10] + bytes(10))
    assert cli.main(["train", "--resume", run_id]) == 2
    assert "is damaged" in capsys.readouterr().err
    assert mlflow.get_run(run_id).info.status == "RUNNING"
    last.write_bytes(good)

    # Resume the stale run in the same MLflow run, in a new process.
    resumed = subprocess.run([sys.executable, "-m", "alexnet", "train", "--quiet", "--resume", run_id], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "Downloading artifacts" not in resumed.stderr  # MLflow's progress bars stay out of the way
    after = mlflow.get_run(run_id)
    assert after.info.status == "FINISHED" and after.data.tags["resumes"] == "1"
    assert after.data.tags["resumed_from_epoch"] == str(checkpoint_epoch(good))

    # The same training without interruption, in another run of the same store.
    assert cli.main(["train", "--quiet", os.devnull, *sets, "--set", "run_name=whole"]) == 0
    capsys.readouterr()
    whole = runs.leaderboard(sort="run").set_index("run").loc["whole", "run_id"]
    expected, got = history(whole), history(run_id)
    client = mlflow.MlflowClient()
    for key in EXACT:
        assert sorted(got[key]) == [1, 2, 3], key
        for epoch in (1, 2, 3):
            assert got[key][epoch] == expected[key][epoch], (key, epoch)
        # Each epoch logged once: metrics reach the run only with their checkpoint, so the epochs the
        # resume trains again were not logged before the kill.
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3], key
    assert mlflow.search_logged_models(experiment_ids=[after.info.experiment_id], output_format="list",
                                       filter_string=f"source_run_id = '{run_id}'")


def checkpoint_epoch(data: bytes) -> int:
    import io

    import torch

    from alexnet.tracking.checkpoint import HEADER_BYTES

    return torch.load(io.BytesIO(data[HEADER_BYTES:]), weights_only=True)["epoch"]


def test_ctrl_c_ends_the_run_killed_with_whole_checkpoints(home, tmp_path):
    """SIGINT (Ctrl-C) in the middle of epoch 2 of 20: exit status 130 and one line, the run KILLED,
    the epochs already logged each once and behind a whole checkpoint, no temporary file left."""
    sets = [a for s in SETS + ["epochs=20"] for a in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "alexnet", "train", "--quiet", os.devnull, *sets], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        wait_for(lambda: last_checkpoints(home) or proc.poll() is not None, 300, "the first checkpoint")
        store.set_up_store()
        run_id = last_checkpoints(home)[0].parents[2].name
        wait_for(lambda: history(run_id) or proc.poll() is not None, 60, "the first epoch's metrics")
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"alexnet train: interrupted; resume with: alexnet train --resume {run_id}"
    run = mlflow.get_run(run_id)
    assert run.info.status == "KILLED"
    folder = last_checkpoints(home)[0].parent
    last = checkpoint.load(folder / "last.pt")  # whole: its checksum matches
    # No .tmp left behind, and a best.pt only where the best epoch is not last.pt's.
    expected = ["last.pt"] if last["best_epoch"] == last["epoch"] else ["best.pt", "last.pt"]
    assert sorted(p.name for p in folder.iterdir()) == expected
    client = mlflow.MlflowClient()
    for key in EXACT:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, last["epoch"] + 1)), key  # every logged epoch is resumable, once
