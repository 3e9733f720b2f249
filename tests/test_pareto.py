"""Cost-aware sweeps on real data: a second objective (the cost), the Pareto front on the parent run
(pareto.csv, Optuna's plot of it, the interactive HTML page), retention and `alexnet gc` keeping the
front, `alexnet runs --pareto`. The rules (two objectives, constraints, seeded trials) also on studies
built with Optuna's own API, without training. A constraint on real trials: tests/test_warm_start.py
(an epoch's seconds depend on the machine's load, up to 10x here: its test splits trials by recorded
measurements instead).

Budget: one sweep of three queued 1-epoch trials at resize 67 and 75 on 128 training images (100
validation, 100 test), about 30 s on 2 cores.
"""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import create_trial

from alexnet import UsageError, cli
from alexnet.training import sizes
from alexnet.team.cleanup import trial_items
from alexnet.sweep import costs
from alexnet.sweep.spec import load_sweep
from alexnet.sweep.study import ranked, tally
from alexnet.sweep.ledger import pareto_front, seeded
from conftest import ROOT

PRICED = """
study = "priced"
n_trials = 3
cost = "flops"
enqueue_base = false
keep_top = 1
heartbeat_seconds = 1
grace_seconds = 4

[space]
resize = { choices = [67, 75] }
lr = { low = 0.01, high = 0.1, log = true }

[set]
train_limit = 128
val_size = 100
test_limit = 100
batch_size = 64
eval_batch_size = 100
epochs = 1
"""
QUEUED = [{"resize": 67, "lr": 0.05}, {"resize": 75, "lr": 0.05}, {"resize": 67, "lr": 0.01}]


@pytest.fixture(scope="module")
def priced(tmp_path_factory):
    home = tmp_path_factory.mktemp("priced")
    path = home / "priced.toml"
    path.write_text(PRICED)
    (home / "mlruns").mkdir()
    storage = f"sqlite:///{home / 'mlruns' / 'optuna.db'}"
    queued = optuna.create_study(study_name="priced", storage=storage, directions=["maximize", "minimize"])
    for params in QUEUED:
        queued.enqueue_trial(params)
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "ALEXNET_HOME": str(home)}
    result = subprocess.run([sys.executable, "-m", "alexnet", "sweep", path], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="priced", storage=storage)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlruns' / 'mlflow.db'}")
    return {"home": home, "result": result, "study": study, "client": client,
            "parent": client.get_run(study.user_attrs["mlflow_parent_run_id"])}


def dominates(a, b) -> bool:
    """a dominates b: accuracy (maximised) and cost (minimised) at least as good, one of them better."""
    return a[0] >= b[0] and a[1] <= b[1] and a != b


