"""Warm starts: a new study that starts from what earlier work measured, instead of from nothing.

`alexnet sweep FILE --warm-start STUDY[@STORAGE]` seeds the new study with the COMPLETE trials of an
earlier one whose configuration lies in the new search space: the same config outside the searched
fields (device, data folder, workers, run name and experiment aside), and every searched value inside the
new space. Each becomes a COMPLETE trial of the new study (`study.add_trial`) with its params, its value(s)
and the NEW space's distributions, so the sampler (and the pruner, from its per-epoch values) starts
informed. Seeded trials are not trained again: they count toward nothing that trains (`n_trials` counts
trials this study trains), have no MLflow run of their own here (`mlflow_run_id` names the earlier run),
and say where they came from (`seeded_from`). The others are skipped, and counted by reason.

A cost-aware sweep prices a seeded trial from what the earlier trial measured (`measured`, see
`costs.py`), as it would its own; `max_epoch_seconds` likewise. A seeded trial with the base
experiment's own values is the new study's baseline: the base is not queued to train again.

`--enqueue RUN_ID` (repeatable) queues a run's own values of the searched fields as trials to train,
right after the baseline and before anything the sampler proposes; where the run trained with other
values of the fields the sweep fixes, it says so in one line (the trial trains the sweep's config).

Everything here reads; the launcher adds the trials, under the study lock, when it creates the study.
Torch-free.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field

import mlflow
import optuna
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from alexnet import UsageError
from alexnet.training.config import parse_value
from alexnet.home import default_storage, tracking_uri, where
from alexnet.redact import redact
from alexnet.sweep import costs
from alexnet.sweep.spec import Sweep, base_params, describe_space
from alexnet.sweep.ledger import made_by_sweep, study_settings
from alexnet.sweep.study import distributions, load_study
from alexnet.sweep.ledger import objective_value, seeded

IGNORED = {"device", "data_dir", "num_workers", "run_name", "experiment"}  # where a trial ran, not what it trained


@dataclass
class WarmStart:
    source: str                                   # "STUDY" or "STUDY@STORAGE" (password masked)
    trials: list = field(default_factory=list)    # FrozenTrials to add to the new study
    skipped: dict = field(default_factory=dict)   # reason -> [trial numbers]
    examples: dict = field(default_factory=dict)  # reason -> the first skipped trial's why, in words
    unfinished: int = 0                           # PRUNED, FAIL, RUNNING or WAITING trials: never seeded

    def line(self) -> str:
        """What the warm start did, in one line."""
        skipped = sum(map(len, self.skipped.values()))
        why = "; ".join(f"{len(n)} {reason}, e.g. {self.examples[reason]}" for reason, n in self.skipped.items())
        return (f"warm start from study {self.source!r}: {len(self.trials)} of its COMPLETE trials seeded (not trained "
                f"again), {skipped} skipped" + (f" ({why})" if why else "")
                + (f"; {self.unfinished} not COMPLETE, not used" if self.unfinished else ""))


def inside(dist, value) -> bool:
    """Whether `value` is one the distribution can give (inside its range and on its step, or a choice)."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return value in dist.choices  # equality, as Optuna matches a choice
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    if not dist.low <= value <= dist.high:
        return False
    if dist.step is None:
        return True
    steps = (value - dist.low) / dist.step  # on the grid low, low + step, ... (within float error)
    return math.isclose(steps, round(steps), abs_tol=1e-8)


def plan(sweep: Sweep, text: str) -> WarmStart:
    """The trials an earlier study (`STUDY` in the sweep's storage, or `STUDY@STORAGE`) seeds the sweep's
    new study with, read and checked; a UsageError if it cannot seed it at all."""
    name, _, storage = text.partition("@")
    storage = storage or sweep.storage or default_storage()
    if name == sweep.study and storage == sweep.storage:
        raise UsageError(f"sweep: --warm-start {name}: a study cannot start from itself; name the earlier study "
                         f"(and the new one, study = ... in the file)")
    old = load_study(name, storage, what="sweep: --warm-start")
    earlier = study_settings(old)
    if (earlier.objective, earlier.direction) != (sweep.objective, sweep.direction):
        raise UsageError(f"sweep: --warm-start {name}: that study {earlier.direction}s {earlier.objective}, this one "
                         f"{sweep.direction}s {sweep.objective}: its values mean something else here")
    source = name if storage == sweep.storage else f"{name}@{redact(storage)}"
    plan_ = WarmStart(source)
    dists, base = distributions(sweep.space), base_params(sweep)
    for t in old.get_trials(deepcopy=False):
        if t.state != TrialState.COMPLETE:
            plan_.unfinished += 1
            continue
        config = {**earlier.config, **t.params}
        params = {k: config.get(k) for k in sweep.space}
        other = next((k for k in sweep.config if k not in IGNORED and k not in sweep.space
                      and config.get(k) != sweep.config[k]), None)
        outside = next((k for k in sweep.space if not inside(dists[k], params[k])), None)
        measured = t.user_attrs.get("measured")
        if other:
            why = ("trained otherwise", f"trial {t.number}: {other} = {config.get(other)!r}, here {sweep.config[other]!r}")
        elif outside:
            why = ("outside the space", f"trial {t.number}: {outside} = {params[outside]!r} is not in "
                                        f"{describe_space({outside: sweep.space[outside]})}")
        elif (sweep.cost or sweep.max_epoch_seconds) and not measured:
            why = ("without a measured cost", f"trial {t.number} recorded no training time")
        else:
            values = [objective_value(t)] + ([costs.cost_of(sweep.cost, measured)] if sweep.cost else [])
            plan_.trials.append(optuna.trial.create_trial(
                state=TrialState.COMPLETE, params=params, distributions=dists, values=values,
                intermediate_values={} if sweep.cost else t.intermediate_values,
                constraints=costs.constraints(sweep, measured) if sweep.max_epoch_seconds else None,
                user_attrs={**({"measured": measured} if measured else {}),
                            "mlflow_run_id": t.user_attrs.get("mlflow_run_id", ""),
                            "seeded_from": f"{source} trial {t.number}",
                            **({"baseline": True} if params == base else {})}))
            continue
        plan_.skipped.setdefault(why[0], []).append(t.number)
        plan_.examples.setdefault(why[0], why[1])
    return plan_


