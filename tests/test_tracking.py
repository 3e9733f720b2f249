"""MLflow tracking on a real store in a temp folder: what a run records reads back with MLflow's own
API; checkpoints are checksummed; the leaderboard filters and sorts; bad stores fail fast."""

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

import mlflow
import numpy as np
import pytest
import torch

from alexnet import UsageError, cli
from alexnet.tracking import checkpoint, disk, run_files, store, lifecycle
from alexnet.training import data
from alexnet.compare import runs
from alexnet.home import tracking_uri
from alexnet.training.config import Config, to_toml
from alexnet.training.model import alexnet
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
        run = lifecycle.tracked_train(cfg, source="x.toml", tags={"note": "token=hunter2"}, progress=False)
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


def test_run_records_params_metrics_tags_config_and_curves(tracked, private_tmp):
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
    # MLflow's views: the objective is the run's first metric (its compare page plots that one), and the
    # run describes itself, how it ended included.
    assert list(got.data.metrics)[0] == "test/best_acc"
    note = tags["mlflow.note.content"]
    assert note.startswith("AlexNet on Fashion-MNIST: 2 epochs at resize 67, lr 0.05") and "256 training" in note
    assert f"**Finished**: test accuracy {run.records[-1].test_acc:.4f}" in note
    # Its disk use is recorded on it, for the leaderboard: the bytes of its files as they are now.
    assert int(tags["disk_bytes"]) == disk.run_disk_usage(run.run_id) > 2 * 10**7


def test_checkpoints_and_model_read_back(tracked, private_tmp):
    cfg, run = tracked
    client = mlflow.MlflowClient()
    last = run_files.fetch(run.run_id, "last")
    final = run.records[-1]
    assert last["epoch"] == 2 and last["config"] == asdict(cfg) and last["best_epoch"] == final.best_epoch
    assert set(last) >= {"model", "optimizer", "epoch", "rng", "best_test_acc", "best_epoch", "config"}
    # A FINISHED run keeps last.pt and its model; no best.pt beside them (the model holds those weights).
    assert [f.path for f in client.list_artifacts(run.run_id, "checkpoints")] == ["checkpoints/last.pt"]
    [logged] = mlflow.search_logged_models(filter_string=f"source_run_id = '{run.run_id}'", output_format="list",
                                          experiment_ids=[mlflow.get_run(run.run_id).info.experiment_id])
    loaded = mlflow.pytorch.load_model(logged.model_uri)
    if final.best_epoch == final.epoch:  # the model is the best epoch's: here last.pt's weights
        assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in last["model"].items())
    else:
        assert not all(torch.equal(loaded.net.state_dict()[k], v) for k, v in last["model"].items())

    # It takes raw Fashion-MNIST images: uint8 or [0, 1] floats, with or without the channel dimension,
    # and resizes them inside as training did.
    images = data.load(cfg.data_dir, train=False).data[:5]
    reference = alexnet(cfg.dropout, cfg.resize).eval()
    reference.load_state_dict(loaded.net.state_dict())
    with torch.no_grad():
        expected = reference(data.resize_batch(images, cfg.resize))
        for x in (images, images.float() / 255, (images.float() / 255).unsqueeze(1), images.unsqueeze(1)):
            assert torch.allclose(loaded(x), expected, atol=1e-5)
    # Through MLflow's pyfunc, as a server would: the signature is the files' own format, uint8 Bx28x28.
    info = mlflow.models.get_model_info(logged.model_uri)
    assert info.signature.inputs.to_dict()[0]["tensor-spec"] == {"dtype": "uint8", "shape": (-1, 28, 28)}
    pyfunc = mlflow.pyfunc.load_model(logged.model_uri)
    assert np.allclose(pyfunc.predict(images.numpy()), expected.numpy(), atol=1e-5)
    local = mlflow.artifacts.download_artifacts(logged.model_uri)
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert example.dtype == np.uint8 and example.shape == (4, 28, 28)
    assert np.array_equal(example, data.load(cfg.data_dir, train=False).data[:4].numpy())  # real test images
    assert pyfunc.predict(example).shape == (4, 10)


def test_the_logged_model_loads_where_alexnet_is_not_installed(tracked, tmp_path, private_tmp):
    """A fresh process in another folder, with no `alexnet` to import: the model brings its own code. (The
    virtualenv has this checkout installed in editable mode: its finder is taken out first, as if the
    package were not installed.)"""
    cfg, run = tracked
    script = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
