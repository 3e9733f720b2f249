"""A packed sweep (`--pack 2`): each member is its own Optuna trial and child MLflow run, with its own
epochs, checkpoints, pruning and final state; a diverged member fails alone; a pruned member leaves its
pack; a member's checkpoint is its own slice, and trains on alone."""

import math
from dataclasses import replace

import mlflow
import optuna
import pytest

from test_sweep import stores, sweep_cli, sweep_runs, write_sweep

PACKED = """
study = "packed"
n_trials = 4
pruner = "median"
pruner_startup_trials = 1
pruner_warmup_epochs = 0
keep_top = 4
heartbeat_seconds = 1
grace_seconds = 4
enqueue_base = false

[space]
lr = { low = 0.001, high = 100.0, log = true }
dropout = { low = 0.0, high = 0.8 }
"""


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Four queued trials, two packs of two: (baseline lr 0.01, lr 50: diverges), then (lr 0.05, lr 2:
    below the median after epoch 1, pruned; its partner trains epoch 2 alone)."""
    home = tmp_path_factory.mktemp("packed")
    path = write_sweep(home, "packed", PACKED)
    client, storage = stores(home)
    (home / "mlruns").mkdir(exist_ok=True)
    queued = optuna.create_study(study_name="packed", storage=storage, direction="maximize")
    for lr, dropout in ((0.01, 0.5), (50.0, 0.5), (0.05, 0.3), (2.0, 0.5)):
        queued.enqueue_trial({"lr": lr, "dropout": dropout})
    result = sweep_cli(home, "sweep", path, "--pack", 2, timeout=900)
    assert result.returncode == 0, result.stderr
    return {"home": home, "client": client, "study": optuna.load_study(study_name="packed", storage=storage),
            "result": result}


def test_each_member_is_its_own_trial_and_run(packed):
    trials = packed["study"].trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "PRUNED"]
    assert "diverged" in trials[1].user_attrs["fail_reason"]
    children = sweep_runs(packed["client"], "packed")["trial"]
    assert [r.data.tags["sweep.state"] for r in children] == ["COMPLETE", "FAIL", "COMPLETE", "PRUNED"]
    assert [r.info.status for r in children] == ["FINISHED", "FAILED", "FINISHED", "KILLED"]
    assert [float(r.data.params["lr"]) for r in children] == [0.01, 50.0, 0.05, 2.0]
    client = packed["client"]
    epochs = [[m.step for m in client.get_metric_history(r.info.run_id, "val/acc")] for r in children]
    assert epochs == [[1, 2], [], [1, 2], [1]]  # the pruned member left after epoch 1, its partner went on
    assert children[3].data.tags["sweep.pruned_epoch"] == "1"
    for run in (children[0], children[2]):  # retention keeps the complete trials' checkpoints (keep_top = 4)
        files = {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert "checkpoints/last.pt" in files
    # The trial's value is its own last objective, not its partner's.
    assert trials[0].value == children[0].data.metrics["val/best_acc"]
    assert trials[2].value == children[2].data.metrics["val/best_acc"]


def test_a_members_checkpoint_is_its_own_slice_and_resumes_alone(packed, monkeypatch):
    """Trial 2 trained epoch 1 in a pack of two and epoch 2 alone: its last.pt is its own training state,
    in `train`'s format, and trains on from there alone."""
    from alexnet.tracking.run_files import fetch
    from alexnet.training.config import Config
    from alexnet.training.train import train

    client = packed["client"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    run = sweep_runs(client, "packed")["trial"][2]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)  # over any store an earlier test in this process set
    try:
        state = fetch(run.info.run_id, "last")
    finally:
        mlflow.set_tracking_uri(previous)
    cfg = Config(**state["config"])
    assert state["epoch"] == 2 and state["config"]["lr"] == 0.05 and state["config"]["dropout"] == 0.3
    assert state["model"]["0.weight"].shape == (96, 1, 11, 11)  # one member's weights, not the stack
    (record,) = train(replace(cfg, epochs=3), start=state, progress=False)
    assert record.epoch == 3 and math.isfinite(record.train_loss)


def test_a_pack_too_big_for_the_device_is_refused_in_one_line(home, monkeypatch):
    from alexnet import UsageError
    from alexnet.sweep import packs
    from alexnet.sweep.spec import load_sweep
    from alexnet.training import pack

    sweep = load_sweep(write_sweep(home, "big", PACKED), pack=64)
    monkeypatch.setattr(pack, "free_bytes", lambda device: 2**30)
    with pytest.raises(UsageError, match=r"^pack: 64 members at resize 67, batch 64 need about .* GiB free: at most "
                                         r"\d+ fit \(pack = \d+\), or more workers with smaller packs$"):
        packs.check_memory(sweep)
    with pytest.raises(UsageError, match="--pack must be >= 1"):
        load_sweep(write_sweep(home, "zero", PACKED), pack=0)