def test_a_cost_aware_sweep_prices_every_trial_and_puts_its_pareto_front_on_the_parent(priced):
    study, client, parent = priced["study"], priced["client"], priced["parent"]
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 and [t.params for t in trials] == QUEUED
    for t in trials:  # the cost: FLOPs of one trained image, 3x the forward pass at the trial's resize
        assert t.values[1] == 3 * sizes.flops_per_image(t.params["resize"])
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.metrics["cost/flops"] == t.values[1] and run.data.metrics["val/best_acc"] == t.values[0]
    # The front on the parent: exactly the feasible trials that no feasible trial dominates.
    csv = Path(client.download_artifacts(parent.info.run_id, "pareto.csv", str(priced["home"])))
    rows = [line.split(",") for line in csv.read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    assert header[:3] == ["trial", "val/best_acc", "cost/flops"]
    on_front = {int(r[0]) for r in rows}
    points = {t.number: (t.values[0], t.values[1]) for t in trials}
    assert on_front == {n for n, p in points.items() if not any(dominates(q, p) for q in points.values())}
    assert on_front == {t.number for t in study.best_trials}  # Optuna's own front
    assert on_front & {0, 2}  # the best of the cheapest trials is on it
    for r in rows:
        assert float(r[1]) == study.trials[int(r[0])].values[0] and float(r[2]) == study.trials[int(r[0])].values[1]
    assert parent.data.metrics["sweep/pareto_size"] == len(on_front)
    assert parent.data.params["cost"] == "flops" and "max_epoch_seconds" not in parent.data.params
    plots = {f.path for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/pareto_front.png", "plots/sweep.html", "plots/optimization_history.png"} <= plots
    assert "Pareto front (cheapest first" in parent.data.tags["mlflow.note.content"]

    # The best trial, by the objective alone, is on the front.
    best = max(trials, key=lambda t: (t.values[0], -t.number))
    assert parent.data.tags["best.trial"] == str(best.number) and best.number in on_front
    out, err = priced["result"].stdout, priced["result"].stderr
    assert f"best: trial {best.number}, val/best_acc {best.values[0]:.4f}, flops" in out
    assert "Pareto front (val/best_acc against FLOPs per trained image, cheapest first): trial " in out
    assert "pruning:" not in out and "--pareto" in out
    for t in trials:
        assert f"trial   {t.number} COMPLETE val/best_acc {t.values[0]:.4f}, flops {t.values[1]:.3g}" in err


def test_the_interactive_page_holds_every_plot_and_plotly_once(priced):
    client, parent = priced["client"], priced["parent"]
    page = Path(client.download_artifacts(parent.info.run_id, "plots/sweep.html", str(priced["home"]))).read_text()
    assert page.count("<h2>") == 4 and "Pareto front: val/best_acc against FLOPs per trained image" in page
    assert page.count("Plotly.newPlot(") == 4  # one figure each ...
    assert page.count("plotly.js v") == 1  # ... and plotly.js inside the file once: no network needed to view it
    assert "<script src=\"http" not in page and len(page) < 6e6


def test_retention_keeps_the_front_and_drops_the_infeasible(priced, monkeypatch):
    study, client = priced["study"], priced["client"]
    front = {t.number for t in study.best_trials}
    for t in study.trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        kept = t.number in front or t.number == ranked(study, "maximize")[0].number
        assert (run.data.tags.get("checkpoints") != "deleted") == kept, t.number
    # `alexnet gc` reads the same policy from the runs alone: it finds nothing more to delete.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{priced['home'] / 'mlruns' / 'mlflow.db'}")
    assert trial_items(client.search_runs([priced["parent"].info.experiment_id], max_results=100)) == []


def test_runs_pareto_prints_the_front_and_refuses_where_there_is_none(priced, monkeypatch, capsys):
    monkeypatch.setenv("ALEXNET_HOME", str(priced["home"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["runs", "--sweep", "priced", "--pareto"]) == 0
    out = capsys.readouterr().out
    front = sorted(priced["study"].best_trials, key=lambda t: t.values[1])
    assert out.startswith(f"sweep 'priced': Pareto front, {len(front)} trial")
    lines = out.splitlines()[2:]
    assert [int(line.split()[0]) for line in lines] == [t.number for t in front]
    assert out.splitlines()[1].split()[:5] == ["trial", "val/best_acc", "cost/flops", "resize", "lr"]
    assert cli.main(["runs", "--pareto"]) == 2
    assert "--pareto prints a sweep's Pareto front: name the sweep with --sweep" in capsys.readouterr().err
    # A sweep with one objective has no front, and says how to get one.
    client = priced["client"]
    flat = client.create_run(priced["parent"].info.experiment_id, tags={"sweep.study": "flat", "sweep.role": "parent"})
    client.log_param(flat.info.run_id, "objective", "maximize val/best_acc")
    client.set_terminated(flat.info.run_id)
    assert cli.main(["runs", "--sweep", "flat", "--pareto"]) == 2
    assert "sweep 'flat' has one objective, so no Pareto front: a sweep file with cost = " in capsys.readouterr().err


# --- The rules on studies built with Optuna's API ---------------------------------------------------

D = {"lr": FloatDistribution(0.001, 0.1, log=True), "resize": CategoricalDistribution([67, 96])}


def trial(values, constraint=None, **attrs):
    return create_trial(params={"lr": 0.01, "resize": 67}, distributions=D, values=values, user_attrs=attrs,
                        constraints=None if constraint is None else {"epoch_seconds": constraint})


def test_ranking_skips_infeasible_trials_and_counts_no_seeded_trial():
    study = optuna.create_study(direction="maximize")
    study.add_trials([trial([0.9], constraint=1.5), trial([0.7], constraint=-0.5), trial([0.8], constraint=0.0),
                      trial([0.95], seeded_from="old trial 4")])
    assert [t.number for t in ranked(study, "maximize")] == [3, 2, 1]  # 0 is infeasible (over by 1.5 s)
    assert study.best_trial.number == 3  # Optuna agrees: the best trial is a feasible one
    done, running, waiting = tally(study)
    assert [t.number for t in done] == [0, 1, 2] and seeded(study.trials[3])  # n_trials counts trained trials


def test_the_front_of_a_two_objective_study_is_optunas_non_dominated_set():
    study = optuna.create_study(directions=["maximize", "minimize"])
    points = [(0.5, 3.0), (0.6, 3.0), (0.6, 5.0), (0.4, 1.0), (0.7, 9.0), (0.65, 9.5), (0.7, 9.0), (0.9, 20.0)]
    study.add_trials([trial(list(p)) for p in points] + [trial([0.99, 0.5], constraint=2.0)])
    front = pareto_front(study.trials, ["maximize", "minimize"])
    assert [t.number for t in front] == [3, 1, 4, 6, 7]  # cheapest first; equal points both stay
    assert {t.number for t in front} == {t.number for t in study.best_trials}
    for t in front:
        assert not any(dominates(q, tuple(t.values)) for q in points)
    assert [t.number for t in ranked(study, "maximize")][:2] == [7, 4]  # by the objective; the infeasible 8 never


def test_costs_from_what_a_trial_measured(tmp_path):
    from alexnet.training.train import EpochRecord

    records = [EpochRecord(1, 2.0, 0.1, 0.1, 0.1, 1, 400.0, 300.0, 3.0), EpochRecord(2, 1.0, 0.2, 0.2, 0.2, 2, 500.0, 350.0, 5.0)]
    measured = costs.measure(records, 96)
    assert measured == {"train_seconds": 8.0, "epoch_seconds": 4.0, "examples_per_sec": 500.0,
                        "flops_per_image": 3 * sizes.flops_per_image(96)}
    assert [costs.cost_of(c, measured) for c in ("seconds", "flops", "inverse_throughput")] == \
        [8.0, 3 * sizes.flops_per_image(96), 1 / 500.0]
    path = tmp_path / "bounded.toml"
    path.write_text("max_epoch_seconds = 3.5\n[space]\nlr = { low = 0.001, high = 0.1 }\n")
    assert costs.constraints(load_sweep(path), measured) == {"epoch_seconds": 0.5}


def test_a_cost_with_a_pruner_is_refused_naming_the_constraint_instead(tmp_path):
    path = tmp_path / "both.toml"
    path.write_text('cost = "seconds"\npruner = "median"\n[space]\nlr = { low = 0.001, high = 0.1 }\n')
    with pytest.raises(UsageError, match=r"Optuna cannot prune a multi-objective study: set pruner = \"none\", or "
                                         r"keep one objective and pruning .*\(max_epoch_seconds = S\)"):
        load_sweep(path)
    path.write_text('cost = "seconds"\n[space]\nlr = { low = 0.001, high = 0.1 }\n')
    assert load_sweep(path).pruner == "none"  # a cost alone turns the default pruner off
    path.write_text('max_epoch_seconds = 30\n[space]\nlr = { low = 0.001, high = 0.1 }\n')
    assert load_sweep(path).pruner == "median"  # a constraint keeps one objective, and pruning
    path.write_text('cost = "dollars"\n[space]\nlr = { low = 0.001, high = 0.1 }\n')
    with pytest.raises(UsageError, match="cost = 'dollars' is not allowed"):
        load_sweep(path)
