"""Confirm a sweep's winners: re-run the top K configurations and the baseline with S fresh seeds.

A sweep scores each configuration on one seed, so its ranking is partly seed noise: the top trial
is the one that was good *and* lucky. `alexnet confirm STUDY --top K --seeds S` trains each of the
top K configurations and the base experiment's own values again with seeds 1000, 1001, ... (never
the sweep's), as child runs of the study's parent run tagged `sweep.role=confirm`, and prints the
objective's mean +/- std per configuration.

The verdict: the winner (the top configuration with the best mean over the fresh seeds) beats the
baseline beyond seed noise when Welch's t-test, one-sided, gives p < 0.05 after Holm's correction over
the K top configurations. Welch's, because two configurations need not share a variance (a high learning
rate is noisier than a low one); a t-test rather than "mean +/- 2 standard errors do not overlap",
because with 3-5 seeds the standard error is itself uncertain and the t distribution widens the interval
for exactly that (non-overlap of 2-SE bars is also far stricter than p < 0.05).

Why a correction, and why Holm's. The winner is the best of K means over the same seeds, so testing it
alone at 0.05 asks K questions and reports the luckiest answer: with K = 3 configurations no better than
the baseline and 3 seeds, that test said "yes" in 8% of 3,000 simulated confirms, not 5% (Holm: 2.5%). Every top configuration is therefore tested against the baseline, and the K p-values are adjusted
by Holm's step-down method; the verdict is "yes" only when the winner's adjusted p is below 0.05. Holm
bounds the chance of any false "better" among the K by 0.05 whatever the dependence between the tests
(they share the baseline's values, so they are correlated), so the winner's "yes" is bounded too, however
it was picked; it is never less powerful than Bonferroni, and with K = 1 it is the plain test. Fresh seeds
for a final winner-against-baseline test would also be honest, but would cost two more sets of runs and
throw away the seeds already trained; Holm costs no run. `confirm.json` keeps both p-values: `p_value`
(Holm-adjusted, the one the verdict and `alexnet promote` use) and `p_value_uncorrected`.

Selection and judgement use the study's objective, validation accuracy by default (`val/best_acc`),
under the sweep's own split (same `val_size` and `split_seed`; only the seed changes). Test accuracy
(`test/acc_at_best_val`: each run's epoch chosen by validation) is read only after the winner and the
verdict are settled, and reported as the final figure: nothing is chosen by it. A study that selected on
a test metric is refused.

Runs already confirmed (same params, same seed, FINISHED) are reused, so an interrupted confirm
resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import sys
from typing import NamedTuple

import mlflow
import numpy as np
from scipy import stats

from alexnet import UsageError, home
from alexnet.tracking import disk, store
from alexnet.training.config import Config
from alexnet.sweep.ledger import confirm_runs, study_settings
from alexnet.sweep.spec import format_params
from alexnet.sweep.study import load_study, ranked
from alexnet.sweep.ledger import objective_value
from alexnet.tracking.lifecycle import tracked_train
from alexnet.training.train import Diverged
from alexnet.tracking.views import NOTE

FIRST_SEED = 1000  # fresh seeds: the sweep trains every trial with the base config's seed (0 by default)
ALPHA = 0.05


def welch(a: list[float], b: list[float], better: str) -> float:
    """One-sided p-value that `a`'s mean is better (greater for 'maximize') than `b`'s."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if max(a) == min(a) and max(b) == min(b):  # no spread at all: the t statistic is infinite or undefined
        diff = (a[0] - b[0]) * (1 if better == "maximize" else -1)
        return 0.0 if diff > 0 else 1.0
    return float(stats.ttest_ind(a, b, equal_var=False,
                                 alternative="greater" if better == "maximize" else "less").pvalue)


def choose(study, top: int) -> dict:
    """The configurations to confirm, keyed by their params as JSON: the baseline first (the base
    experiment's own values, which may be a top trial too), then the top K distinct trials."""
    settings = study_settings(study)
    base_params = {k: settings.config[k] for k in settings.space}
    best = ranked(study, settings.direction)
    top_configs = {}
    for t in best:
        key = json.dumps(t.params, sort_keys=True)
        if key not in top_configs and len(top_configs) < top:
            top_configs[key] = {"label": f"trial {t.number}", "params": t.params, "sweep": objective_value(t),
                                "trial": t.number, "run_id": t.user_attrs.get("mlflow_run_id")}
    base_key = json.dumps(base_params, sort_keys=True)
    if base_key in top_configs:
        top_configs[base_key]["label"] = f"baseline = {top_configs[base_key]['label']}"
        return {base_key: top_configs.pop(base_key), **top_configs}
    base_trial = next((t for t in best if t.user_attrs.get("baseline")), None)
    return {base_key: {"label": f"baseline = trial {base_trial.number}" if base_trial else "baseline",
                       "params": base_params, "sweep": objective_value(base_trial) if base_trial else None,
                       "trial": base_trial.number if base_trial else None,
                       "run_id": base_trial.user_attrs.get("mlflow_run_id") if base_trial else None}, **top_configs}