import mlflow, torch
assert "alexnet" not in sys.modules
try:
    import alexnet
    raise SystemExit("alexnet is importable here: the test proves nothing")
except ImportError:
    pass
mlflow.set_tracking_uri({tracking_uri()!r})
model = mlflow.pytorch.load_model("runs:/{run.run_id}/model")
x = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
with torch.no_grad():
    print(type(model).__name__, tuple(model(x).shape), model.resize)
print("/code/alexnet/" in sys.modules["alexnet"].__file__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["RawImages", "(3,", "10)", str(cfg.resize), "True"]


def test_the_manuals_snippet_loads_the_model_and_predicts_on_real_test_images(tracked, tmp_path, private_tmp):
    """The manual's "Load the model" snippet (docs/training.md), as it stands there, run in a fresh process
    from the project folder with RUN_ID set; `alexnet` cannot be imported there (see the test above). Its home folder holds
    the `~/.cache/alexnet` the snippet reads the test images from: this machine's cache."""
    from alexnet.training import datafiles

    cfg, run = tracked
    snippet = (ROOT / "docs" / "training.md").read_text().split("## Load the model")[1].split("```python\n")[1].split("```")[0]
    fake_home = tmp_path / "user"
    (fake_home / ".cache").mkdir(parents=True)
    (fake_home / ".cache" / "alexnet").symlink_to(datafiles.cache_dir())
    prelude = ("import sys\nsys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
               f"RUN_ID = {run.run_id!r}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI") and not k.startswith("ALEXNET_")}
    result = subprocess.run([sys.executable, "-c", prelude + snippet], cwd=os.environ["ALEXNET_HOME"], capture_output=True,
                            text=True, timeout=300, env={**env, "HOME": str(fake_home)})
    assert result.returncode == 0, result.stderr[-3000:]
    predicted, true = (json.loads(line.split(":", 1)[1]) for line in result.stdout.splitlines())
    test = data.load(cfg.data_dir, train=False)
    model = mlflow.pytorch.load_model(f"runs:/{run.run_id}/model")
    with torch.no_grad():
        assert predicted == model(test.data[:8]).argmax(1).tolist()
    assert true == test.targets[:8].tolist() == [9, 2, 1, 1, 6, 1, 4, 6]


def test_delete_checkpoints_frees_the_big_files_and_keeps_the_record(tracked):
    cfg, run = tracked
    client = mlflow.MlflowClient()
    before = disk.run_disk_usage(run.run_id)
    ckpt_bytes = sum(f.file_size for f in client.list_artifacts(run.run_id, "checkpoints"))
    assert ckpt_bytes > 2 * 10**7 and before > 2 * ckpt_bytes  # last.pt (~87 MB), the model as big, the rest
    freed = disk.delete_checkpoints(run.run_id)
    after = disk.run_disk_usage(run.run_id)
    assert freed > ckpt_bytes and before - after == freed
    got = client.get_run(run.run_id)
    assert got.data.tags["checkpoints"] == "deleted" and int(got.data.tags["disk_bytes"]) == after
    assert got.data.params["lr"] == str(cfg.lr) and got.data.metrics["test/best_acc"] == run.records[-1].best_test_acc
    record = {"config.toml", "requirements.lock.txt"} | ({"code.patch"} if got.data.tags["git.dirty"] == "true" else set())
    assert {f.path for f in client.list_artifacts(run.run_id)} == record | {"learning_curves.png"}
    assert mlflow.search_logged_models(filter_string=f"source_run_id = '{run.run_id}'", output_format="list",
                                       experiment_ids=[got.info.experiment_id]) == []
    client.set_terminated(run.run_id, "KILLED")  # as if it had been stopped: still nothing to resume from
    with pytest.raises(UsageError, match="checkpoints were deleted"):
        lifecycle.resume_config(run.run_id)


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


