"""`alexnet promote STUDY` against a local store: a sweep's parent run carrying a confirmation (made with
MLflow's client, as `alexnet confirm` writes it; tests/test_sweep.py checks confirm writes these keys) and
its winner, a real tiny trial run with its logged model. The registered version, its alias and tags; the
README's snippet loading `models:/alexnet-fashion-mnist@champion` on real test images; the refusals; a
model logged again from the best checkpoint.

Budget: two tiny real runs (resize 67, 128 training, 100 validation and 100 test images, 1 epoch) and one
fresh process for the README's snippet, about 30 s on 2 cores.
"""

import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch

from alexnet import cli
from alexnet.training import data, datafiles
from alexnet.tracking import disk, store, lifecycle
from alexnet import home as home_module
from alexnet.training.config import Config
from conftest import ROOT

TINY = dict(resize=67, epochs=1, train_limit=128, val_size=100, test_limit=100, batch_size=64, eval_batch_size=100)
NAME = "alexnet-fashion-mnist"


def confirmation(winner_run_id: str, beats: bool = True) -> dict:
    """A confirm.json as `alexnet confirm` writes it: the baseline and one contender over 3 fresh seeds."""
    verdict = ("yes: trial 1 beats the baseline by +0.0400 beyond seed noise (Welch's t-test, one-sided p = 0.012 < 0.05)"
               if beats else "no: trial 1 is +0.0050 better on average, within seed noise (Welch's t-test, one-sided "
                             "p = 0.31 >= 0.05): more seeds may tell")
    return {"objective": "val/best_acc", "direction": "maximize", "seeds": [1000, 1001, 1002], "alpha": 0.05,
            "test": "Welch's t-test, one-sided", "p_value": 0.012 if beats else 0.31, "winner": "trial 1",
            "verdict": verdict, "beats_baseline": beats, "winner_trial": 1, "winner_run_id": winner_run_id,
            "final_test_metric": "test/acc_at_best_val",
            "configs": [{"label": "baseline = trial 0", "params": {"lr": 0.01}, "values": [0.11, 0.12, 0.10],
                         "mean": 0.11, "std": 0.01, "sweep": 0.115, "trial": 0, "run_id": None,
                         "test_values": [0.1, 0.11, 0.12], "test_mean": 0.11, "test_std": 0.01},
                        {"label": "trial 1", "params": {"lr": 0.05}, "values": [0.15, 0.16, 0.14],
                         "mean": 0.15, "std": 0.01, "sweep": 0.155, "trial": 1, "run_id": winner_run_id,
                         "test_values": [0.14, 0.15, 0.16], "test_mean": 0.15, "test_std": 0.01}]}


def sweep_parent(client, study: str, experiment: str, confirmed: dict | None) -> str:
    """A study's parent run as the sweep leaves it, with `confirm.json` as confirm leaves it."""
    parent = client.create_run(store.experiment_id(experiment), run_name=study,
                               tags={"sweep.study": study, "sweep.role": "parent"}).info.run_id
    client.log_param(parent, "objective", "maximize val/best_acc")
    client.log_param(parent, "keep_top", "2")
    if confirmed is not None:
        client.log_dict(parent, confirmed, "confirm.json")
    client.set_terminated(parent)
    return parent


