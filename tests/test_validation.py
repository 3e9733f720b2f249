"""The validation split on real data: never trained on, the chooser of the best epoch, absent from the
chapter's protocol (val_size = 0 trains and reports exactly as before it existed), and the leaderboard
ranks by it."""

import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch

import alexnet.training.train as train_module
from alexnet import UsageError
from alexnet.training import data
from alexnet.compare import runs
from alexnet.tracking import store
from alexnet.training.config import Config, load_config
from alexnet.training.train import train
from conftest import ROOT

TINY = ["resize=67", "train_limit=128", "test_limit=100", "epochs=2", "batch_size=32", "lr=0.05"]
BEFORE_THE_SPLIT = "514b655754bdbd7de6d67b6ef773ed03e9bebe59"  # the last commit whose trainer had no validation split


def without_timings(records):
    return [{k: v for k, v in r.metrics().items() if not k.startswith("perf/")} for r in records]


def spy_on_training_images(monkeypatch) -> list:
    """The uint8 images the fast pipeline resizes for training batches, batch by batch (evaluation's
    batches are not recorded; evaluation itself is skipped: only what is trained on matters here)."""
    seen, current = [], []
    resize, batches = data.resize_batch, data.Splits.batches

    def recording_resize(images, size):
        if current and current[-1] == "train":
            seen.append(images.clone())
        return resize(images, size)

    def tagged_batches(self, split, epoch=None):
        it = batches(self, split, epoch)
        while True:
            current.append(split)
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                current.pop()
            yield item

    monkeypatch.setattr(data, "resize_batch", recording_resize)
    monkeypatch.setattr(data.Splits, "batches", tagged_batches)
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: 0.5)
    return seen


def test_no_validation_image_is_ever_in_a_training_batch(monkeypatch):
    """Half the training images held out (val_size 30,000), then a class-balanced 500 of the rest: had
    the split not been excluded, about half the first 50 images of each class would be validation
    images. Every image the trainer is fed, by content, is a training-split image, each once an epoch,
    and none is a validation image (Fashion-MNIST's 60,000 training images are all distinct)."""
    cfg = load_config(None, ["resize=67", "train_limit=500", "test_limit=100", "val_size=30000", "split_seed=3",
                             "epochs=2", "batch_size=100"])
    seen = spy_on_training_images(monkeypatch)
    records = list(train(cfg, progress=False))
    assert [r.val_acc for r in records] == [0.5, 0.5]  # the spy's evaluation, for validation too

    full = data.load(train=True)
    split = data.split_indices(cfg, full.targets, data.load(train=False).targets)
    train_idx, val_idx = split["train"], split["validation"]
    assert len(val_idx) == 30000 and len(train_idx) == 500
    assert torch.bincount(full.targets[val_idx], minlength=10).tolist() == [3000] * 10  # class-balanced
    assert torch.bincount(full.targets[train_idx], minlength=10).tolist() == [50] * 10
    index_of = {bytes(img.numpy().tobytes()): i for i, img in enumerate(full.data)}
    fed = [index_of[bytes(img.numpy().tobytes())] for batch in seen for img in batch]
    assert len(fed) == 2 * 500  # two epochs over the training split
    assert sorted(fed[:500]) == sorted(fed[500:]) == sorted(train_idx.tolist())
    assert not set(fed) & set(val_idx.tolist())
    # Another split seed holds out other images; the same seed, the same ones.
    again = data.split_train_val(full.targets, 30000, 3)[1]
    other = data.split_train_val(full.targets, 30000, 4)[1]
    assert torch.equal(again, val_idx) and not torch.equal(other, val_idx)


