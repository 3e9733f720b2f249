"""What a sweep says when it is done, to the user and on its parent run: one line per finished trial,
the summary (counts, the best trial and the baseline, disk), and on the parent run the counts, the best
params, `trials.csv` and Optuna's own plots."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import optuna
import optuna.importance  # noqa: F401 (fANOVA: 0.9 s to import, paid while the trials run)
import optuna.visualization.matplotlib as vis

from alexnet import disk
from alexnet.redact import redact
from alexnet.sweep.retention import disk_usage
from alexnet.sweep.spec import Sweep, describe_space, format_params
from alexnet.views import NOTE
from alexnet.sweep.study import FINISHED_STATES, ranked, tally


def trial_line(t, objective: str, retried_as: dict, epochs: int) -> str:
    """One line per finished trial: number, state, value, params, duration, and why it ended early."""
    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else 0
    state = t.state.name
    value = f"{objective} {t.value:.4f}" if state == "COMPLETE" else ""
    if state == "PRUNED":
        value = f"pruned at epoch {max(t.intermediate_values, default='?')} of {epochs}"
    elif state == "FAIL":
        if t.number in retried_as:
            why = "interrupted" if t.user_attrs.get("fail_reason") == "interrupted" else "its worker died"
            value = f"{why}: retried as trial {retried_as[t.number]}"
        else:
            value = t.user_attrs.get("fail_reason") or t.system_attrs.get("fail_reason", "failed")
            value = value.splitlines()[0][:160] if value else "failed"
    return f"trial {t.number:>3} {state:<8} {value}  {format_params(t.params)}  ({seconds:.0f} s)"


def summarize(study, sweep: Sweep, parent: str) -> dict:
    """The parent run gets the counts, the best params and value, trials.csv and the plots."""
    client = mlflow.MlflowClient()
    done, running, waiting = tally(study)
    counts = {s: sum(t.state.name == s for t in done) for s in FINISHED_STATES}
    best = ranked(study, sweep.direction)
    client.log_metric(parent, "sweep/finished_trials", len(done), step=len(done))
    for s, n in counts.items():
        client.log_metric(parent, f"sweep/{s.lower()}", n, step=len(done))
    epochs = sweep.config["epochs"]
    saved = sum(epochs - max(t.intermediate_values, default=epochs) for t in done if t.state.name == "PRUNED")
    client.log_metric(parent, "sweep/epochs_saved_by_pruning", saved, step=len(done))
    if best:
        b = best[0]
        client.log_metric(parent, "sweep/best_value", b.value, step=len(done))
        client.set_tag(parent, "best.trial", str(b.number))
        client.set_tag(parent, "best.run_id", b.user_attrs.get("mlflow_run_id", ""))
        client.set_tag(parent, "best.value", f"{b.value:.6g}")
        for k, v in b.params.items():
            client.set_tag(parent, f"best.{k}", str(v))
        client.log_dict(parent, {"trial": b.number, "value": b.value, "objective": sweep.objective,
                                 "params": b.params, "mlflow_run_id": b.user_attrs.get("mlflow_run_id")},
                        "best_params.json")
    with tempfile.TemporaryDirectory(prefix="alexnet-sweep-") as tmp:
        csv = Path(tmp) / "trials.csv"
        # Trials' user attributes hold error messages, which may quote a URL with its password.
        table = study.trials_dataframe().map(lambda v: redact(v) if isinstance(v, str) else v)
        table.to_csv(csv, index=False)
        client.log_artifact(parent, str(csv))
        plots = save_plots(study, Path(tmp) / "plots")
        if plots:
            client.log_artifacts(parent, str(Path(tmp) / "plots"), "plots")
    used = disk_usage(sweep)
    client.log_metric(parent, "sweep/disk_bytes", used, step=len(done))
    client.set_tag(parent, NOTE, parent_note(sweep, len(done), counts, best, saved))
    disk.measure(parent)
    return {"done": done, "running": running, "waiting": waiting, "counts": counts, "best": best,
            "plots": plots, "disk": used, "epochs_saved": saved}


def parent_note(sweep: Sweep, finished: int, counts: dict, best: list, saved: int) -> str:
    """The parent run's description in MLflow's UI: the study, then where it stands."""
    lines = [f"Sweep '{sweep.study}' (Optuna): {sweep.direction} {sweep.objective} over {describe_space(sweep.space)}; "
             f"{sweep.sampler} sampler, {sweep.pruner} pruner. Its trials are this run's child runs."]
    lines.append(f"{finished} of {sweep.n_trials or 'unlimited'} trials finished "
                 f"({', '.join(f'{n} {k}' for k, n in counts.items())}); pruning saved {saved} epochs.")
    if best:
        lines.append(f"Best: trial {best[0].number}, {sweep.objective} {best[0].value:.4f}: {format_params(best[0].params)}.")
    return "\n\n".join(lines)


def save_plots(study, folder: Path) -> list[str]:
    """Optuna's own matplotlib plots, headless. A plot that needs more trials than there are is skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials" is said by the summary
    for name, plot in [("optimization_history", vis.plot_optimization_history),
                       ("param_importances", vis.plot_param_importances),
                       ("parallel_coordinate", vis.plot_parallel_coordinate),
                       ("intermediate_values", vis.plot_intermediate_values)]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5.5)
            fig.tight_layout()
            fig.savefig(folder / f"{name}.png", dpi=100)
            saved.append(f"{name}.png")
        except Exception:
            pass  # e.g. importances need two COMPLETE trials with different params
        finally:
            plt.close("all")
    return saved


def summary_text(sweep: Sweep, s: dict) -> str:
    """The closing lines: counts, the best trial, disk, and what to type next."""
    counts = ", ".join(f"{n} {k}" for k, n in s["counts"].items())
    lines = [f"sweep {sweep.study!r}: {len(s['done'])} trials finished ({counts})"
             + (f", {len(s['running'])} still running" if s["running"] else "")
             + (f", {len(s['waiting'])} queued" if s["waiting"] else "")]
    if s["best"]:
        b = s["best"][0]
        baseline = next((t for t in s["best"] if t.user_attrs.get("baseline")), None)
        lines.append(f"best: trial {b.number}, {sweep.objective} {b.value:.4f}: {format_params(b.params)}"
                     + (f" (baseline, trial {baseline.number}: {baseline.value:.4f})" if baseline and baseline is not b else ""))
    if sweep.pruner != "none" and s["done"]:
        budget = len(s["done"]) * sweep.config["epochs"]
        lines.append(f"pruning: {s['counts']['PRUNED']} of {len(s['done'])} trials stopped early, saving "
                     f"{s['epochs_saved']} of {budget} epochs ({s['epochs_saved'] / budget:.0%})")
    lines.append(f"disk: {s['disk'] / 1e6:,.1f} MB in the trials' artifacts (checkpoints and models of the top "
                 f"{sweep.keep_top} kept)")
    lines.append(f"MLflow parent run {s['parent']}; leaderboard: alexnet runs --sweep {sweep.study}; "
                 f"confirm: alexnet confirm {sweep.study} --top 3 --seeds 3")
    return "\n".join(lines)
