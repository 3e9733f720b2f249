"""What a study is, answered in one place: its runs, its settings and the trials it keeps.

- Its runs. A study S has one parent run (tag `sweep.role=parent`), one run per trial it trained
  (`trial`) and the runs `alexnet confirm` trained (`confirm`), all tagged `sweep.study=S`. Every lookup
  goes through `study_filter`, which quotes S by one rule (MLflow's filter strings take a quote of the
  other kind inside a literal, and no escapes), and every result is checked against S exactly.
- Its settings. The resolved sweep (`spec.Sweep`: frozen, typed, documented) is written by
  `write_settings` at each launch, from that one object, as the study's user attribute `settings` and as
  `settings.json` on its parent run; `study_settings` and `parent_settings` read it back as a `Sweep`, no
  string parsed. The orders a worker gets carry the same serialisation (`settings_dict`). Studies from
  before `settings` existed are read from what they recorded then.
- The trials it keeps. `kept_trials`: the top `keep_top` trials the study trained, by Optuna's value in
  the study's direction, the earlier trial first on a tie, COMPLETE and feasible only (Optuna's state is
  the truth, not the MLflow run's), plus the Pareto front of a cost-aware sweep. `releasable` names the
  trial runs that lose their checkpoints and models; the sweep's own retention and `alexnet gc` both call it.

Torch-free; MLflow and Optuna are imported by the functions that talk to them, so this module is cheap to
import (`alexnet --help` stays instant).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict

from alexnet import UsageError
from alexnet.redact import first_line, redact
from alexnet.sweep.costs import non_dominated
from alexnet.sweep.spec import Sweep

ROLES = ("parent", "trial", "confirm")
SETTINGS = "settings"             # the study's user attribute
SETTINGS_FILE = "settings.json"   # the parent run's artifact
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")
MAX_RUNS = 50000


# --- Which runs belong to a study -------------------------------------------------------------------

def literal(value: str) -> str | None:
    """`value` as a string literal of an MLflow filter: single-quoted, or double-quoted when it holds a
    single quote (MLflow keeps backslashes as they are, so no escape works); None when it holds both."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


def tag_clause(key: str, value: str) -> str:
    """`tags.key = value`; a value no literal can hold is matched with LIKE, each quote a one-character
    wildcard, and the caller keeps the exact matches (`runs_of` does)."""
    quoted = literal(value)
    if quoted is not None:
        return f"tags.`{key}` = {quoted}"
    return f"tags.`{key}` LIKE '{value.replace(chr(39), '_')}'"


def study_filter(study: str, role: str | None = None, status: str | None = None) -> str:
    """The MLflow filter of a study's runs, of one role (`parent`, `trial`, `confirm`) and status."""
    clauses = [tag_clause("sweep.study", study)]
    if role:
        clauses.append(f"tags.`sweep.role` = '{role}'")
    if status:
        clauses.append(f"attributes.status = '{status}'")
    return " and ".join(clauses)


def runs_of(study: str, role: str, experiment_ids: list[str] | None = None, status: str | None = None,
            order_by: list[str] | None = None) -> list:
    """The study's runs of one role (MLflow Run objects), in the experiments given, else in all."""
    import mlflow

    where = {"experiment_ids": experiment_ids} if experiment_ids else {"search_all_experiments": True}
    found = mlflow.search_runs(filter_string=study_filter(study, role, status), output_format="list",
                               max_results=MAX_RUNS, order_by=order_by, **where)
    return [r for r in found if r.data.tags.get("sweep.study") == study]


def _experiment_ids(experiment: str | None) -> list[str] | None:
    if not experiment:
        return None
    from alexnet.tracking import store

    return [store.experiment_id(experiment)]


def trial_runs(study: str, experiment: str | None = None, status: str | None = None) -> list:
    """The runs of the study's trials (experiment: its name; None: every experiment)."""
    return runs_of(study, "trial", _experiment_ids(experiment), status)


def confirm_runs(study: str, experiment: str | None = None) -> list:
    """The runs `alexnet confirm` trained for the study."""
    return runs_of(study, "confirm", _experiment_ids(experiment))