def enqueued(sweep: Sweep, run_ids: list[str]) -> list[tuple[str, dict]]:
    """(run id, its values of the searched fields) for each `--enqueue RUN_ID`, checked against the space."""
    client, dists, out = mlflow.MlflowClient(), distributions(sweep.space), []
    for run_id in dict.fromkeys(run_ids):
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise UsageError(f"sweep: --enqueue {run_id}: no such run in {redact(where(tracking_uri()))}") from None
        missing = [k for k in sweep.space if k not in run.data.params]
        if missing:
            raise UsageError(f"sweep: --enqueue {run_id}: the run has no param {missing[0]!r} (not a training run?)")
        params = {k: parse_value(k, run.data.params[k]) for k in sweep.space}
        outside = next((k for k in sweep.space if not inside(dists[k], params[k])), None)
        if outside:
            raise UsageError(f"sweep: --enqueue {run_id}: its {outside} = {params[outside]!r} is not in the space "
                             f"({describe_space({outside: sweep.space[outside]})})")
        # A trial trains the sweep's config with these values: say so where the run trained otherwise.
        differ = [f"{k} = {run.data.params[k]}" for k in sweep.config if k not in IGNORED and k not in sweep.space
                  and k in run.data.params and parse_value(k, run.data.params[k]) != sweep.config[k]]
        if differ:
            print(f"alexnet sweep: --enqueue {run_id}: the run also trained with {', '.join(differ[:3])}"
                  f"{' ...' if len(differ) > 3 else ''}; the trial takes only its {', '.join(sweep.space)} and trains "
                  f"the sweep's config otherwise", file=sys.stderr)
        out.append((run_id, params))
    return out


def seed(study, attrs: dict, sweep: Sweep, warm: WarmStart | None) -> dict[str, str]:
    """Under the study lock, as the launcher sets the study up (`attrs`: its user attributes before):
    add the seeded trials to a new study. Returns the parent run's tags saying where it started from."""
    if warm is None or attrs.get("warm_start") == warm.source:
        return {}  # no warm start, or a resume of the same one
    if attrs.get("warm_start") is not None:
        raise UsageError(f"sweep: study {sweep.study!r} was warm-started from {attrs['warm_start']!r}: run it as it "
                         f"started, or name a new study (study = ... in the file)")
    if made_by_sweep(attrs):
        raise UsageError(f"sweep: study {sweep.study!r} already exists: --warm-start seeds a new study "
                         f"(study = ... in the file names one)")
    study.add_trials(warm.trials)
    study.set_user_attr("warm_start", warm.source)
    return {"sweep.warm_start": warm.source, "sweep.warm_start.seeded": str(len(warm.trials)),
            "sweep.warm_start.skipped": json.dumps(warm.skipped)}


def enqueue(study, attrs: dict, runs: list[tuple[str, dict]]) -> dict[str, str]:
    """Queue the `--enqueue` runs' values not queued before (a resume passes them again), unless a seeded
    trial measured them already. Returns the parent run's tag listing every run queued so."""
    done = list(attrs.get("enqueued_runs", []))
    measured = {json.dumps(t.params, sort_keys=True): t.number for t in study.get_trials(deepcopy=False) if seeded(t)}
    for run_id, params in runs:
        if run_id in done:
            continue
        same = measured.get(json.dumps(params, sort_keys=True))
        if same is not None:
            print(f"alexnet sweep: --enqueue {run_id}: not queued, seeded trial {same} measured its values already",
                  file=sys.stderr)
            continue
        study.enqueue_trial(params, user_attrs={"enqueued_from": run_id})
        done.append(run_id)
    if not runs:
        return {}
    study.set_user_attr("enqueued_runs", done)
    return {"sweep.enqueued": ",".join(done)}