def test_leaderboard_filters_sweeps_and_parents_and_plots(home, capsys, tmp_path, monkeypatch):
    """Runs shaped like a sweep's (a parent, its tagged trials, one pruned, two confirm runs) plus one
    plain run on other data: roles, the columns that differ, sorting by the header's names, and every
    empty result said in words."""
    store.set_up_store()
    exp = store.experiment_id(store.DEFAULT_EXPERIMENT)
    client = mlflow.MlflowClient()
    parent = client.create_run(exp, run_name="study-parent", tags={"sweep.study": "s1", "sweep.role": "parent"})
    client.log_param(parent.info.run_id, "objective", "maximize test/best_acc")
    children = {}
    for trial, (lr, accs) in enumerate([(0.01, [0.3, 0.5]), (0.1, [0.6, 0.7]), (0.05, [0.2, 0.1]), (2.0, [0.1])]):
        r = client.create_run(exp, run_name=f"s1-trial-{trial}", tags={
            "sweep.study": "s1", "sweep.trial": str(trial), "sweep.role": "trial", "mlflow.parentRunId": parent.info.run_id,
            "disk_bytes": str(170 * 10**6)})
        for k, v in {"lr": lr, "epochs": 2, "train_limit": 256, "seed": 0, "pipeline": "fast"}.items():
            client.log_param(r.info.run_id, k, str(v))
        for epoch, acc in enumerate(accs, 1):
            client.log_metric(r.info.run_id, "test/acc", acc, step=epoch)
            client.log_metric(r.info.run_id, "test/best_acc", max(accs[:epoch]), step=epoch)
            client.log_metric(r.info.run_id, "train/loss", 2 - acc, step=epoch)
            client.log_metric(r.info.run_id, "perf/examples_per_sec", 100 * (trial + 1), step=epoch)
        if trial == 3:  # pruned at epoch 1 of 2
            client.set_tag(r.info.run_id, "sweep.state", "PRUNED")
            client.set_tag(r.info.run_id, "sweep.pruned_epoch", "1")
        client.set_terminated(r.info.run_id, "KILLED" if trial == 3 else "FINISHED")
        children[trial] = r.info.run_id
    for seed in (1000, 1001):
        r = client.create_run(exp, run_name=f"s1-confirm-trial1-seed{seed}", tags={
            "sweep.study": "s1", "sweep.role": "confirm", "sweep.confirm_of": "trial 1", "sweep.seed": str(seed),
            "mlflow.parentRunId": parent.info.run_id})
        client.log_param(r.info.run_id, "seed", str(seed))
        client.log_metric(r.info.run_id, "test/best_acc", 0.65, step=2)
        client.set_terminated(r.info.run_id, "FINISHED")
    other = client.create_run(exp, run_name="plain")
    for k, v in {"lr": 0.1, "epochs": 2, "train_limit": 0, "seed": 0, "pipeline": "book"}.items():
        client.log_param(other.info.run_id, k, str(v))
    client.set_terminated(other.info.run_id, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")

    board = runs.leaderboard(sweep="s1")  # the trials; the confirm runs are a role of their own
    assert list(board["trial"]) == [1, 0, 2, 3] and list(board["best_acc"]) == [0.7, 0.5, 0.2, 0.1]
    assert list(board["final_acc"]) == [0.7, 0.5, 0.1, 0.1] and list(board["lr"]) == [0.1, 0.01, 0.05, 2.0]
    assert list(board["status"]) == ["FINISHED", "FINISHED", "FINISHED", "PRUNED"]
    confirm = runs.leaderboard(sweep="s1", role="confirm")
    assert list(confirm["role"]) == ["confirm"] * 2 and list(confirm["trial"]) == [1, 1]
    assert list(runs.leaderboard(parent=parent.info.run_id, role="trial")["run_id"]) == [children[i] for i in (1, 0, 2, 3)]
    assert len(runs.leaderboard()) == 8  # the default experiment: parent, trials, confirm runs, plain run
    assert list(runs.leaderboard(sweep="s1", sort="lr", reverse=True)["lr"]) == [0.01, 0.05, 0.1, 2.0]
    assert list(runs.leaderboard(role="run")["run"]) == ["plain"]
    assert list(runs.leaderboard(role="run")["train"]) == [60000]  # train_limit 0: the whole split

    plot = tmp_path / "curves.png"
    assert cli.main(["runs", "--sweep", "s1", "--json", "--plot", str(plot)]) == 0
    out = capsys.readouterr()
    rows = json.loads(out.out)
    assert [r["run"] for r in rows] == ["s1-trial-1", "s1-trial-0", "s1-trial-2", "s1-trial-3"]
    assert "and 2 confirm runs of this sweep: alexnet runs --sweep s1 --role confirm" in out.err
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["runs", "--sweep", "s1", "--csv"]) == 0
    csv_header = capsys.readouterr().out.splitlines()[0]
    assert csv_header.startswith("run,role,status,lr,dropout,resize,epochs,train,test")
    assert ",val_best,test@val,best_acc,final_acc," in csv_header

    # The table: the pruned trial with its epoch; the data size and pipeline only where the runs differ;
    # each run's disk use and the total.
    assert cli.main(["runs", "--sweep", "s1"]) == 0
    table = capsys.readouterr().out.splitlines()
    header = table[0].split()
    assert header[:5] == ["run", "role", "status", "lr", "dropout"] and "disk" in header and "trial" in header
    assert "train" not in header and "pipeline" not in header  # the same for every trial
    assert "PRUNED" in table[4] and " 1/2 " in table[4] and "170 MB" in table[1]
    assert table[-1] == "disk: 680 MB in 4 runs"
    assert cli.main(["runs"]) == 0
    out = capsys.readouterr()
    assert {"train", "pipeline", "seed"} <= set(out.out.splitlines()[0].split())  # they differ here
    assert "alexnet: store sqlite:///" in out.err and "experiment 'alexnet-fashion-mnist'" in out.err

    # --sort takes the header's own names.
    assert cli.main(["runs", "--sweep", "s1", "--sort", "examples/s", "--json"]) == 0
    assert [r["trial"] for r in json.loads(capsys.readouterr().out)] == [3, 2, 1, 0]
    assert cli.main(["runs", "--status", "finished", "--role", "trial", "--limit", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and "s1-trial-1" in table[1] and "0.7000" in table[1]

    # Unknown names and empty results: in words.
    assert cli.main(["runs", "--experiment", "nope"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err
    assert cli.main(["runs", "--sweep", "nosuch"]) == 2
    assert "runs: no sweep 'nosuch'" in (err := capsys.readouterr().err) and "(sweeps: s1)" in err
    # A sweep is looked for in the experiment named, through the SQL query (the local store) and through
    # MLflow's search API (a tracking server) alike; without one, in every experiment.
    store.experiment_id("elsewhere")
    for sql in (True, False):
        with monkeypatch.context() as patch:
            patch.setattr(runs.query, "is_sql", lambda uri, sql=sql: sql)
            assert cli.main(["runs", "--experiment", "elsewhere", "--sweep", "s1"]) == 2
            assert "runs: no sweep 's1'" in (err := capsys.readouterr().err) and "(sweeps: none yet)" in err
            assert cli.main(["runs", "--sweep", "s1", "--json"]) == 0
            assert [r["trial"] for r in json.loads(capsys.readouterr().out)] == [1, 0, 2, 3]
    assert cli.main(["runs", "--sort", "speed"]) == 2
    assert "examples/s" in capsys.readouterr().err
    assert cli.main(["runs", "--status", "failed"]) == 0
    assert "no runs match --status FAILED among the 8 runs of experiment 'alexnet-fashion-mnist'" in capsys.readouterr().err
    assert cli.main(["runs", "--kill-stale"]) == 0
    assert "no stale runs: no run is RUNNING among the 8 selected" in capsys.readouterr().err

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


def test_leaderboard_of_an_empty_store_says_so(home, capsys):
    assert cli.main(["runs"]) == 0
    assert "no runs in experiment 'alexnet-fashion-mnist' yet: train one with" in capsys.readouterr().err


def test_an_empty_run_name_is_derived_from_the_file_lr_resize_and_start_time():
    import re

    from alexnet.training.config import FIELDS

    assert re.fullmatch(r"smoke-lr0\.1-r67-\d{4}-\d{6}", lifecycle.default_run_name(Config(lr=0.1, resize=67),
                                                                                     "experiments/smoke.toml"))
    assert lifecycle.default_run_name(Config(), None).startswith("run-lr0.01-r224-")
    assert "experiment file's name, lr, resize and start time" in FIELDS["run_name"].metadata["help"]


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
    writer = run_files.writer("r", blocker.as_uri())
    writer.submit({"w": torch.zeros(3)}, best=True)
    with pytest.raises(OSError, match="writing checkpoints/last.pt failed"):
        writer.close()
    assert blocker.read_text().startswith("a file")


def test_a_write_that_fails_inside_torch_save_is_an_oserror_not_an_abort(tmp_path):
    """When the disk fills while `torch.save` is writing (here a file-size limit; the check for room
    beforehand is switched off), `save` raises the write's own OSError, leaves no file behind, and the
    process goes on: raised under torch's zip writer, the error would come out as "unexpected pos" and
    can abort the process."""
    script = """
import errno, sys, torch
from pathlib import Path
from alexnet.tracking import checkpoint
checkpoint.check_room = lambda *args: None
try:
    checkpoint.save({"w": torch.ones(1 << 20)}, Path(sys.argv[1]) / "last.pt")
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
    from alexnet.training import data

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
    folder = store.local_artifact_dir(run.info.artifact_uri) / "checkpoints"
    assert not list(folder.glob("*"))  # no half-written checkpoint, under its name or a temporary one


def test_writer_runs_callbacks_only_after_their_checkpoint_is_published(tmp_path, monkeypatch):
    """Tracking logs an epoch's metrics in the writer's callback: it must run after the state of that
    epoch (or a newer one that replaced it while waiting) is on disk, and never after a failed write."""
    import threading

    events, gate = [], threading.Event()
    publish = run_files.publish

    def slow_publish(state, name, run_id, artifact_uri):
        gate.wait(30)  # the first write blocks until the test has queued epochs 2 and 3 behind it
        nbytes = publish(state, name, run_id, artifact_uri)
        events.append(("published", int(state["epoch"])))
        return nbytes

    monkeypatch.setattr(run_files, "publish", slow_publish)
    folder = tmp_path / "artifacts"
    writer = run_files.writer("r", folder.as_uri())
    for epoch in (1, 2, 3):
        writer.submit({"epoch": torch.tensor(epoch)}, best=True, then=lambda e=epoch: events.append(("logged", e)))
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
    writer = run_files.writer("r", blocker.as_uri())
    writer.submit({"epoch": torch.tensor(1)}, best=True, then=lambda: events.append(("logged", 1)))
    with pytest.raises(OSError, match="writing checkpoints/last.pt failed"):
        writer.close()
    assert events == []  # no metric for a state that could not be saved


def test_best_pt_exists_only_while_the_best_state_is_not_last_pt(tmp_path, monkeypatch):
    """No two identical weight files: a best state is `last.pt` until a worse one comes; then the old
    `last.pt` becomes `best.pt` (a hard link: no copy), and a new best removes it. A best state that a
    worse one replaced while it waited to be written is written as `best.pt` itself."""
    import threading

    folder = tmp_path / "artifacts"
    ckpts = folder / "checkpoints"
    sizes = []
    writer = run_files.writer("r", folder.as_uri(), on_written=sizes.append)

    def step(epoch, best):
        done = threading.Event()
        writer.submit({"epoch": torch.tensor(epoch), "w": torch.full((1000,), float(epoch))}, best=best, then=done.set)
        assert done.wait(30)
        return {p.name: int(checkpoint.load(p)["epoch"]) for p in ckpts.glob("*.pt")}

    assert step(1, best=True) == {"last.pt": 1}
    inode = (ckpts / "last.pt").stat().st_ino
    assert step(2, best=False) == {"last.pt": 2, "best.pt": 1}
    assert (ckpts / "best.pt").stat().st_ino == inode  # the very file that was last.pt: linked, not copied
    assert step(3, best=False) == {"last.pt": 3, "best.pt": 1}
    assert step(4, best=True) == {"last.pt": 4}
    assert sizes[-1] == {"last": (ckpts / "last.pt").stat().st_size, "best": 0}
    assert sizes[1]["best"] == sizes[1]["last"] > 4000  # epoch 2: two files on the run (one inode locally)

    # Epoch 5 (worse) is being written slowly; epoch 6 (a new best) waits behind it, and epoch 7 (worse)
    # replaces it before it is written: epoch 6 still becomes best.pt.
    gate, publish = threading.Event(), run_files.publish
    monkeypatch.setattr(run_files, "publish", lambda *a: gate.wait(30) and publish(*a))
    writer.submit({"epoch": torch.tensor(5), "w": torch.zeros(3)}, best=False)
    time.sleep(0.2)  # the thread takes epoch 5 and waits at the gate
    writer.submit({"epoch": torch.tensor(6), "w": torch.zeros(3)}, best=True)
    writer.submit({"epoch": torch.tensor(7), "w": torch.zeros(3)}, best=False)
    gate.set()
    writer.close()
    assert {p.name: int(checkpoint.load(p)["epoch"]) for p in ckpts.glob("*.pt")} == {"last.pt": 7, "best.pt": 6}
    assert not list(ckpts.glob(".*"))  # no temporary file left
