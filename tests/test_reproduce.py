"""A run's record and `alexnet reproduce` on real runs in temp stores: what the record holds (code,
versions, data checksums, the splits as MLflow dataset inputs), a CPU run re-created exactly, a run from
a dirty work tree re-created from its patch (in a throw-away git clone, never this checkout), and what
is refused: changed data, another commit, a record that lacks something."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from alexnet.tracking import checkout, record, run_files, store, lifecycle
from alexnet import cli
from alexnet.training import datafiles
from alexnet.training.config import Config, to_toml
from alexnet.home import tracking_uri, where
from conftest import ROOT

TINY = dict(resize=67, lr=0.05, epochs=2, train_limit=256, val_size=200, test_limit=200, batch_size=64,
            eval_batch_size=200)
TINY_TOML = "\n".join(f"{k} = {v}" for k, v in TINY.items()) + "\n"


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """One real tiny tracked run with a validation split, shared by the tests below."""
    home = tmp_path_factory.mktemp("reproduce")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ALEXNET_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        run = lifecycle.tracked_train(Config(**TINY, run_name="original"), progress=False)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return home, run


@pytest.fixture
def tracked(one_run, monkeypatch):
    home, run = one_run
    monkeypatch.setenv("ALEXNET_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri())
    store.set_up_store()
    return run


def test_the_record_holds_code_versions_data_and_the_splits_as_dataset_inputs(tracked):
    client = mlflow.MlflowClient()
    got = client.get_run(tracked.run_id)
    tags = got.data.tags
    code = checkout.current()
    assert tags["git.commit"] == code.commit and tags["git.dirty"] == str(code.dirty).lower()
    for name in datafiles.FILES:
        assert tags[f"data.md5.{name}"] == datafiles.RAW_MD5[name]
    assert json.loads(tags["speed_switches"])["deterministic"] is False and tags["device"] == "cpu"
    lock = mlflow.artifacts.load_text(f"{got.info.artifact_uri}/{record.REQUIREMENTS}")
    assert f"\ntorch=={torch.__version__.split('+')[0]}\n" in lock and f"\nmlflow=={mlflow.__version__}\n" in lock
    # The splits: one dataset input each, its context the split, its size and selection in the profile.
    inputs = {i.tags[0].value: i.dataset for i in got.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "test"}
    assert {d.name for d in inputs.values()} == {"fashion-mnist"} and len({d.digest for d in inputs.values()}) == 3
    profiles = {split: json.loads(d.profile) for split, d in inputs.items()}
    assert [profiles[s]["num_rows"] for s in ("train", "validation", "test")] == [256, 200, 200]
    assert profiles["validation"]["split_seed"] == 0 and profiles["test"]["md5"] == {
        n: datafiles.RAW_MD5[n] for n in datafiles.FILES if n.startswith("t10k")}
    assert json.loads(inputs["test"].source)["uri"] == datafiles.origin()
    # The best epoch (the logged model's; a finished run keeps it as its model, not as best.pt) is the
    # epoch validation chose.
    final = tracked.records[-1]
    assert run_files.fetch(tracked.run_id, "last")["best_epoch"] == final.best_epoch
    assert final.best_val_acc == max(r.val_acc for r in tracked.records) == tracked.records[final.best_epoch - 1].val_acc


def test_a_cpu_run_is_reproduced_exactly(tracked, capsys):
    assert cli.main(["reproduce", tracked.run_id, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith(f"alexnet: store {where(tracking_uri())}, experiment 'alexnet-fashion-mnist'\n")  # named once
    client = mlflow.MlflowClient()
    [new] = client.search_runs([client.get_run(tracked.run_id).info.experiment_id],
                               f"tags.reproduces = '{tracked.run_id}'")
    assert f"run {new.info.run_id} reproduces run {tracked.run_id}" in out
    assert "identical: every metric of every epoch equals the original's" in out
    for key in ("train/loss", "val/acc", "val/best_acc", "test/acc", "test/acc_at_best_val"):
        history = [(m.step, m.value) for m in client.get_metric_history(new.info.run_id, key)]
        assert history == [(m.step, m.value) for m in client.get_metric_history(tracked.run_id, key)], key
        assert f"    2  {key} " in out
    assert new.data.params == {**client.get_run(tracked.run_id).data.params, "run_name": "original-reproduce"}


def fake_record(original_id: str, **changes) -> str:
    """A copy of a run's record (its tags and config.toml) with some tags changed (None: removed), or
    with `config=False` no config.toml. Returns the copy's run id."""
    client = mlflow.MlflowClient()
    original = client.get_run(original_id)
    run = client.create_run(original.info.experiment_id, run_name="copy")
    tags = {k: v for k, v in original.data.tags.items() if not k.startswith(("mlflow.", "git.patch"))}
    tags["git.dirty"] = "false"  # artifacts are not copied: the copy claims a clean work tree
    for k, v in changes.items():
        if k != "config":
            tags.pop(k, None) if v is None else tags.__setitem__(k, v)
    for k, v in tags.items():
        client.set_tag(run.info.run_id, k, v)
    if changes.get("config", True):
        client.log_text(run.info.run_id, to_toml(Config(**TINY)), "config.toml")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


