"""Warm starts and enqueued runs, with a constraint: a real sweep (`alexnet sweep FILE --warm-start
STUDY@STORAGE --enqueue RUN_ID`) seeded from an earlier study built with Optuna's own API, whose trials
carry what they measured. The new study's constraint (`max_epoch_seconds = 0.001`) splits the trials by
those recorded measurements, not by this machine's speed: the seeded trials measured a fraction of a
millisecond per epoch (feasible) or 50 s (infeasible), and a real epoch always takes longer than 1 ms.

Budget: one trained trial (resize 67, 128 training, 100 validation and 100 test images, 1 epoch), then the
same command again (nothing to train), about 40 s on 2 cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from alexnet import cli
from alexnet.sweep.spec import load_sweep
from alexnet.sweep.study import distributions, ranked
from alexnet.sweep.ledger import feasible
from conftest import ROOT

WARM = """
study = "warm"
n_trials = 1
max_epoch_seconds = 0.001
keep_top = 1
heartbeat_seconds = 1
grace_seconds = 4

[space]
lr = { low = 0.001, high = 0.1, log = true }

[set]
resize = 67
train_limit = 128
val_size = 100
test_limit = 100
batch_size = 64
eval_batch_size = 100
epochs = 1
"""
# The earlier study searched dropout too; the new one fixes it at the default, 0.5.
OLD = [  # params, value, measured epoch seconds (None: nothing recorded), state
    ({"lr": 0.01, "dropout": 0.5}, 0.55, 0.0001, "COMPLETE"),    # the base's own values: the baseline, seeded
    ({"lr": 0.05, "dropout": 0.5}, 0.60, 0.0002, "COMPLETE"),    # seeded, the best feasible
    ({"lr": 0.5, "dropout": 0.5}, 0.70, 0.0001, "COMPLETE"),     # lr outside the new space: skipped
    ({"lr": 0.02, "dropout": 0.3}, 0.65, 0.0001, "COMPLETE"),    # another dropout: trained otherwise, skipped
    ({"lr": 0.03, "dropout": 0.5}, 0.99, 50.0, "COMPLETE"),      # seeded, infeasible here: never the best
    ({"lr": 0.04, "dropout": 0.5}, None, None, "PRUNED"),        # not COMPLETE: not used
    ({"lr": 0.07, "dropout": 0.5}, 0.50, None, "COMPLETE"),      # no recorded epoch time: cannot be priced
]


def measured(seconds):
    return {"train_seconds": seconds, "epoch_seconds": seconds, "examples_per_sec": 1000.0, "flops_per_image": 1e9}


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    home = tmp_path_factory.mktemp("warm")
    path = home / "warm.toml"
    path.write_text(WARM)
    sweep = load_sweep(path, storage=f"sqlite:///{home / 'mlruns' / 'optuna.db'}")
    old_storage = f"sqlite:///{home / 'old.db'}"
    old = optuna.create_study(study_name="old", storage=old_storage, direction="maximize")
    for k, v in {"base_config": sweep.config, "space": {}, "objective": "val/best_acc", "direction": "maximize",
                 "mlflow_parent_run_id": "old-parent"}.items():
        old.set_user_attr(k, v)
    old_dists = {"lr": FloatDistribution(0.001, 1.0, log=True), "dropout": FloatDistribution(0.0, 0.8)}
    for i, (params, value, seconds, state) in enumerate(OLD):
        attrs = {"mlflow_run_id": f"old-run-{i}", **({"measured": measured(seconds)} if seconds is not None else {})}
        old.add_trial(create_trial(state=TrialState[state], params=params, distributions=old_dists,
                                   value=value, intermediate_values={1: value or 0.1}, user_attrs=attrs))

    # Two runs to queue, made with MLflow's client (no training): lr 0.02, and lr 0.05, which a seeded
    # trial has measured already.
    (home / "mlruns").mkdir()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlruns' / 'mlflow.db'}")
    exp = client.create_experiment("alexnet-fashion-mnist", artifact_location=(home / "mlruns" / "artifacts").as_uri())
    queued = []
    for lr in ("0.02", "0.05"):
        run = client.create_run(exp, run_name=f"earlier-lr{lr}")
        client.log_param(run.info.run_id, "lr", lr)
        if lr == "0.02":  # trained for 3 epochs: the trial takes its lr, and the sweep's 1 epoch
            client.log_param(run.info.run_id, "epochs", "3")
        client.set_terminated(run.info.run_id)
        queued.append(run.info.run_id)

    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "ALEXNET_HOME": str(home)}
    command = [sys.executable, "-m", "alexnet", "sweep", path, "--warm-start", f"old@{old_storage}",
               "--enqueue", queued[0], "--enqueue", queued[1]]
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    study = optuna.load_study(study_name="warm", storage=sweep.storage)
    return {"home": home, "first": first, "again": again, "study": study, "client": client, "queued": queued,
            "old_storage": old_storage, "sweep": sweep,
            "parent": client.get_run(study.user_attrs["mlflow_parent_run_id"])}


def trial_runs(client, study: str) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`sweep.study` = '{study}' and tags.`sweep.role` = 'trial'")


def test_a_warm_start_seeds_the_fitting_trials_and_trains_none_of_them_again(warm):
    study, client = warm["study"], warm["client"]
    seeded = [t for t in study.trials if "seeded_from" in t.user_attrs]
    source = f"old@{warm['old_storage']}"
    assert [t.user_attrs["seeded_from"] for t in seeded] == [f"{source} trial {n}" for n in (0, 1, 4)]
    assert [(t.state.name, t.params, t.value) for t in seeded] == [
        ("COMPLETE", {"lr": 0.01}, 0.55), ("COMPLETE", {"lr": 0.05}, 0.60), ("COMPLETE", {"lr": 0.03}, 0.99)]
    assert all(t.distributions == distributions(warm["sweep"].space) for t in seeded)  # the NEW space's
    assert [t.user_attrs["mlflow_run_id"] for t in seeded] == ["old-run-0", "old-run-1", "old-run-4"]
    assert seeded[0].user_attrs.get("baseline") and seeded[0].intermediate_values == {1: 0.55}

    # Trained: the one enqueued run not measured before; not the baseline (seeded), not lr 0.05 (seeded).
    trained = [t for t in study.trials if "seeded_from" not in t.user_attrs]
    assert [(t.state.name, t.params, t.user_attrs.get("enqueued_from")) for t in trained] == \
        [("COMPLETE", {"lr": 0.02}, warm["queued"][0])]
    runs = trial_runs(client, "warm")
    assert [float(r.data.params["lr"]) for r in runs] == [0.02]  # nothing trained twice, even run again
    assert runs[0].data.params["epochs"] == "1"  # the sweep's config, not the enqueued run's 3 epochs
    assert warm["again"].returncode == 0, warm["again"].stderr[-3000:]
    assert len(study.trials) == 4  # the same command again: no second seeding, nothing new to train

    err, out = warm["first"].stderr, warm["first"].stdout
    assert (f"warm start from study '{source}': 3 of its COMPLETE trials seeded (not trained again), 3 skipped "
            f"(1 outside the space, e.g. trial 2: lr = 0.5 is not in lr log-uniform [0.001, 0.1]; 1 trained otherwise, "
            f"e.g. trial 3: dropout = 0.3, here 0.5; 1 without a measured cost, e.g. trial 6 recorded no training "
            f"time); 1 not COMPLETE, not used") in err
    assert f"--enqueue {warm['queued'][1]}: not queued, seeded trial 1 measured its values already" in err
    assert (f"--enqueue {warm['queued'][0]}: the run also trained with epochs = 3; the trial takes only its lr and "
            f"trains the sweep's config otherwise") in err
    assert "trial   0 COMPLETE" not in err  # seeded trials are not reported as this sweep's trials
    assert "sweep 'warm': 1 trials finished (1 COMPLETE, 0 PRUNED, 0 FAIL)" in out
    assert f"warm start: 3 more trials seeded from study '{source}' (not trained here)" in out

    tags = warm["parent"].data.tags  # the parent run records where the study started from
    assert tags["sweep.warm_start"] == source and tags["sweep.warm_start.seeded"] == "3"
    assert json.loads(tags["sweep.warm_start.skipped"]) == {"outside the space": [2], "trained otherwise": [3],
                                                            "without a measured cost": [6]}
    assert tags["sweep.enqueued"] == warm["queued"][0]


def test_the_sampler_sees_the_seeded_trials(warm):
    study = warm["study"]
    complete = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))  # what TPE reads
    assert {t.number for t in complete} >= {0, 1, 2}
    # TPE's model is built from COMPLETE trials: with 2 startup trials, it proposes from the seeded ones
    # at once (on a copy of the trials: proposing writes to the trial it proposes for).
    sampler = optuna.samplers.TPESampler(n_startup_trials=2, multivariate=True, seed=0)
    space = sampler.infer_relative_search_space(study, study.trials[-1])
    assert space == {"lr": FloatDistribution(0.001, 0.1, log=True)}
    copy, fresh = optuna.create_study(direction="maximize"), optuna.create_study(direction="maximize")
    copy.add_trials(complete)
    proposed = sampler.sample_relative(copy, copy.ask() and copy.trials[-1], space)
    assert set(proposed) == {"lr"} and 0.001 <= proposed["lr"] <= 0.1
    fresh_sampler = optuna.samplers.TPESampler(n_startup_trials=2, multivariate=True, seed=0)
    assert fresh_sampler.sample_relative(fresh, fresh.ask() and fresh.trials[-1], space) == {}  # nothing to model yet


def test_the_constraint_marks_infeasible_trials_and_the_best_is_feasible(warm):
    study, client = warm["study"], warm["client"]
    by_lr = {t.params["lr"]: t for t in study.trials}
    assert [feasible(by_lr[lr]) for lr in (0.01, 0.05, 0.03)] == [True, True, False]  # 0.0001 s, 0.0002 s, 50 s
    trained = by_lr[0.02]  # a real epoch takes more than 1 ms: infeasible, by what it measured
    run = client.get_run(trained.user_attrs["mlflow_run_id"])
    assert trained.constraints["epoch_seconds"] == pytest.approx(run.data.metrics["perf/epoch_seconds"] - 0.001)
    assert not feasible(trained) and run.data.tags["sweep.feasible"] == "false"
    # The best trial is the best feasible one (lr 0.05, 0.60), not the infeasible 0.99.
    assert [t.params["lr"] for t in ranked(study, "maximize")] == [0.05, 0.01]
    assert study.best_trial.params["lr"] == 0.05  # Optuna agrees
    parent = warm["parent"]
    assert parent.data.tags["best.trial"] == str(by_lr[0.05].number) and parent.data.tags["best.run_id"] == "old-run-1"
    out = warm["first"].stdout
    assert f"best: trial {by_lr[0.05].number}, val/best_acc 0.6000" in out and "(seeded from old@" in out
    assert "constraint: 1 of 1 trials took more than 0.001 s per epoch (infeasible: never ranked or kept)" in out
    # Retention ranks this study's own trials: its one trial is infeasible, so it keeps nothing.
    assert run.data.tags["checkpoints"] == "deleted"


def test_the_leaderboard_says_where_the_seeded_trials_are(warm, monkeypatch, capsys):
    monkeypatch.setenv("ALEXNET_HOME", str(warm["home"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["runs", "--sweep", "warm"]) == 0
    captured = capsys.readouterr()
    assert "warm-trial-3" in captured.out
    assert "and 3 trials seeded from study 'old@sqlite:///" in captured.err and "alexnet runs --sweep old" in captured.err


def test_a_warm_start_or_enqueue_that_cannot_be_is_refused_in_one_line(warm, monkeypatch, capsys):
    monkeypatch.setenv("ALEXNET_HOME", str(warm["home"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = warm["home"] / "warm.toml"
    cases = [(["--warm-start", "nosuch"], "sweep: --warm-start: no study 'nosuch' in sqlite:///"),
             (["--warm-start", "warm"], "sweep: --warm-start warm: a study cannot start from itself"),
             (["--warm-start", f"old@{warm['old_storage']}", "--dry-run"], "--dry-run runs in a temporary store"),
             (["--enqueue", "0123abc"], "sweep: --enqueue 0123abc: no such run in sqlite:///")]
    trials = len(warm["study"].trials)
    for args, message in cases:
        assert cli.main(["sweep", str(path), *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1, err
    assert len(optuna.load_study(study_name="warm", storage=warm["sweep"].storage).trials) == trials
    # A study that exists already (started without a warm start) is not seeded afterwards.
    other = Path(warm["home"] / "other.toml")
    other.write_text(WARM.replace('study = "warm"', 'study = "fresh"'))
    fresh, spec = optuna.create_study(study_name="fresh", storage=warm["sweep"].storage), load_sweep(other)
    for k in ("space", "objective", "direction", "cost", "max_epoch_seconds"):
        fresh.set_user_attr(k, getattr(spec, k))
    fresh.set_user_attr("base_config", spec.config)
    assert cli.main(["sweep", str(other), "--warm-start", f"old@{warm['old_storage']}"]) == 2
    assert "sweep: study 'fresh' already exists: --warm-start seeds a new study" in capsys.readouterr().err
    assert fresh.trials == []