def parents(experiment_id: str | None = None) -> dict:
    """{study name: its parent run}, the newest parent of each name, in one experiment or all."""
    import mlflow

    where = {"experiment_ids": [experiment_id]} if experiment_id else {"search_all_experiments": True}
    found = mlflow.search_runs(filter_string="tags.`sweep.role` = 'parent'", output_format="list",
                               order_by=["attributes.start_time ASC"], max_results=MAX_RUNS, **where)
    return {r.data.tags["sweep.study"]: r for r in found if "sweep.study" in r.data.tags}


def parent_run(study: str, command: str = "runs", experiment_id: str | None = None):
    """The study's parent run, in one experiment or all, or a UsageError naming the sweeps there are."""
    known = parents(experiment_id)
    if study not in known:
        raise UsageError(no_sweep(study, known, command))
    return known[study]


def no_sweep(study: str, known, command: str) -> str:
    from alexnet.home import tracking_uri, where

    return (f"{command}: no sweep {study!r} in {redact(where(tracking_uri()))} "
            f"(sweeps: {', '.join(sorted(known)) or 'none yet'})")


def best_trial_runs(study: str, settings: Sweep, experiment_id: str, top: int) -> list:
    """The study's `top` FINISHED trial runs by their objective metric, best first, the earlier trial
    first on a tie (what the UI compares; a study's store need not be at hand to show them)."""
    objective, sign = settings.objective, -1 if settings.direction == "maximize" else 1
    found = [r for r in runs_of(study, "trial", [experiment_id], "FINISHED") if objective in r.data.metrics]
    return sorted(found, key=lambda r: (sign * r.data.metrics[objective], _trial_number(r)))[:top]


def _trial_number(run) -> int:
    try:
        return int(run.data.tags.get("sweep.trial", -1))
    except ValueError:
        return -1


# --- Its settings -----------------------------------------------------------------------------------

def settings_dict(sweep: Sweep) -> dict:
    """The resolved sweep as JSON-ready values: what a worker is handed, and (its storage redacted) what
    the study and its parent run record."""
    return asdict(sweep)


def settings_from(data: dict) -> Sweep:
    """A `Sweep` from `settings_dict`'s values (keys it does not know, from a later version, are left out)."""
    fields = {f.name: f for f in dataclasses.fields(Sweep)}
    values = {k: v for k, v in data.items() if k in fields}
    for k, v in values.items():
        if fields[k].type == "float" and type(v) is int:  # JSON writes 2.0 as 2 in some writers
            values[k] = float(v)
    return Sweep(**values)


def write_settings(study, parent_run_id: str, sweep: Sweep) -> None:
    """Record the study's settings, from the one object: its user attribute and its parent run's file."""
    import mlflow

    data = {**settings_dict(sweep), "storage": redact(sweep.storage)}
    study.set_user_attr(SETTINGS, data)
    mlflow.MlflowClient().log_dict(parent_run_id, data, SETTINGS_FILE)


def made_by_sweep(attrs: dict) -> bool:
    """Whether a study's user attributes are those `alexnet sweep` gives a study it sets up."""
    return SETTINGS in attrs or "base_config" in attrs  # the latter: a study from before `settings`


def study_settings(study) -> Sweep:
    """The settings of an Optuna study made by `alexnet sweep`."""
    attrs = study.user_attrs
    if SETTINGS in attrs:
        return settings_from(attrs[SETTINGS])
    # A study from before `settings`: the attributes it was given one by one.
    return Sweep(study=study.study_name, objective=attrs["objective"], direction=attrs["direction"],
                 cost=attrs.get("cost", ""), max_epoch_seconds=attrs.get("max_epoch_seconds", 0.0),
                 space=attrs["space"], config=attrs["base_config"], source=attrs.get("sweep_file", ""))


