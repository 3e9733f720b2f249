"""MLflow tracking on a real store in a temp folder: what a run records reads back with MLflow's own
API; checkpoints are checksummed; the leaderboard filters and sorts; bad stores fail fast."""

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

import mlflow
import pytest
import torch

from alexnet import UsageError, checkpoint, cli, disk, runs, store, tracking
from alexnet.home import tracking_uri
from alexnet.config import Config, to_toml
from alexnet.model import alexnet
from conftest import ROOT, file_size_limit

TINY = dict(resize=67, lr=0.05, epochs=2, train_limit=256, test_limit=200, batch_size=64, eval_batch_size=200)
CURVE_KEYS = ["train/loss", "train/acc", "test/acc", "test/best_acc", "perf/examples_per_sec",
              "perf/wall_examples_per_sec", "perf/epoch_seconds"]


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """One real tiny tracked run (2 epochs), shared by the read-back tests. The command line holds a
    password, which must not reach MLflow."""
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("ALEXNET_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["ALEXNET_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    argv, sys.argv = sys.argv, ["alexnet", "train", "x.toml", "--tracking-uri", "http://bob:hunter2@example.org"]
    try:
        cfg = Config(**TINY, run_name="tracked")
        run = tracking.tracked_train(cfg, source="x.toml", tags={"note": "token=hunter2"}, progress=False)
    finally:
        sys.argv = argv
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return home, cfg, run


@pytest.fixture
def tracked(one_run, monkeypatch):
    """The shared run, with MLflow pointed at its store (other tests point it elsewhere)."""
    home, cfg, run = one_run
    monkeypatch.setenv("ALEXNET_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri())
    store.set_up_store()
    return cfg, run


def test_run_records_params_metrics_tags_config_and_curves(tracked):
    cfg, run = tracked
    client = mlflow.MlflowClient()
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "tracked"
    assert got.data.params == {k: str(v) for k, v in asdict(cfg).items()}
    for key in CURVE_KEYS:
        history = client.get_metric_history(run.run_id, key)
        assert [m.step for m in history] == [1, 2], key
        assert [m.value for m in history] == [r.metrics()[key] for r in run.records], key
    tags = got.data.tags
    for key in ["command", "host", "device", "pid", "heartbeat", "experiment_file", "version.python", "version.torch",
                "version.torchvision", "version.mlflow", "version.optuna", "git.commit", "git.dirty"]:
        assert tags.get(key, "") != "" or key == "git.dirty", key
    assert tags["device"] == "cpu" and tags["experiment_file"] == "x.toml" and tags["note"] == "token=***"
    assert "bob:***@example.org" in tags["command"]
    everything = json.dumps([got.data.params, got.data.tags])
    assert "hunter2" not in everything
    assert mlflow.artifacts.load_text(f"{got.info.artifact_uri}/config.toml") == to_toml(cfg)
    png = mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="learning_curves.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_checkpoints_and_model_read_back(tracked):
    cfg, run = tracked
    last, best = checkpoint.fetch(run.run_id, "last"), checkpoint.fetch(run.run_id, "best")
    final = run.records[-1]
    assert last["epoch"] == 2 and last["config"] == asdict(cfg)
    assert best["epoch"] == final.best_epoch == last["best_epoch"] and best["best_test_acc"] == final.best_test_acc
    assert set(last) >= {"model", "optimizer", "epoch", "rng", "best_test_acc", "best_epoch", "config"}
    # The logged model is the best epoch's, loadable with MLflow's own loader.
    [logged] = mlflow.search_logged_models(filter_string=f"source_run_id = '{run.run_id}'", output_format="list",
                                          experiment_ids=[mlflow.get_run(run.run_id).info.experiment_id])
    loaded = mlflow.pytorch.load_model(logged.model_uri)
    reference = alexnet(cfg.dropout, cfg.resize).eval()
    reference.load_state_dict(best["model"])
    x = torch.rand(3, 1, cfg.resize, cfg.resize)
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference(x), atol=1e-5)
    info = mlflow.models.get_model_info(logged.model_uri)
    assert info.signature is not None and info.saved_input_example_info is not None
    pyfunc = mlflow.pyfunc.load_model(logged.model_uri, model_config={"device": "cpu"})  # as on a GPU machine
    assert pyfunc.predict(x.numpy()).shape == (3, 10)
    # The saved input example predicts (MLflow's own check, which logging skips to save a reload).
    local = mlflow.artifacts.download_artifacts(logged.model_uri)
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert example.shape == (2, 1, cfg.resize, cfg.resize)
    assert pyfunc.predict(example).shape == (2, 10)


def test_delete_checkpoints_frees_the_big_files_and_keeps_the_record(tracked):
    cfg, run = tracked
    client = mlflow.MlflowClient()
    before = disk.run_disk_usage(run.run_id)
    ckpt_bytes = sum(f.file_size for f in client.list_artifacts(run.run_id, "checkpoints"))
    assert ckpt_bytes > 2 * 10**7 and before > ckpt_bytes  # two ~86 MB files, plus the model and the rest
    freed = disk.delete_checkpoints(run.run_id)
    after = disk.run_disk_usage(run.run_id)
    assert freed > ckpt_bytes and before - after == freed
    got = client.get_run(run.run_id)
    assert got.data.tags["checkpoints"] == "deleted"
    assert got.data.params["lr"] == str(cfg.lr) and got.data.metrics["test/best_acc"] == run.records[-1].best_test_acc
    record = {"config.toml", "requirements.lock.txt"} | ({"code.patch"} if got.data.tags["git.dirty"] == "true" else set())
    assert {f.path for f in client.list_artifacts(run.run_id)} == record | {"learning_curves.png"}
    assert mlflow.search_logged_models(filter_string=f"source_run_id = '{run.run_id}'", output_format="list",
                                       experiment_ids=[got.info.experiment_id]) == []
    client.set_terminated(run.run_id, "KILLED")  # as if it had been stopped: still nothing to resume from
    with pytest.raises(UsageError, match="checkpoints were deleted"):
        tracking.resume_config(run.run_id)


def test_a_damaged_checkpoint_is_refused(tmp_path):
    state = {"model": {"w": torch.arange(1000.0)}, "epoch": 3, "config": {"lr": 0.1}}
    path = tmp_path / "last.pt"
    checkpoint.save(state, path)
    assert checkpoint.load(path)["epoch"] == 3
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="damaged"):
        checkpoint.load(path)
    torch.save(state, tmp_path / "plain.pt")  # no checksum header: refused too
    with pytest.raises(UsageError, match="no checksum"):
        checkpoint.load(tmp_path / "plain.pt")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_leaderboard_filters_sweeps_and_parents_and_plots(home, capsys, tmp_path):
    """Runs shaped like a sweep's (a parent and its tagged trials) plus one plain run."""
    store.set_up_store()
    exp = store.experiment_id(store.DEFAULT_EXPERIMENT)
    client = mlflow.MlflowClient()
    parent = client.create_run(exp, run_name="study-parent", tags={"sweep.study": "s1", "sweep.role": "parent"})
    children = {}
    for trial, (lr, accs) in enumerate([(0.01, [0.3, 0.5]), (0.1, [0.6, 0.7]), (0.05, [0.2, 0.1])]):
        r = client.create_run(exp, run_name=f"s1-trial-{trial}", tags={
            "sweep.study": "s1", "sweep.trial": str(trial), "mlflow.parentRunId": parent.info.run_id})
        client.log_param(r.info.run_id, "lr", str(lr))
        for epoch, acc in enumerate(accs, 1):
            client.log_metric(r.info.run_id, "test/acc", acc, step=epoch)
            client.log_metric(r.info.run_id, "test/best_acc", max(accs[:epoch]), step=epoch)
            client.log_metric(r.info.run_id, "train/loss", 2 - acc, step=epoch)
        client.set_terminated(r.info.run_id, "FINISHED")
        children[trial] = r.info.run_id
    other = client.create_run(exp, run_name="plain")
    client.set_terminated(other.info.run_id, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")

    board = runs.leaderboard(sweep="s1")
    assert list(board["trial"]) == [1, 0, 2] and list(board["best_acc"]) == [0.7, 0.5, 0.2]
    assert list(board["final_acc"]) == [0.7, 0.5, 0.1] and list(board["lr"]) == [0.1, 0.01, 0.05]
    assert list(runs.leaderboard(parent=parent.info.run_id)["run_id"]) == [children[1], children[0], children[2]]
    assert len(runs.leaderboard()) == 5  # the default experiment: parent, trials, plain run
    assert list(runs.leaderboard(sweep="s1", sort="lr", reverse=True)["lr"]) == [0.01, 0.05, 0.1]

    plot = tmp_path / "curves.png"
    assert cli.main(["runs", "--sweep", "s1", "--json", "--plot", str(plot)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in rows] == ["s1-trial-1", "s1-trial-0", "s1-trial-2"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["runs", "--sweep", "s1", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(
        "run,status,lr,dropout,resize,epochs,val_best,test@val,best_acc,final_acc")
    assert cli.main(["runs", "--status", "finished", "--limit", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and "s1-trial-1" in table[1] and "0.7000" in table[1]
    assert cli.main(["runs", "--experiment", "nope"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err

    # A RUNNING run whose process is gone shows as STALE; --kill-stale ends it KILLED.
    dead = subprocess.Popen(["true"])  # a pid that has just ended
    dead.wait()
    stale = client.create_run(exp, run_name="orphan", tags={**store.process_tags(), "pid": str(dead.pid)})
    assert cli.main(["runs", "--status", "stale"]) == 0
    assert "orphan" in capsys.readouterr().out
    assert cli.main(["runs", "--kill-stale"]) == 0
    assert f"marked run {stale.info.run_id} KILLED" in capsys.readouterr().err
    got = client.get_run(stale.info.run_id)
    assert got.info.status == "KILLED" and "gone" in got.data.tags["killed_reason"]


def test_stale_rules():
    now = time.time()
    assert store.stale_reason("FINISHED", {"pid": "1"}) is None
    assert store.stale_reason("RUNNING", {}) is None  # not ours: cannot tell
    mine = store.process_tags()
    assert store.stale_reason("RUNNING", mine) is None  # this very process is alive
    assert "gone" in store.stale_reason("RUNNING", {**mine, "process_start": str(float(mine["process_start"]) - 100)})
    remote = {"pid": "1", "host": "elsewhere", "heartbeat": str(int(now - 30))}
    assert store.stale_reason("RUNNING", remote, now) is None
    assert "no heartbeat" in store.stale_reason("RUNNING", {**remote, "heartbeat": str(int(now - 3600))}, now)


def test_bad_stores_fail_in_one_line_before_training(home, capsys):
    (home / "mlruns").write_text("not a folder")  # mlruns/ cannot be created
    t0 = time.monotonic()
    code = cli.main(["train", "--quiet", *sum((["--set", f"{k}={v}"] for k, v in TINY.items()), []),
                     os.devnull])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("alexnet train: error: tracking: cannot write") and "mlruns" in err[-1]
    (home / "mlruns").unlink()
    code = cli.main(["train", "--quiet", "--tracking-uri", "http://bob:hunter2@127.0.0.1:9", os.devnull])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the tracking server http://bob:***@127.0.0.1:9" in err and "hunter2" not in err
    assert time.monotonic() - t0 < 60  # MLflow's own client would retry for minutes


def test_resume_refuses_unknown_runs_and_runs_without_checkpoints(home, capsys):
    store.set_up_store()
    client = mlflow.MlflowClient()
    assert cli.main(["train", "--resume", "0123456789abcdef0123456789abcdef"]) == 2
    assert "no run '0123456789abcdef0123456789abcdef'" in capsys.readouterr().err
    run = client.create_run(store.experiment_id(store.DEFAULT_EXPERIMENT))
    client.set_terminated(run.info.run_id, "KILLED")
    assert cli.main(["train", "--resume", run.info.run_id]) == 2
    assert "has no checkpoint (checkpoints/last.pt)" in capsys.readouterr().err
    assert cli.main(["train", "--resume", run.info.run_id, "experiments/smoke.toml"]) == 2
    assert "drop the experiment file" in capsys.readouterr().err
    client.set_terminated(run.info.run_id, "FINISHED")
    assert cli.main(["train", "--resume", run.info.run_id]) == 2
    assert "already FINISHED" in capsys.readouterr().err


def test_writer_raises_a_failed_write(tmp_path):
    blocker = tmp_path / "artifacts"
    blocker.write_text("a file where the run's artifact folder should be")
    writer = checkpoint.Writer("r", blocker.as_uri())
    writer.submit(["last"], {"w": torch.zeros(3)})
    with pytest.raises(OSError, match="writing checkpoints/last.pt failed"):
        writer.close()
    assert blocker.read_text().startswith("a file")


def test_a_write_that_fails_inside_torch_save_is_an_oserror_not_an_abort(tmp_path):
    """When the disk fills while `torch.save` is writing (here a file-size limit; the check for room
    beforehand is switched off), `save` raises the write's own OSError, leaves no file behind, and the
    process goes on: raised under torch's zip writer, the error would come out as "unexpected pos" and
    can abort the process."""
    script = f"""
import errno, sys, torch
from pathlib import Path
from alexnet import checkpoint
checkpoint.check_room = lambda *args: None
try:
    checkpoint.save({{"w": torch.ones(1 << 20)}}, Path(sys.argv[1]) / "last.pt")
except OSError as e:
    print("OSError", errno.errorcode[e.errno])
print("alive")
"""
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, preexec_fn=file_size_limit(1 << 20))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["OSError", "EFBIG", "alive"]
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_or_model_that_cannot_fit_is_refused_before_torch_writes_it(tmp_path, monkeypatch):
    import errno
    import shutil

    checkpoint.check_room(tmp_path, 10**6, "a checkpoint")  # fits
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(OSError, match=r"No space left on device: a checkpoint needs 2 MB, .* has 1 MB free") as e:
        checkpoint.check_room(tmp_path / "not" / "made" / "yet", 10**6, "a checkpoint")
    assert e.value.errno == errno.ENOSPC


def test_a_full_disk_ends_the_run_failed_in_one_line(home):
    """A checkpoint that cannot be written (a file-size limit stands in for a full disk: writes past
    it fail with EFBIG, as they fail with ENOSPC on a full disk) ends the run FAILED with the reason,
    and `alexnet train` exits 1 with one line. Left to fail under torch's zip writer, the write would
    raise an unrelated error, and can abort the process from a destructor (SIGABRT, exit 134)."""
    from alexnet import data

    data.prepare()  # the dataset cache is written here, before the limit
    overrides = [f"--set={k}={v}" for k, v in TINY.items()]
    # 8 MB: the SQLite store stays under it; the tiny run's checkpoint (about 19 MB) does not.
    proc = subprocess.run([sys.executable, "-m", "alexnet", "train", "experiments/smoke.toml", *overrides,
                           "--set=run_name=full-disk", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit(8 << 20))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("alexnet train: error: writing checkpoints/last.pt") and "File too large" in last
    assert "Traceback" not in proc.stderr
    store.set_up_store()
    [run] = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.run_name = 'full-disk'",
                               output_format="list")
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "OSError" and "File too large" in run.data.tags["failure"]
    assert run.data.params["resize"] == "67"  # what was recorded before the failure is kept
    folder = checkpoint.local_artifact_dir(run.info.artifact_uri) / "checkpoints"
    assert not list(folder.glob("*"))  # no half-written checkpoint, under its name or a temporary one


def test_writer_runs_callbacks_only_after_their_checkpoint_is_published(tmp_path, monkeypatch):
    """Tracking logs an epoch's metrics in the writer's callback: it must run after the state of that
    epoch (or a newer one that replaced it while waiting) is on disk, and never after a failed write."""
    import threading

    events, gate = [], threading.Event()
    publish = checkpoint.publish

    def slow_publish(state, names, run_id, artifact_uri):
        gate.wait(30)  # the first write blocks until the test has queued epochs 2 and 3 behind it
        publish(state, names, run_id, artifact_uri)
        events.append(("published", int(state["epoch"])))

    monkeypatch.setattr(checkpoint, "publish", slow_publish)
    folder = tmp_path / "artifacts"
    writer = checkpoint.Writer("r", folder.as_uri())
    for epoch in (1, 2, 3):
        writer.submit(["last"], {"epoch": torch.tensor(epoch)}, then=lambda e=epoch: events.append(("logged", e)))
        if epoch == 1:
            time.sleep(0.2)  # the thread takes epoch 1; 2 and 3 wait, and 3 replaces 2
    writer.call_after(lambda: events.append(("after", 0)))
    gate.set()
    writer.close()
    # Epoch 2's state was never written (3 replaced it), but its metrics are logged, after epoch 3's state.
    assert events == [("published", 1), ("logged", 1), ("published", 3), ("logged", 2), ("logged", 3), ("after", 0)]
    assert checkpoint.load(folder / "checkpoints" / "last.pt")["epoch"] == 3

    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the run's artifact folder should be")
    gate.set()
    events.clear()
    writer = checkpoint.Writer("r", blocker.as_uri())
    writer.submit(["last"], {"epoch": torch.tensor(1)}, then=lambda: events.append(("logged", 1)))
    with pytest.raises(OSError, match="writing checkpoints/last.pt failed"):
        writer.close()
    assert events == []  # no metric for a state that could not be saved