def test_metric(base_config: dict) -> str:
    """The final figure: the test accuracy of the epoch validation chose, or without a validation split
    the last epoch's (neither is ever selected on)."""
    return "test/acc_at_best_val" if base_config.get("val_size", 0) > 0 else "test/acc"


def train_seeds(study, configs: dict, seed_list: list[int], quiet: bool) -> None:
    """Each configuration's objective over the fresh seeds, in `c["values"]`, and its final test figure,
    in `c["test_values"]`, kept apart: runs confirmed before (same params, same seed, FINISHED) are
    reused, so an interrupted confirm resumes where it stopped."""
    settings, name = study_settings(study), study.study_name
    objective, base = settings.objective, settings.config
    final = test_metric(base)
    done = {}  # (params key, seed) -> (objective value, test value)
    for run in confirm_runs(name, experiment=base["experiment"]):
        tags, metrics = run.data.tags, run.data.metrics
        if run.info.status == "FINISHED" and objective in metrics:
            done[(tags.get("sweep.confirm_params"), int(tags.get("sweep.seed", -1)))] = \
                (metrics[objective], metrics.get(final, math.nan))
    say = (lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    say(f"confirm {name!r}: {len(configs)} configurations x {len(seed_list)} fresh seeds "
        f"({seed_list[0]}-{seed_list[-1]}), {sum((k, s) not in done for k in configs for s in seed_list)} runs to train")
    for key, c in configs.items():
        c["values"], c["test_values"] = [], []
        for seed in seed_list:
            if (key, seed) in done:
                c["values"].append(done[(key, seed)][0])
                c["test_values"].append(done[(key, seed)][1])
                continue
            cfg = Config(**{**base, **c["params"], "seed": seed,
                            "run_name": f"{name}-confirm-{c['label'].split(' =')[0].replace(' ', '')}-seed{seed}"})
            tags = {"sweep.study": name, "sweep.role": "confirm", "sweep.confirm_of": c["label"],
                    "sweep.confirm_params": key, "sweep.seed": str(seed),
                    NOTE: f"Confirm run of sweep '{name}': {c['label']} ({format_params(c['params'])}) again with the "
                          f"fresh seed {seed}, to measure its {objective} beyond one seed's luck."}
            started = {}
            try:
                run = tracked_train(cfg, source=settings.source or None, parent_run_id=study.user_attrs["mlflow_parent_run_id"],
                                    tags=tags, progress=not quiet, objective=objective,
                                    on_start=lambda run_id: started.update(run_id=run_id))
                value, test = run.records[-1].metrics()[objective], run.records[-1].metrics().get(final, math.nan)
            except Diverged:
                value = test = math.nan  # counted in n, left out of the mean: a config that diverges is not confirmed
            # A confirm run is there for its metrics: its checkpoints and model go (alexnet/team/cleanup.py).
            disk.delete_checkpoints(started["run_id"])
            c["values"].append(value)
            c["test_values"].append(test)
            say(f"  {c['label']}, seed {seed}: {objective} {value:.4f}")


class Verdict(NamedTuple):
    words: str            # "yes: ...", "no: ..." or "cannot tell: ..."
    winner: dict | None   # the top configuration with the best mean, if any trained
    p: float              # the winner's one-sided Welch p-value, Holm-adjusted over the compared configurations
    p_uncorrected: float  # the same test alone, as if the winner had been the only configuration
    compared: int         # K: the top configurations tested against the baseline


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given. A test that could not be made (NaN)
    counts as p = 1: it rejects nothing, but it was one of the questions asked."""
    ps = [1.0 if math.isnan(p) else p for p in p_values]
    adjusted, running = [1.0] * len(ps), 0.0
    for rank, i in enumerate(sorted(range(len(ps)), key=lambda i: ps[i])):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def verdict(rows: list[dict], direction: str) -> Verdict:
    """Whether the best top configuration beats the baseline (rows[0]) beyond seed noise, each row's
    `finite` values and `mean` given; every other row is a top configuration, tested against the
    baseline and Holm-corrected over all of them (diverged ones included: they were compared too)."""
    sign = 1 if direction == "maximize" else -1
    baseline, others = rows[0], rows[1:]
    contenders = [c for c in others if math.isfinite(c["mean"])]
    if not contenders:
        return Verdict("no configuration besides the baseline to compare" if not others else
                       "no top configuration trained without diverging: nothing beats the baseline",
                       None, math.nan, math.nan, len(others))
    raw = [welch(c["finite"], baseline["finite"], direction) for c in others]
    adjusted = holm(raw)
    winner = max(contenders, key=lambda c: sign * c["mean"])
    i = next(j for j, c in enumerate(others) if c is winner)
    p_raw, k = raw[i], len(others)
    p = math.nan if math.isnan(p_raw) else adjusted[i]
    diff = winner["mean"] - baseline["mean"]
    test = (f"Welch's t-test, one-sided p = {p_raw:.2g}" if k == 1 else
            f"Welch's t-test, one-sided p = {p_raw:.2g}, Holm-adjusted over {k} top configurations p = {p:.2g}")
    if sign * diff <= 0:
        words = (f"no: the baseline ({baseline['mean']:.4f}) is at least as good as the best top configuration, "
                 f"{winner['label']} ({winner['mean']:.4f})")
    elif math.isnan(p):
        words = f"cannot tell: {winner['label']} {diff:+.4f}, but it or the baseline has fewer than 2 finite values"
    elif p < ALPHA:
        words = f"yes: {winner['label']} beats the baseline by {diff:+.4f} beyond seed noise ({test} < {ALPHA})"
    else:
        words = (f"no: {winner['label']} is {diff:+.4f} better on average, within seed noise ({test} >= {ALPHA}): "
                 f"more seeds may tell")
    return Verdict(words, winner, p, p_raw, k)


def confirm(study_name: str, top: int = 3, seeds: int = 3, storage: str | None = None, quiet: bool = False) -> int:
    """`alexnet confirm STUDY`: train, print the table and the verdict, record both on the parent run."""
    if top < 1:
        raise UsageError(f"confirm: --top must be >= 1, got {top}")
    if seeds < 2:
        raise UsageError(f"confirm: --seeds must be >= 2 to measure seed noise, got {seeds}")
    store.set_up_store()
    study = load_study(study_name, storage)
    settings = study_settings(study)
    home.announce(settings.config["experiment"])
    objective, direction, parent = settings.objective, settings.direction, study.user_attrs["mlflow_parent_run_id"]
    if objective.startswith("test/"):
        raise UsageError(f"confirm: study {study_name!r} selected on {objective}, a test metric: its ranking is biased "
                         f"upwards; sweep again with a validation objective (val/best_acc, the default)")
    if not ranked(study, direction):
        raise UsageError(f"confirm: study {study_name!r} has no COMPLETE trial yet: let the sweep finish first")
    configs = choose(study, top)
    seed_list = [FIRST_SEED + i for i in range(seeds)]
    train_seeds(study, configs, seed_list, quiet)

    # --- Selection and verdict: the objective alone ---
    sign = 1 if direction == "maximize" else -1
    rows = list(configs.values())
    for c in rows:
        c["finite"] = [v for v in c["values"] if math.isfinite(v)]
        c["mean"], c["std"] = mean_std(c["finite"])
    # The baseline first, then the others best first (by the objective's mean; diverged last).
    rows = rows[:1] + sorted(rows[1:], key=lambda c: -sign * c["mean"] if math.isfinite(c["mean"]) else math.inf)
    judged = verdict(rows, direction)
    words, winner, p = judged.words, judged.winner, judged.p
    width = max(len(c["label"]) for c in rows)
    print(f"{objective} over {seeds} fresh seeds ({direction}); sweep value = the trial's single-seed value")
    for c in rows:
        diverged = len(c["values"]) - len(c["finite"])
        sweep_value = f"sweep {c['sweep']:.4f}" if c["sweep"] is not None else "sweep -"
        print(f"  {c['label']:<{width}}  {c['mean']:.4f} +/- {c['std']:.4f}  (n={len(c['finite'])}"
              f"{f', {diverged} diverged' if diverged else ''}; {sweep_value})  {format_params(c['params'])}")
    print(f"winner beats the baseline? {words}")

    # --- The final figure, read only now: test accuracy, chosen by nothing ---
    final = test_metric(settings.config)
    for c in rows:
        c["test_mean"], c["test_std"] = mean_std([v for v in c["test_values"] if math.isfinite(v)])
    shown = [rows[0]] + ([winner] if winner is not None and winner is not rows[0] else [])
    print(f"final test accuracy ({final}, over the same seeds; never used to choose): "
          + "; ".join(f"{c['label']} {c['test_mean']:.4f} +/- {c['test_std']:.4f}" for c in shown))

    client = mlflow.MlflowClient()
    # `alexnet promote` reads it: the winner, whether it beat the baseline, its sweep trial and run.
    client.log_dict(parent, {"objective": objective, "direction": direction, "seeds": seed_list, "alpha": ALPHA,
                             "test": f"Welch's t-test, one-sided, Holm-corrected over {judged.compared} top configurations",
                             "p_value": None if math.isnan(p) else p, "compared": judged.compared,
                             "p_value_uncorrected": None if math.isnan(judged.p_uncorrected) else judged.p_uncorrected,
                             "winner": winner["label"] if winner else None, "verdict": words,
                             "beats_baseline": words.startswith("yes:"),
                             "winner_trial": winner["trial"] if winner else None,
                             "winner_run_id": winner["run_id"] if winner else None,
                             "final_test_metric": final,
                             "configs": [{k: c[k] for k in ("label", "params", "values", "mean", "std", "sweep", "trial",
                                                            "run_id", "test_values", "test_mean", "test_std")}
                                         for c in rows]}, "confirm.json")
    client.set_tag(parent, "confirm.verdict", words[:5000])
    return 0


def mean_std(values: list[float]) -> tuple[float, float]:
    return (float(np.mean(values)) if values else math.nan,
            float(np.std(values, ddof=1)) if len(values) > 1 else math.nan)