def parent_settings(parent) -> Sweep:
    """The settings of the study whose parent run (an MLflow Run) this is."""
    import mlflow

    try:
        return settings_from(mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/{SETTINGS_FILE}"))
    except Exception:
        return _legacy_parent_settings(parent)


def _legacy_parent_settings(parent) -> Sweep:
    """A parent run from before `settings.json`: its params, as that version wrote them (`objective` was
    "DIRECTION METRIC")."""
    params, tags = parent.data.params, parent.data.tags
    direction, _, objective = params.get("objective", "maximize test/best_acc").partition(" ")
    return Sweep(study=tags.get("sweep.study", ""), objective=objective, direction=direction,
                 cost=params.get("cost", ""), keep_top=int(params.get("keep_top", 3)),
                 space={k.removeprefix("space."): {} for k in params if k.startswith("space.")},
                 storage=tags.get("sweep.storage", ""))


def open_study(settings: Sweep):
    """The Optuna study these settings name, read-only use; None (and why) if its storage does not
    answer or holds no such study. A recorded storage has its password masked: the database's own
    means (PGPASSWORD, ~/.pgpass) supply it."""
    import optuna

    from alexnet.home import sqlite_path

    storage = settings.storage.replace(":***@", "@")
    if not storage:
        return None, "its Optuna storage is not recorded"
    path = sqlite_path(storage)
    if path is not None and not path.is_file():
        return None, f"its Optuna storage {redact(storage)} is gone"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if settings.study not in optuna.study.get_all_study_names(storage):
            return None, f"no study {settings.study!r} in {redact(storage)}"
        return optuna.load_study(study_name=settings.study, storage=storage), ""
    except Exception as e:
        return None, f"cannot open its Optuna storage {redact(storage)} ({first_line(e)})"


# --- The trials it keeps ----------------------------------------------------------------------------

def seeded(t) -> bool:
    """A trial seeded from an earlier study (`alexnet sweep --warm-start`): a finished trial that this
    study never trained and has no MLflow run of its own."""
    return "seeded_from" in t.user_attrs


def objective_value(t) -> float | None:
    """The trial's objective (the first of a cost-aware study's two values)."""
    return t.values[0] if t.values else None


def feasible(t) -> bool:
    """A trial within the sweep's constraint (`max_epoch_seconds`), as Optuna counts it: every constraint
    value <= 0. A trial without one is feasible."""
    return all(v <= 0 for v in t.constraints.values())


def complete(trials: list) -> list:
    """The COMPLETE, feasible trials with finite values: those a ranking or a front may hold."""
    return [t for t in trials if t.state.name == "COMPLETE" and t.values and all(map(math.isfinite, t.values))
            and feasible(t)]


def rank(trials: list, direction: str) -> list:
    """COMPLETE, feasible trials, best first by the objective in `direction` (a cost-aware study's first
    value); on a tie the earlier trial first. Infeasible trials are never ranked."""
    sign = -1 if direction == "maximize" else 1
    return sorted(complete(trials), key=lambda t: (sign * objective_value(t), t.number))


def pareto_front(trials: list, directions: list[str]) -> list:
    """The non-dominated COMPLETE, feasible trials, cheapest first: no other such trial is at least as
    good in every value and better in one (Optuna's `best_trials`, over a given snapshot)."""
    signs = [1 if d == "minimize" else -1 for d in directions]
    done = complete(trials)
    front = [done[i] for i in non_dominated([[s * v for s, v in zip(signs, t.values)] for t in done])]
    return sorted(front, key=lambda t: (t.values[-1], t.number))


def kept_trials(trials: list, settings) -> set[int]:
    """The numbers of the trials whose checkpoints and models stay: the top `keep_top` of those this study
    trained (seeded trials have no files here) and, in a cost-aware sweep, its Pareto front. `trials` is
    one snapshot of the study (Optuna's FrozenTrials)."""
    trained = [t for t in trials if not seeded(t)]
    keep = {t.number for t in rank(trained, settings.direction)[:settings.keep_top]}
    if settings.cost:
        keep |= {t.number for t in pareto_front(trained, [settings.direction, "minimize"])}
    return keep


def releasable(runs: list, trials: list, settings) -> list:
    """The trial runs (of `runs`) that lose their checkpoints and models: their trial is finished in Optuna
    (never a running or queued one) and not kept, their run has ended, and they still hold them. A run
    whose trial Optuna does not know is left alone."""
    keep = kept_trials(trials, settings)
    states = {t.number: t.state.name for t in trials if not seeded(t)}
    return [r for r in runs if _trial_number(r) not in keep and states.get(_trial_number(r)) in FINISHED_STATES
            and r.info.status != "RUNNING" and r.data.tags.get("checkpoints") != "deleted"]
