"""One owner for each fact of a study (`alexnet/sweep/ledger.py`), on real temporary stores.

A study is set up by the launcher's own `set_up` (its Optuna study, its parent run, its settings), then
given trials with Optuna's API and trial runs with MLflow's client, files of real size on disk: two trials
tied on the objective, whose runs started in the other order than their numbers (parallel workers do
that), and a trial Optuna marked FAIL after its run FINISHED (its worker died before Optuna heard of the
result). The sweep's retention and `alexnet gc` must keep exactly the same checkpoints: the earlier of
the tied trials; never the failed one, however good its run's metric looks.
"""

import json

import mlflow
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from alexnet import cli
from alexnet.sweep import ledger, retention
from alexnet.sweep.launcher import set_up, worker_orders
from alexnet.sweep.spec import load_sweep
from alexnet.tracking import store

MB = 10**6
SWEEP = """study = "tied"
n_trials = 4
keep_top = 1
enqueue_base = false
[space]
lr = { low = 0.001, high = 0.1, log = true }
"""
# (Optuna state, value, lr, the order its run started in): trials 0 and 1 tie; trial 1's run started
# first. Trial 2's run FINISHED with the best metric of all, but Optuna marked the trial FAIL.
TRIALS = [(TrialState.COMPLETE, 0.194, 0.01, 1), (TrialState.COMPLETE, 0.194, 0.02, 0),
          (TrialState.FAIL, 0.9, 0.03, 2), (TrialState.COMPLETE, 0.1, 0.04, 3)]


def sweep_file(folder, text=SWEEP, name="tied.toml"):
    path = folder / name
    path.write_text(text)
    return path


def trial_run(client, exp, study, parent, number, value):
    """A trial run as a worker leaves it: checkpoint, config, logged model, its objective, FINISHED."""
    run = client.create_run(exp, run_name=f"{study}-trial-{number}", tags={
        "sweep.study": study, "sweep.role": "trial", "sweep.trial": str(number), "mlflow.parentRunId": parent})
    folder = store.local_artifact_dir(run.info.artifact_uri)
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.pt").write_bytes(b"\0" * MB)
    (folder / "config.toml").write_text("lr = 0.01\n")
    model = client.create_logged_model(exp, name="model", source_run_id=run.info.run_id)
    (store.local_artifact_dir(model.artifact_location)).mkdir(parents=True, exist_ok=True)
    (store.local_artifact_dir(model.artifact_location) / "model.pth").write_bytes(b"\0" * MB)
    client.log_metric(run.info.run_id, "val/best_acc", value)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@pytest.fixture
def tied(home):
    """A stopped sweep before its retention ran: {trial number: run id}, the study, the sweep."""
    store.set_up_store()
    sweep = load_sweep(sweep_file(home))
    study, parent, _ = set_up(sweep, 1, "alexnet sweep tied.toml")
    client = mlflow.MlflowClient()
    exp = store.experiment_id(sweep.config["experiment"])
    runs = {}
    for number, (state, value, lr, _) in sorted(enumerate(TRIALS), key=lambda x: x[1][3]):  # runs' start order
        runs[number] = trial_run(client, exp, "tied", parent, number, value)
    for number, (state, value, lr, _) in enumerate(TRIALS):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr}, distributions={"lr": FloatDistribution(0.001, 0.1, log=True)}, state=state,
            value=value if state == TrialState.COMPLETE else None, user_attrs={"mlflow_run_id": runs[number]}))
    client.set_terminated(parent, "KILLED")  # stopped before its retention ran
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    return {"runs": runs, "study": study, "sweep": sweep, "parent": parent}


def holding(runs: dict) -> set[int]:
    """The trials whose runs still hold checkpoints."""
    return {n for n, run_id in runs.items()
            if (store.local_artifact_dir(mlflow.get_run(run_id).info.artifact_uri) / "checkpoints" / "last.pt").exists()}


def test_kept_trials_ranks_by_optunas_value_ties_to_the_earlier_trial_and_skips_fail(tied):
    trials = tied["study"].get_trials(deepcopy=False)
    assert ledger.kept_trials(trials, tied["sweep"]) == {0}
    assert [t.number for t in ledger.rank(trials, "maximize")] == [0, 1, 3]  # trial 2 is FAIL: never ranked
    assert [t.number for t in ledger.rank(trials, "minimize")] == [3, 0, 1]
    # Trial 2's run FINISHED with the best metric of all; Optuna's state is the truth.
    run = mlflow.get_run(tied["runs"][2])
    assert run.info.status == "FINISHED" and run.data.metrics["val/best_acc"] == 0.9
    gone = ledger.releasable(ledger.trial_runs("tied"), trials, tied["sweep"])
    assert sorted(r.data.tags["sweep.trial"] for r in gone) == ["1", "2", "3"]
    check_settings(tied)