def test_validation_chooses_the_best_epoch_and_reports_its_test_accuracy():
    records = list(train(load_config(None, TINY + ["epochs=3", "lr=0.1", "val_size=300"]), progress=False))
    for r in records:
        so_far = records[: r.epoch]
        best = max(so_far, key=lambda x: (x.val_acc, -x.epoch))  # the first epoch with the best accuracy
        assert r.best_val_acc == best.val_acc and r.best_epoch == best.epoch
        assert r.test_acc_at_best_val == best.test_acc
        assert r.best_test_acc == max(x.test_acc for x in so_far)  # still kept, never used to choose
        assert r.state()["best_epoch"] == r.best_epoch and r.state()["best_val_acc"] == r.best_val_acc
        m = r.metrics()
        assert (m["val/acc"], m["val/best_acc"], m["test/acc_at_best_val"]) == (r.val_acc, r.best_val_acc,
                                                                              r.test_acc_at_best_val)


def test_val_size_0_trains_and_reports_exactly_as_the_trainer_before_the_split(tmp_path):
    """The chapter's protocol is untouched: with val_size = 0 (the default) both pipelines give the very
    metrics, keys and best epochs that the trainer gave before the validation split existed (that
    commit's code, from `git archive`, run in a subprocess)."""
    if subprocess.run(["git", "cat-file", "-e", f"{BEFORE_THE_SPLIT}^{{commit}}"], cwd=ROOT).returncode != 0:
        pytest.skip(f"commit {BEFORE_THE_SPLIT[:12]} is not in this clone's history (a shallow clone?)")
    budgets = {"fast": TINY, "book": TINY + ["pipeline=book", "num_workers=0"]}
    script = ("import json, sys\nfrom alexnet.training.config import load_config\nfrom alexnet.training.train import train\n"
              "for sets in json.loads(sys.argv[1]):\n"
              "    records = list(train(load_config(None, sets), progress=False))\n"
              "    print(json.dumps([[{k: v for k, v in r.metrics().items() if not k.startswith('perf/')}, r.best_epoch]"
              " for r in records]))\n")
    archive = subprocess.run(["git", "archive", BEFORE_THE_SPLIT, "alexnet"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    result = subprocess.run([sys.executable, "-c", script, json.dumps(list(budgets.values()))], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    before = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(before) == 2
    for (pipeline, sets), old in zip(budgets.items(), before):
        records = list(train(load_config(None, sets), progress=False))
        assert [[m, r.best_epoch] for m, r in zip(without_timings(records), records)] == old, pipeline


def test_bad_validation_settings_are_one_clear_error():
    with pytest.raises(UsageError, match=r"val_size = 30001 is out of range \(allowed: 0 \(none\) to 30000\)"):
        Config(val_size=30001)
    with pytest.raises(UsageError, match="train_limit = 56000 is more than the 55,000 training images left"):
        Config(val_size=5000, train_limit=56000)
    assert Config(val_size=5000, train_limit=55000).train_limit == 55000


def test_the_leaderboard_shows_validation_and_test_at_its_epoch_and_ranks_by_validation(home):
    """Three runs whose best test accuracy orders them the other way round from validation: the board
    ranks by val_best, shows test@val beside it, and a run without a split comes last."""
    store.set_up_store()
    client = mlflow.MlflowClient()
    exp = store.experiment_id(store.DEFAULT_EXPERIMENT)
    for name, metrics in [("a", {"val/best_acc": 0.7, "test/acc_at_best_val": 0.69, "test/best_acc": 0.72}),
                          ("b", {"val/best_acc": 0.8, "test/acc_at_best_val": 0.78, "test/best_acc": 0.70}),
                          ("chapter", {"test/best_acc": 0.9})]:
        run = client.create_run(exp, run_name=name)
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value, step=1)
        client.set_terminated(run.info.run_id)
    board = runs.leaderboard()
    assert list(board["run"]) == ["b", "a", "chapter"]
    assert list(board["test@val"][:2]) == [0.78, 0.69]
    table = runs.format_table(board)
    assert "val_best" in table.splitlines()[0] and "test@val" in table.splitlines()[0]
    assert list(runs.leaderboard(sort="best_acc")["run"]) == ["chapter", "a", "b"]