def trial_run(study: str, parent: str, lr: float, experiment: str = NAME):
    return lifecycle.tracked_train(Config(**TINY, lr=lr, experiment=experiment, run_name=f"{study}-trial-1"),
                                  progress=False, parent_run_id=parent,
                                  tags={"sweep.study": study, "sweep.role": "trial", "sweep.trial": "1"})


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Study 'shipit': a confirmed winner, promoted with `alexnet promote shipit`."""
    home = tmp_path_factory.mktemp("promote")
    saved = {k: os.environ.get(k) for k in ("ALEXNET_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["ALEXNET_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        store.set_up_store()
        client = mlflow.MlflowClient()
        parent = sweep_parent(client, "shipit", NAME, None)
        run = trial_run("shipit", parent, 0.05)
        client.log_dict(parent, confirmation(run.run_id), "confirm.json")
        result = subprocess.run([sys.executable, "-m", "alexnet", "promote", "shipit"], cwd=ROOT, capture_output=True,
                                text=True, timeout=300, env=dict(os.environ))
        assert result.returncode == 0, result.stderr[-3000:]
        return {"home": home, "run": run, "parent": parent, "result": result}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def at_store(shipped, monkeypatch):
    monkeypatch.setenv("ALEXNET_HOME", str(shipped["home"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", home_module.default_tracking_uri())
    mlflow.set_tracking_uri(home_module.default_tracking_uri())
    return shipped


def test_promote_registers_the_confirmed_winner_as_champion_tagged_with_where_it_came_from(at_store):
    shipped = at_store
    client, run = mlflow.MlflowClient(), mlflow.MlflowClient().get_run(shipped["run"].run_id)
    champion = client.get_model_version_by_alias(NAME, "champion")
    [model] = disk.logged_models(run)
    assert champion.source == f"models:/{model.model_id}" and champion.run_id == run.info.run_id
    tags = champion.tags
    assert {k: tags[k] for k in ("sweep.study", "sweep.trial", "sweep.run_id", "confirm.winner", "confirm.p_value",
                                 "confirm.beats_baseline", "promoted.forced")} == {
        "sweep.study": "shipit", "sweep.trial": "1", "sweep.run_id": run.info.run_id, "confirm.winner": "trial 1",
        "confirm.p_value": "0.012", "confirm.beats_baseline": "true", "promoted.forced": "false"}
    assert tags["confirm.mean_std.baseline_trial_0"] == "0.1100 +/- 0.0100 (n=3)"
    assert tags["confirm.mean_std.trial_1"] == "0.1500 +/- 0.0100 (n=3)"
    assert tags["test.test/acc_at_best_val"] == "0.1500 +/- 0.0100 (n=3)" and tags["confirm.verdict"].startswith("yes: ")
    # The data: the files' checksums and the digests of the splits the run trained, validated and tested on.
    md5 = {k: v for k, v in run.data.tags.items() if k.startswith("data.md5.")}
    assert len(md5) == 4 and all(tags[k] == v for k, v in md5.items())
    digests = {i.tags[0].value: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert set(digests) == {"train", "validation", "test"}
    assert all(tags[f"data.digest.{split}"] == d for split, d in digests.items())
    out = shipped["result"].stdout
    assert f"promoted trial 1 of sweep 'shipit' (run {run.info.run_id}): registered model '{NAME}' version " \
           f"{champion.version}, alias 'champion'" in out
    assert f'mlflow.pytorch.load_model("models:/{NAME}@champion")' in out
    # Promoting the same winner again makes no second version.
    assert cli.main(["promote", "shipit", "--quiet"]) == 0
    assert [v.version for v in client.search_model_versions(f"name = '{NAME}'")] == [champion.version]


def test_the_manuals_snippet_loads_the_champion_and_predicts_on_real_test_images(at_store, tmp_path, private_tmp):
    """The manual's snippet under "## Promote the winner" (docs/shipping.md), as it stands there, in a fresh
    process from the project folder that cannot import `alexnet` (the model carries it)."""
    snippet = (ROOT / "docs" / "shipping.md").read_text().split("## Promote the winner")[1].split("```python\n")[1].split("```")[0]
    assert f"models:/{NAME}@champion" in snippet
    fake_home = tmp_path / "user"
    (fake_home / ".cache").mkdir(parents=True)
    (fake_home / ".cache" / "alexnet").symlink_to(datafiles.cache_dir())
    prelude = "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI") and not k.startswith("ALEXNET_")}
    result = subprocess.run([sys.executable, "-c", prelude + snippet], cwd=at_store["home"], capture_output=True,
                            text=True, timeout=300, env={**env, "HOME": str(fake_home)})
    assert result.returncode == 0, result.stderr[-3000:]
    predicted, true = (json.loads(line.split(":", 1)[1]) for line in result.stdout.splitlines()[-2:])
    test = data.load("", train=False)
    model = mlflow.pytorch.load_model(f"runs:/{at_store['run'].run_id}/model")
    with torch.no_grad():
        assert predicted == model(test.data[:8]).argmax(1).tolist()  # the champion is the winner's model
    assert true == test.targets[:8].tolist()


def test_promote_refuses_in_one_line_what_confirm_did_not_find_better_unless_forced(at_store, capsys):
    client = mlflow.MlflowClient()
    run_id = at_store["run"].run_id
    sweep_parent(client, "unconfirmed", "other-experiment", None)
    sweep_parent(client, "unproven", "other-experiment", confirmation(run_id, beats=False))
    sweep_parent(client, "tied", "other-experiment", {**confirmation(run_id), "winner": None,
                                                      "verdict": "no configuration besides the baseline to compare"})
    errors = {}
    for args, message in [(["nosuch"], "promote: no sweep 'nosuch'"),
                          (["unconfirmed"], "promote: sweep 'unconfirmed' has no confirmation (confirm.json on its "
                                            "parent run): run `alexnet confirm unconfirmed` first"),
                          (["unproven"], "promote: confirm did not find the winner, trial 1, better than the baseline "
                                         "(no: trial 1 is +0.0050 better on average, within seed noise"),
                          (["tied", "--force"], "promote: confirm found no winner for sweep 'tied'")]:
        assert cli.main(["promote", *args]) == 2, args
        errors[args[0]] = err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") <= 1, err  # the store's line, then the error
    assert "; --force promotes it all the same" in errors["unproven"]
    assert not client.search_registered_models("name = 'other-experiment'")  # nothing registered
    assert cli.main(["promote", "unproven", "--force", "--quiet"]) == 0
    forced = client.get_model_version_by_alias("other-experiment", "champion")
    assert forced.tags["promoted.forced"] == "true" and forced.tags["confirm.beats_baseline"] == "false"


def test_a_winner_without_its_model_is_logged_again_from_its_best_checkpoint(at_store, capsys, private_tmp):
    client = mlflow.MlflowClient()
    parent = sweep_parent(client, "relog", "relog-experiment", None)
    run = trial_run("relog", parent, 0.05, experiment="relog-experiment")
    for model in disk.logged_models(client.get_run(run.run_id)):  # the model gone, its checkpoint kept
        client.delete_logged_model(model.model_id)
    client.log_dict(parent, confirmation(run.run_id), "confirm.json")
    assert cli.main(["promote", "relog"]) == 0
    assert "has no model; logging it from its best checkpoint (epoch 1)" in capsys.readouterr().err
    champion = client.get_model_version_by_alias("relog-experiment", "champion")
    [model] = disk.logged_models(client.get_run(run.run_id))
    assert champion.source == f"models:/{model.model_id}"
    loaded = mlflow.pytorch.load_model("models:/relog-experiment@champion")
    with torch.no_grad():
        assert tuple(loaded(torch.zeros(2, 28, 28, dtype=torch.uint8)).shape) == (2, 10)


def test_a_winner_that_retention_emptied_is_refused_saying_why(at_store, capsys):
    client = mlflow.MlflowClient()
    parent = sweep_parent(client, "emptied", "emptied-experiment", None)
    run = client.create_run(store.experiment_id("emptied-experiment"), run_name="emptied-trial-1",
                            tags={"sweep.study": "emptied", "sweep.role": "trial", "sweep.trial": "1",
                                  "checkpoints": "deleted", "mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(run)
    client.log_dict(parent, confirmation(run), "confirm.json")
    assert cli.main(["promote", "emptied"]) == 2
    err = capsys.readouterr().err
    assert "has no model or checkpoint left: the sweep's retention deleted them (it keeps the top 2 trials')" in err
    assert not client.search_registered_models("name = 'emptied-experiment'")