REFUSED = [
    ({"data.md5.t10k-labels-idx1-ubyte": "0" * 32}, "the data differs from run .*: t10k-labels-idx1-ubyte has MD5 "
                                                    "15d484375f8d13e6eb1aabb0c3f46965 here, 0{32} in the record"),
    ({"git.commit": "1" * 40}, "run .* was trained at commit 1{40}: check that commit out .* or --force"),
    ({"config": False}, "record lacks its resolved config \\(config.toml\\): it cannot be re-created from it"),
    ({"git.commit": None}, "record lacks its git commit \\(tag git.commit\\)"),
    ({"data.md5.train-images-idx3-ubyte": None}, "record lacks the data's checksums"),
    ({"git.dirty": "true", "git.patch_sha256": "2" * 64}, "record lacks its uncommitted changes \\(code.patch\\)"),
]


def error_lines(err: str) -> list[str]:
    """What a refused command printed besides the line naming its store (printed once the record is read)."""
    lines = err.splitlines()
    return lines[1:] if lines and lines[0].startswith("alexnet: store ") else lines


@pytest.mark.parametrize("changes,message", REFUSED)
def test_what_cannot_be_reproduced_is_refused_in_one_line(tracked, capsys, changes, message):
    copy = fake_record(tracked.run_id, **changes)
    client = mlflow.MlflowClient()
    before = len(client.search_runs([client.get_run(copy).info.experiment_id]))
    assert cli.main(["reproduce", copy]) == 2
    [err] = error_lines(capsys.readouterr().err)
    assert err.startswith("alexnet reproduce: error: ")
    assert re.search(message, err), err
    assert len(client.search_runs([client.get_run(copy).info.experiment_id])) == before  # no run was started


def test_force_trains_a_run_of_another_commit_with_this_code(tracked, capsys):
    copy = fake_record(tracked.run_id, **{"git.commit": "1" * 40})
    assert cli.main(["reproduce", copy, "--force"]) == 0
    out, err = capsys.readouterr()
    assert f"with this checkout's code ({checkout.current().commit}), not its own (commit 111111111111)" in err
    client = mlflow.MlflowClient()
    [new] = client.search_runs([client.get_run(copy).info.experiment_id], f"tags.reproduces = '{copy}'")
    assert new.data.tags["reproduce.forced"] == "true" and new.data.tags["git.commit"] == checkout.current().commit
    assert f"run {new.info.run_id} reproduces run {copy}" in out and "logged no epoch" in out  # a copy without metrics


