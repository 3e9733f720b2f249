"""One trial, as optuna-examples writes an objective: suggest the params, train with the very same
`tracked_train` a single run uses (the trial is a child MLflow run of the study's parent), report every
epoch to the pruner, return the objective's last value; in a cost-aware sweep, that value and the
trial's cost (Optuna cannot prune a multi-objective study: nothing is reported). Every trial that trained
records what it cost (`costs.measure`) and, with `max_epoch_seconds`, its constraint."""

from __future__ import annotations

import mlflow
import optuna

from alexnet.training.config import FIELDS, Config
from alexnet.redact import redact
from alexnet.sweep import costs
from alexnet.sweep.spec import Sweep, format_params
from alexnet.tracking.lifecycle import StopRun, tracked_train
from alexnet.training.train import Diverged, train
from alexnet.tracking.views import NOTE


def suggest(trial, space: dict) -> dict:
    params = {}
    for name, s in space.items():
        if "choices" in s:
            params[name] = trial.suggest_categorical(name, s["choices"])
        elif FIELDS[name].type == "int":
            params[name] = trial.suggest_int(name, s["low"], s["high"], step=s["step"] or 1, log=s["log"])
        else:
            params[name] = trial.suggest_float(name, s["low"], s["high"], step=s["step"], log=s["log"])
    return params


def settle(trial, sweep: Sweep, cfg: Config, records: list, run_id: str) -> dict:
    """What the trial cost, in its user attributes; with `max_epoch_seconds`, its constraint, and an
    infeasible trial's run tagged `sweep.feasible=false` (`alexnet gc` reads it)."""
    measured = costs.measure(records, cfg.resize)
    trial.set_user_attr("measured", measured)
    for key, value in costs.constraints(sweep, measured).items():
        trial.set_constraint(key, value)
        if value > 0:
            mlflow.MlflowClient().set_tag(run_id, "sweep.feasible", "false")
    return measured


def objective(trial: optuna.Trial, sweep: Sweep, parent: str, slot: int, release,
              retry_of: int | None = None, trainer=train) -> float | tuple[float, float]:
    params = suggest(trial, sweep.space)  # under the study lock: other workers' constant liar sees these
    release()  # the trial is RUNNING, with its params and a heartbeat: others may count it now
    cfg = Config(**{**sweep.config, **params, "run_name": f"{sweep.study}-trial-{trial.number}"})
    seen, started = [], {}

    def report(record, run_id):
        seen.append(record)
        value = record.metrics()[sweep.objective]
        if sweep.cost:
            return  # a multi-objective study takes no reports and cannot prune
        trial.report(value, record.epoch)
        # A trial that has trained its last epoch completes: pruning it then would save nothing.
        if record.epoch < cfg.epochs and trial.should_prune():
            raise StopRun("KILLED", {"sweep.state": "PRUNED", "sweep.pruned_epoch": str(record.epoch),
                                     "killed_reason": "pruned"},
                          note=f"**Pruned** by the sweep's {sweep.pruner} pruner at epoch {record.epoch} of {cfg.epochs} "
                               f"({sweep.objective} {value:.4f}): not a failure; the sweep saved its other "
                               f"{cfg.epochs - record.epoch} epochs for more promising trials.")

    try:
        run = tracked_train(cfg, source=sweep.source, parent_run_id=parent,
                            tags=trial_tags(trial, sweep, slot, retry_of),
                            on_start=lambda run_id: started.update(run_id=run_id) or trial.set_user_attr("mlflow_run_id", run_id),
                            on_epoch=report, progress=False, objective=sweep.objective, trainer=trainer)
    except StopRun as e:
        settle(trial, sweep, cfg, seen, started["run_id"])
        raise optuna.TrialPruned(f"pruned at epoch {e.tags['sweep.pruned_epoch']}") from None
    except Exception as e:
        trial.set_user_attr("fail_reason", redact(f"{'diverged' if isinstance(e, Diverged) else type(e).__name__}: {e}")[:2000])
        raise
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the worker queues the trial again
        trial.set_user_attr("fail_reason", "interrupted")
        raise
    value = run.records[-1].metrics()[sweep.objective]
    measured = settle(trial, sweep, cfg, run.records, run.run_id)
    if not sweep.cost:
        return value
    cost = costs.cost_of(sweep.cost, measured)
    mlflow.MlflowClient().log_metric(run.run_id, f"cost/{sweep.cost}", cost)  # beside the objective in the UI
    return value, cost


def trial_tags(trial, sweep: Sweep, slot: int, retry_of: int | None = None) -> dict[str, str]:
    """What ties the trial's run to the study: study, trial number, worker, and the trial it retries."""
    tags = {"sweep.study": sweep.study, "sweep.trial": str(trial.number), "sweep.role": "trial",
            "sweep.worker": str(slot)}
    if retry_of is not None:  # a queued copy of a trial whose worker died, was interrupted or met a server's error
        tags["sweep.retry_of"] = str(retry_of)
    if trial.user_attrs.get("baseline"):
        tags["sweep.baseline"] = "true"
    which = "the baseline (the base experiment's own values)" if trial.user_attrs.get("baseline") else "a trial"
    tags[NOTE] = (f"Trial {trial.number} of sweep '{sweep.study}', {which}: {format_params(trial.params)}; "
                  f"{sweep.direction} {sweep.objective}.")
    return tags
