"""What a sweep says when it is done, to the user and on its parent run: one line per finished trial,
the summary (counts, the best trial and the baseline, the Pareto front of a cost-aware sweep, disk), and
on the parent run the counts, the best params, `trials.csv`, `pareto.csv` and Optuna's own plots (PNGs and
one interactive HTML page, `alexnet/sweep/figures.py`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
from mlflow.entities import RunTag

from alexnet.tracking import disk
from alexnet.redact import redact
from alexnet.sweep import figures
from alexnet.sweep.costs import CONSTRAINT, describe
from alexnet.sweep.pareto import FILE as PARETO_FILE, front_table
from alexnet.sweep.retention import disk_usage
from alexnet.sweep.spec import COSTS, Sweep, describe_space, format_params
from alexnet.tracking.views import NOTE
from alexnet.sweep.study import failed_on_server, ranked, retried, tally
from alexnet.sweep.ledger import FINISHED_STATES, feasible, objective_value, pareto_front, seeded

SERVER_ERRORS = {"the tracking server": "a tracking-server error", "the database": "a database error"}


def server_failure(t) -> str | None:
    """'failed on a tracking-server error' (or a database error) for a trial a server failed, else None."""
    server = failed_on_server(t)
    return f"failed on {SERVER_ERRORS.get(server, server)}" if server else None


def values_text(t, objective: str, cost: str = "") -> str:
    """`val/best_acc 0.3220`, and in a cost-aware sweep `, flops 3.39e+08`."""
    text = f"{objective} {objective_value(t):.4f}"
    return text + (f", {describe(cost, t.values[1])}" if cost and len(t.values) > 1 else "")


def trial_line(t, objective: str, retried_as: dict, epochs: int, cost: str = "") -> str:
    """One line per finished trial: number, state, value(s), params, duration, and why it ended early."""
    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else 0
    state = t.state.name
    value = values_text(t, objective, cost) if state == "COMPLETE" else ""
    if state == "COMPLETE" and not feasible(t):
        over = t.constraints.get(CONSTRAINT)
        value += f" (infeasible: {over:.2g} s per epoch over max_epoch_seconds)" if over is not None else " (infeasible)"
    if state == "PRUNED":
        value = f"pruned at epoch {max(t.intermediate_values, default='?')} of {epochs}"
    elif state == "FAIL":
        if t.number in retried_as:
            why = server_failure(t) or ("interrupted" if t.user_attrs.get("fail_reason") == "interrupted"
                                        else "its worker died")
            value = f"{why}: retried as trial {retried_as[t.number]}"
        else:
            value = t.user_attrs.get("fail_reason") or t.system_attrs.get("fail_reason", "failed")
            value = value.splitlines()[0][:160] if value else "failed"
    return f"trial {t.number:>3} {state:<8} {value}  {format_params(t.params)}  ({seconds:.0f} s)"


def summarize(study, sweep: Sweep, parent: str) -> dict:
    """The parent run gets the counts, the best params and value, trials.csv, a cost-aware sweep's Pareto
    front (pareto.csv) and the plots (PNGs and plots/sweep.html)."""
    client = mlflow.MlflowClient()
    trials = study.get_trials(deepcopy=False)
    done, running, waiting = tally(study, trials)
    counts = {s: sum(t.state.name == s for t in done) for s in FINISHED_STATES}
    best = ranked(study, sweep.direction, trials)
    front = pareto_front(trials, [sweep.direction, "minimize"]) if sweep.cost else []
    client.log_metric(parent, "sweep/finished_trials", len(done), step=len(done))
    for s, n in counts.items():
        client.log_metric(parent, f"sweep/{s.lower()}", n, step=len(done))
    epochs = sweep.config["epochs"]
    saved = sum(epochs - max(t.intermediate_values, default=epochs) for t in done if t.state.name == "PRUNED")
    client.log_metric(parent, "sweep/epochs_saved_by_pruning", saved, step=len(done))
    if sweep.max_epoch_seconds:
        client.log_metric(parent, "sweep/infeasible", sum(not feasible(t) for t in done), step=len(done))
    if best:
        b = best[0]
        client.log_metric(parent, "sweep/best_value", objective_value(b), step=len(done))
        # In one batch: launchers that end together write these tags at the same moment, and MLflow's SQL
        # store retries a batch whose insert collides, where a single set_tag fails (duplicate key).
        client.log_batch(parent, tags=[RunTag("best.trial", str(b.number)),
                                       RunTag("best.run_id", b.user_attrs.get("mlflow_run_id", "")),
                                       RunTag("best.value", f"{objective_value(b):.6g}"),
                                       *(RunTag(f"best.{k}", str(v)) for k, v in b.params.items())])
        client.log_dict(parent, {"trial": b.number, "value": objective_value(b), "objective": sweep.objective,
                                 "params": b.params, "mlflow_run_id": b.user_attrs.get("mlflow_run_id")},
                        "best_params.json")
    if sweep.cost:
        client.log_metric(parent, "sweep/pareto_size", len(front), step=len(done))
    with tempfile.TemporaryDirectory(prefix="alexnet-sweep-") as tmp:
        csv = Path(tmp) / "trials.csv"
        # Trials' user attributes hold error messages, which may quote a URL with its password.
        table = study.trials_dataframe().map(lambda v: redact(v) if isinstance(v, str) else v)
        table.to_csv(csv, index=False)
        client.log_artifact(parent, str(csv))
        if sweep.cost:
            front_table(trials, sweep.objective, sweep.direction, sweep.cost).to_csv(Path(tmp) / PARETO_FILE, index=False)
            client.log_artifact(parent, str(Path(tmp) / PARETO_FILE))
        folder = Path(tmp) / "plots"
        plots = figures.save_pngs(study, folder, sweep.objective, sweep.cost)
        if figures.save_html(study, folder / figures.HTML, sweep.objective, sweep.cost):
            plots.append(figures.HTML)
        if plots:
            client.log_artifacts(parent, str(folder), "plots")
    used = disk_usage(sweep)
    client.log_metric(parent, "sweep/disk_bytes", used, step=len(done))
    client.log_batch(parent, tags=[RunTag(NOTE, parent_note(sweep, len(done), counts, best, saved, front))])
    disk.measure(parent)
    retried_as = {t.system_attrs["retry_history"][-1]: t.number for t in trials if "retry_history" in t.system_attrs}
    server_failed = [(t.number, server_failure(t), retried_as.get(t.number)) for t in trials if failed_on_server(t)]
    return {"done": done, "running": running, "waiting": waiting, "counts": counts, "best": best,
            "server_failed": server_failed, "plots": plots, "disk": used, "epochs_saved": saved, "front": front,
            "seeded": sum(map(seeded, trials)), "retried": len(retried(trials)), "warm_start": study.user_attrs.get("warm_start"),
            "infeasible": sum(not feasible(t) for t in done)}


def parent_note(sweep: Sweep, finished: int, counts: dict, best: list, saved: int, front: list = ()) -> str:
    """The parent run's description in MLflow's UI: the study, then where it stands."""
    goal = f"{sweep.direction} {sweep.objective}" + (f" and minimize {COSTS[sweep.cost]}" if sweep.cost else "")
    bound = f", epochs of at most {sweep.max_epoch_seconds:g} s on average" if sweep.max_epoch_seconds else ""
    lines = [f"Sweep '{sweep.study}' (Optuna): {goal}{bound} over {describe_space(sweep.space)}; "
             f"{sweep.sampler} sampler, {sweep.pruner} pruner. Its trials are this run's child runs."]
    lines.append(f"{finished} of {sweep.n_trials or 'unlimited'} trials finished "
                 f"({', '.join(f'{n} {k}' for k, n in counts.items())}); pruning saved {saved} epochs.")
    if best:
        lines.append(f"Best: trial {best[0].number}, {values_text(best[0], sweep.objective, sweep.cost)}: "
                     f"{format_params(best[0].params)}.")
    if front:
        lines.append("Pareto front (cheapest first; pareto.csv, plots/pareto_front.png, plots/sweep.html): " + "; ".join(
            f"trial {t.number} ({values_text(t, sweep.objective, sweep.cost)})" for t in front) + ".")
    return "\n\n".join(lines)


def summary_text(sweep: Sweep, s: dict) -> str:
    """The closing lines: counts, the best trial, disk, and what to type next."""
    counts = ", ".join(f"{n} {k}" for k, n in s["counts"].items())
    again = s.get("retried", 0)  # not counted: their retries are
    lines = [f"sweep {sweep.study!r}: {len(s['done'])} trials finished ({counts})"
             + (f"; {again} retried: {'its' if again == 1 else 'their'} worker stopped, the retr"
                f"{'y is' if again == 1 else 'ies are'} counted" if again else "")
             + (f", {len(s['running'])} still running" if s["running"] else "")
             + (f", {len(s['waiting'])} queued" if s["waiting"] else "")]
    for number, why, retry in s.get("server_failed", []):  # not the params' fault: retried with the same ones
        lines.append(f"trial {number} {why} and was retried as trial {retry}" if retry is not None else
                     f"trial {number} {why} and was not retried again: its retries (max_retry = {sweep.max_retry}) "
                     f"are spent")
    if s.get("seeded"):
        lines.append(f"warm start: {s['seeded']} more trials seeded from study {s.get('warm_start')!r} (not trained here)")
    if s["best"]:
        b = s["best"][0]
        baseline = next((t for t in s["best"] if t.user_attrs.get("baseline")), None)
        lines.append(f"best: trial {b.number}, {values_text(b, sweep.objective, sweep.cost)}: {format_params(b.params)}"
                     + (f" (seeded from {b.user_attrs['seeded_from']})" if seeded(b) else "")
                     + (f" (baseline, trial {baseline.number}: {objective_value(baseline):.4f})"
                        if baseline and baseline is not b else ""))
    if sweep.max_epoch_seconds and s["done"]:
        lines.append(f"constraint: {s['infeasible']} of {len(s['done'])} trials took more than "
                     f"{sweep.max_epoch_seconds:g} s per epoch (infeasible: never ranked or kept)")
    if sweep.cost:
        lines.append(f"Pareto front ({sweep.objective} against {COSTS[sweep.cost]}, cheapest first): "
                     + ("; ".join(f"trial {t.number} {values_text(t, sweep.objective, sweep.cost)}" for t in s["front"])
                        or "none yet"))
    if sweep.pruner != "none" and s["done"]:
        budget = len(s["done"]) * sweep.config["epochs"]
        lines.append(f"pruning: {s['counts']['PRUNED']} of {len(s['done'])} trials stopped early, saving "
                     f"{s['epochs_saved']} of {budget} epochs ({s['epochs_saved'] / budget:.0%})")
    lines.append(f"disk: {s['disk'] / 1e6:,.1f} MB in the trials' artifacts (checkpoints and models of the top "
                 f"{sweep.keep_top}{' and of the Pareto front' if sweep.cost else ''} kept)")
    lines.append(f"MLflow parent run {s['parent']}; leaderboard: alexnet runs --sweep {sweep.study}"
                 + (" (--pareto: the front)" if sweep.cost else "")
                 + f"; confirm: alexnet confirm {sweep.study} --top 3 --seeds 3")
    return "\n".join(lines)