def test_a_run_that_really_differs_is_reported_epoch_by_epoch_and_exits_1(tracked, capsys):
    """A copy of the run's record whose logged val/acc at epoch 2 is 0.25 higher than what its config
    trains: the reproduction (same code, CPU) matches every other number, so exactly that epoch and
    metric are reported as differing, and the command fails."""
    client = mlflow.MlflowClient()
    copy = fake_record(tracked.run_id)
    original = client.get_run(tracked.run_id).data.metrics
    for key in original:
        for m in client.get_metric_history(tracked.run_id, key):
            client.log_metric(copy, key, m.value + (0.25 if (key, m.step) == ("val/acc", 2) else 0.0), step=m.step)
    assert cli.main(["reproduce", copy, "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "\ndiffers at epoch 2: val/acc\n" in out
    assert "NOT reproduced: the largest difference is 0.25, with the same code, device and versions" in out
    [row] = [line for line in out.splitlines() if re.match(r" +2  val/acc ", line)]
    assert row.split()[-1] == "-0.25"  # the reproduction's value minus the record's
    assert re.search(r"\n +1  val/acc +(\S+) +\1 +0\n", out)  # epoch 1 agrees


def test_changed_data_files_are_refused(tracked, tmp_path, monkeypatch, capsys):
    """The data itself altered (one byte of the test labels): refused before any run, naming the file."""
    source = Path(os.environ.get("ALEXNET_DATA_DIR") or datafiles.DEBIAN_DIR)
    altered = tmp_path / "data"
    altered.mkdir()
    for name in datafiles.FILES:
        found = datafiles._find(source, name)
        (altered / found.name).write_bytes(found.read_bytes())
    labels = next(altered.glob("t10k-labels*"))
    content = bytearray(labels.read_bytes())
    content[-1] ^= 1
    labels.write_bytes(bytes(content))
    monkeypatch.setenv("ALEXNET_DATA_DIR", str(altered))
    monkeypatch.setenv("ALEXNET_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["reproduce", tracked.run_id]) == 2
    [err] = error_lines(capsys.readouterr().err)
    assert "t10k-labels-idx1-ubyte" in err and "corrupt" in err


# --- A dirty work tree, in a throw-away clone of this repository ---

def in_clone(clone: Path, home: Path, *args, check=True) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "ALEXNET_HOME": str(home),
           "PYTHONPATH": str(clone), "TMPDIR": str(home / "tmp")}
    done = subprocess.run([sys.executable, "-m", "alexnet", *args], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=600, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def git(clone: Path, *args) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=clone,
                          capture_output=True, text=True, check=True).stdout


def test_a_run_from_a_dirty_work_tree_is_reproduced_from_its_patch(tmp_path):
    """In a clone: a clean run, then a run whose uncommitted changes alter the shuffling (a tracked file
    edited to read a constant from an untracked new file), then the clone cleaned and the dirty run
    reproduced. The reproduction applies the recorded patch in a temporary worktree: it matches the
    dirty run exactly (which the clean run does not), records the same patch, and leaves the clone's
    work tree and worktree list as they were."""
    clone, home = tmp_path / "clone", tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    (tmp_path / "tiny.toml").write_text(TINY_TOML.replace("epochs = 2", "epochs = 1"))
    in_clone(clone, home, "train", tmp_path / "tiny.toml", "--quiet")

    data_py = clone / "alexnet" / "training" / "data.py"
    source = data_py.read_text()
    assert "seed * 1_000_003 + epoch)" in source
    data_py.write_text(source.replace("seed * 1_000_003 + epoch)", "seed * 1_000_003 + epoch + SALT)")
                       + "\n\nfrom alexnet.salt import SALT  # noqa: E402\n")
    (clone / "alexnet" / "salt.py").write_text("SALT = 7\n")
    in_clone(clone, home, "train", tmp_path / "tiny.toml", "--quiet")
    git(clone, "checkout", "--", "alexnet/training/data.py")
    (clone / "alexnet" / "salt.py").unlink()
    assert git(clone, "status", "--porcelain") == ""

    store.set_up_store(f"sqlite:///{home / 'mlruns' / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(store.DEFAULT_EXPERIMENT).experiment_id
    clean, dirty = sorted(client.search_runs([exp]), key=lambda r: r.info.start_time)
    assert clean.data.tags["git.dirty"] == "false" and dirty.data.tags["git.dirty"] == "true"
    patch = Path(client.download_artifacts(dirty.info.run_id, record.PATCH, str(tmp_path))).read_text()
    assert "+from alexnet.salt import SALT" in patch and "new file mode" in patch and "+SALT = 7" in patch

    done = in_clone(clone, home, "reproduce", dirty.info.run_id, "--quiet")
    assert "identical: every metric of every epoch equals the original's" in done.stdout
    [again] = client.search_runs([exp], f"tags.reproduces = '{dirty.info.run_id}'")
    assert again.data.tags["git.patch_sha256"] == dirty.data.tags["git.patch_sha256"]
    assert again.data.tags["git.commit"] == dirty.data.tags["git.commit"]
    losses = {r.info.run_id: client.get_metric_history(r.info.run_id, "train/loss")[0].value
              for r in (clean, dirty, again)}
    assert losses[again.info.run_id] == losses[dirty.info.run_id] != losses[clean.info.run_id]
    assert git(clone, "status", "--porcelain") == "" and len(git(clone, "worktree", "list").splitlines()) == 1
    assert not list((home / "tmp").iterdir())  # the temporary worktree is gone

    # A new commit in the clone: the dirty run's commit is no longer checked out, and it says so.
    git(clone, "commit", "--quiet", "--allow-empty", "-m", "later")
    refused = in_clone(clone, home, "reproduce", dirty.info.run_id, check=False)
    assert refused.returncode == 2 and f"trained at commit {dirty.data.tags['git.commit']}" in refused.stderr


def test_a_commit_or_patch_git_cannot_use_is_refused_in_one_line(home):
    """git's own multi-line complaints come down to one line, and no worktree is left registered."""
    from alexnet import UsageError
    from alexnet.team import reproduce

    before = checkout.git("worktree", "list", "--porcelain", check=False).stdout
    with pytest.raises(UsageError) as missing:
        reproduce.train_in_worktree("0" * 40, b"", Config(), {}, quiet=True)
    head = checkout.git("rev-parse", "HEAD").stdout.decode().strip()
    broken = b"diff --git a/nosuch.py b/nosuch.py\n--- a/nosuch.py\n+++ b/nosuch.py\n@@ -1 +1 @@\n-a\n+b\n"
    with pytest.raises(UsageError) as unapplied:
        reproduce.train_in_worktree(head, broken, Config(), {}, quiet=True)
    for error, start in ((missing, f"cannot check out commit {'0' * 40} in a temporary worktree ("),
                         (unapplied, f"the run's {record.PATCH} does not apply to commit {head}: ")):
        message = str(error.value)
        assert message.startswith(start) and "\n" not in message and "[" not in message, message
    assert checkout.git("worktree", "list", "--porcelain", check=False).stdout == before


def test_what_a_difference_means_identical_on_the_cpu_within_a_stated_tolerance_on_a_gpu():
    """The verdict alone (no GPU here): exact on the CPU or with deterministic = true; on a GPU with cuDNN's
    autotuning, accuracies within GPU_ACC_TOLERANCE; anything may differ with other code or versions."""
    from alexnet.team.reproduce import GPU_ACC_TOLERANCE, verdict

    def rows(acc_diff, loss_diff=0.05):
        return [(1, "test/acc", 0.8, 0.8 + acc_diff, acc_diff), (1, "train/loss", 0.5, 0.5 + loss_diff, loss_diff)]

    assert verdict(rows(0, 0), 0.0, "cpu", False, True, [])[1] == 0
    line, status = verdict(rows(1e-6), 0.05, "cpu", False, True, [])
    assert status == 1 and line.startswith("NOT reproduced: the largest difference is 0.05")
    assert verdict(rows(1e-6), 0.05, "cuda", True, True, [])[1] == 1  # deterministic: exact
    line, status = verdict(rows(0.012), 0.05, "cuda", False, True, [])
    assert status == 0 and line.startswith("within the stated tolerance on cuda without deterministic = true")
    assert f"accuracies differ by up to 0.012, the tolerance is {GPU_ACC_TOLERANCE:g}" in line
    line, status = verdict(rows(GPU_ACC_TOLERANCE + 0.01), 0.05, "cuda", False, True, [])
    assert status == 1 and line.startswith("NOT reproduced: beyond the stated tolerance on cuda")
    line, status = verdict(rows(0.3), 0.3, "cuda", False, True, ["version.torch 2.11 then, 2.14 now"])
    assert status == 0 and line == "differs by up to 0.3, as it may: version.torch 2.11 then, 2.14 now"
    assert verdict(rows(0.3), 0.3, "cpu", False, False, [])[0].endswith("as it may: the code differs (--force)")