def test_gc_yes_on_a_tied_sweep_keeps_exactly_what_the_sweep_keeps(tied, capsys):
    runs = tied["runs"]
    assert cli.main(["gc", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "sweep 'tied': checkpoints and models of trials outside its top 1: 3 runs, 6.0 MB" in out
    assert holding(runs) == {0}  # the earlier of the tied trials, as the sweep's retention keeps
    # The sweep's own retention, run now, finds nothing more to delete: the two agree.
    assert retention.retain(tied["study"], tied["sweep"]) == 0
    assert holding(runs) == {0}


def test_the_sweeps_retention_then_gc_delete_nothing_the_sweep_kept(tied, capsys):
    runs = tied["runs"]
    assert retention.retain(tied["study"], tied["sweep"]) == 6 * MB
    assert holding(runs) == {0}
    assert cli.main(["gc", "--yes"]) == 0
    assert "outside its top" not in capsys.readouterr().out
    assert holding(runs) == {0}


def test_gc_leaves_a_study_whose_optuna_storage_is_gone_as_it_is(tied, capsys):
    settings_path = store.local_artifact_dir(mlflow.get_run(tied["parent"]).info.artifact_uri) / ledger.SETTINGS_FILE
    data = json.loads(settings_path.read_text())
    settings_path.write_text(json.dumps({**data, "storage": data["storage"].replace("optuna.db", "elsewhere.db")}))
    assert cli.main(["gc", "--yes"]) == 0
    captured = capsys.readouterr()
    assert "sweep 'tied': its trials are left as they are: its Optuna storage" in captured.err
    assert holding(tied["runs"]) == {0, 1, 2, 3}


def check_settings(tied):
    """Written once per launch, from the resolved sweep; read back typed, from the study and the parent."""
    sweep, study = tied["sweep"], tied["study"]
    parent = ledger.parent_run("tied")
    assert parent.info.run_id == tied["parent"]
    from_parent, from_study = ledger.parent_settings(parent), ledger.study_settings(study)
    assert from_parent == from_study == sweep  # the storage is a local path here: nothing to mask
    assert type(from_parent.keep_top) is int and type(from_parent.max_epoch_seconds) is float
    assert from_parent.space == {"lr": {"low": 0.001, "high": 0.1, "log": True, "step": None}}
    # What a worker is handed is the same object's serialisation, through JSON.
    orders = json.loads(json.dumps(worker_orders(sweep, 0, tied["parent"], 0.0, 1)))
    assert ledger.settings_from(orders["sweep"]) == sweep
    # A password in the storage never reaches the records; the study is opened without it.
    secret = ledger.settings_dict(sweep) | {"storage": "postgresql+psycopg://me:s3cret@db:5432/optuna"}
    assert ledger.settings_from(secret).storage.endswith("s3cret@db:5432/optuna")


def test_a_password_is_masked_in_the_recorded_settings_and_old_parents_still_read(home):
    import dataclasses
    from types import SimpleNamespace as NS

    store.set_up_store()
    sweep = dataclasses.replace(load_sweep(sweep_file(home)), storage="postgresql+psycopg://me:s3cret@db:5432/optuna")
    client = mlflow.MlflowClient()
    parent = client.create_run(store.experiment_id(sweep.config["experiment"])).info.run_id
    attrs = {}
    ledger.write_settings(NS(set_user_attr=attrs.__setitem__), parent, sweep)
    assert "s3cret" not in json.dumps(attrs) and attrs["settings"]["storage"] == "postgresql+psycopg://me:***@db:5432/optuna"
    assert ledger.parent_settings(mlflow.get_run(parent)) == dataclasses.replace(sweep, storage=attrs["settings"]["storage"])

    # A parent run from before settings.json: read from its params.
    parent = client.create_run(store.experiment_id("alexnet-fashion-mnist"), tags={"sweep.study": "old", "sweep.role": "parent"})
    for k, v in {"objective": "minimize train/loss", "keep_top": "2", "cost": "flops", "space.lr": "lr in [0.001, 0.1]"}.items():
        client.log_param(parent.info.run_id, k, v)
    settings = ledger.parent_settings(mlflow.get_run(parent.info.run_id))
    assert (settings.objective, settings.direction, settings.keep_top, settings.cost, list(settings.space)) == \
        ("train/loss", "minimize", 2, "flops", ["lr"])


def test_a_study_name_with_quotes_or_spaces_finds_its_runs_and_no_others(home):
    store.set_up_store()
    client = mlflow.MlflowClient()
    exp = store.experiment_id("alexnet-fashion-mnist")
    names = ["it's", "two words", 'say "hi"', """it's "both" """, "back\\slash"]
    # With neighbours a loose match (LIKE, a quote taken for any character) would also find.
    studies = set(names) | {n.replace("'", "_").replace('"', "_") for n in names} | {n + "x" for n in names}
    for study in studies:
        for role in ("parent", "trial", "trial", "confirm"):
            client.create_run(exp, tags={"sweep.study": study, "sweep.role": role})
    for name in names:
        assert len(ledger.trial_runs(name)) == 2 and len(ledger.confirm_runs(name, "alexnet-fashion-mnist")) == 1, name
        assert {r.data.tags["sweep.study"] for r in ledger.trial_runs(name)} == {name}
        assert ledger.parent_run(name).data.tags["sweep.study"] == name
        found = mlflow.search_runs(search_all_experiments=True, filter_string=ledger.study_filter(name, "trial"),
                                   output_format="list")
        assert name in {r.data.tags["sweep.study"] for r in found}  # the filter itself parses and matches
