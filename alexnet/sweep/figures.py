"""Optuna's own plots of a study, for its parent run: PNGs (matplotlib, headless) and the same plots as
one self-contained interactive HTML page (plotly), which the MLflow UI shows in its artifact view.

The plots: optimisation history, parameter importances, parallel coordinates, intermediate values (a
pruned study's epochs) and, in a cost-aware sweep, the Pareto front of the objective against the cost.
A cost-aware study has two values: the history and the parallel coordinates plot the objective; the
importances are drawn for both. The HTML page holds plotly.js once (about 4.7 MB), inside the file: the
UI shows it without a network.
"""

from __future__ import annotations

import html
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import optuna
import optuna.importance  # noqa: F401 (fANOVA: 0.9 s to import, paid while the trials run)
import optuna.visualization as interactive
import optuna.visualization.matplotlib as static

from alexnet.sweep.spec import COSTS
from alexnet.sweep.study import retried, tally
from alexnet.sweep.ledger import seeded

HTML = "sweep.html"  # the interactive page, beside the PNGs in the parent run's plots/


def plot_calls(study, objective: str, cost: str) -> list:
    """(file stem, title, function of a visualization module -> figure) for each plot the study has."""
    first = {"target": (lambda t: t.values[0]), "target_name": objective} if cost else {"target_name": objective}
    calls = [("optimization_history", "Optimisation history", lambda v: v.plot_optimization_history(study, **first)),
             ("param_importances", "Parameter importances", lambda v: v.plot_param_importances(study)),
             ("parallel_coordinate", "Parallel coordinates",
              lambda v: v.plot_parallel_coordinate(study, **first))]
    if cost:
        names = [objective, COSTS[cost]]
        calls.append(("pareto_front", f"Pareto front: {objective} against {COSTS[cost]}",
                      lambda v: v.plot_pareto_front(study, target_names=names)))
    else:
        calls.append(("intermediate_values", "Intermediate values (per epoch)",
                      lambda v: v.plot_intermediate_values(study)))
    return calls


def trial_count(study) -> str:
    """"9 trials (1 retried)": the trials as the sweep's summary counts them (a trial whose worker died is
    not counted, its retry is), with the retried and the seeded ones named apart."""
    trials = study.get_trials(deepcopy=False)
    done, running, waiting = tally(study, trials)
    extra = [f"{n} {what}" for n, what in ((len(running), "running"), (len(waiting), "queued"),
                                           (len(retried(trials)), "retried"),
                                           (sum(map(seeded, trials)), "seeded from another study")) if n]
    return f"{len(done)} trial{'s' if len(done) != 1 else ''}" + (f" ({', '.join(extra)})" if extra else "")


def quietly(make):
    """A plot, or None where the study cannot have it yet (importances need two COMPLETE trials with
    different params; a front needs a COMPLETE feasible trial)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials" is said by the summary
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make()
    except Exception:
        return None


def save_pngs(study, folder: Path, objective: str, cost: str = "") -> list[str]:
    """Optuna's matplotlib plots, headless, as `<name>.png` in `folder`; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for name, _, call in plot_calls(study, objective, cost):
        try:
            ax = quietly(lambda: call(static))
            if ax is None:
                continue
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5.5)
            fig.tight_layout()
            fig.savefig(folder / f"{name}.png", dpi=100)
            saved.append(f"{name}.png")
        finally:
            plt.close("all")
    return saved


def save_html(study, path: Path, objective: str, cost: str = "") -> list[str]:
    """The same plots, interactive (zoom, hover for a trial's params), in one HTML file with plotly.js
    inside it once; returns the titles of the plots it holds (none: no file)."""
    parts, titles = [], []
    for _, title, call in plot_calls(study, objective, cost):
        fig = quietly(lambda: call(interactive))
        if fig is None:
            continue
        fig.update_layout(height=480, margin={"t": 40})
        parts.append(f"<h2>{title}</h2>\n" + fig.to_html(full_html=False, include_plotlyjs=not parts,
                                                         config={"displaylogo": False}))
        titles.append(title)
    if parts:
        name = html.escape(study.study_name)
        head = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Sweep {name}</title>"
                f"<style>body {{ font-family: sans-serif; margin: 1em 2em; }} h2 {{ font-size: 1.1em; }}</style>"
                f"</head><body>\n<h1>Sweep '{name}': {html.escape(trial_count(study))}</h1>\n")
        path.write_text(head + "\n".join(parts) + "\n</body></html>\n")
    return titles
