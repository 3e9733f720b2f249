"""What MLflow's UI (3.17) shows first, set from here: the experiment's tags, and the URLs `alexnet ui`
prints. Torch-free.

What the UI takes, read from its sources (`mlflow/server/js/src`) and checked in headless Chromium
(tests/test_ui_browser.py):
- `?workflowType=machine_learning` in a page's URL: the model-training view (runs, models) instead of the
  GenAI one (traces, evaluations, an "Evaluations" breadcrumb). The UI keeps that switch per browser,
  not per experiment: the `mlflow.experimentKind` tag set here is what older and newer UIs read.
- `?viewStateShareKey=KEY`: the runs page loads the view stored in the experiment tag
  `mlflow.sharedViewState.KEY` (JSON: the sort, the visible columns, a search filter). Sorted by a metric,
  the table lists child runs (a sweep's trials) as rows of their own, not folded under their parent.
- The compare page (`#/compare-runs?runs=[...]&experiments=[...]`) takes only the runs: its parallel
  coordinates plot the runs' first logged metric (tracking logs the objective first), its scatter plot
  the alphabetically first param and metric.
"""

from __future__ import annotations

import json
from urllib.parse import quote

KIND = {"mlflow.experimentKind": "custom_model_development"}  # "Machine learning", not GenAI
WORKFLOW = "workflowType=machine_learning"
VIEW_PREFIX = "mlflow.sharedViewState."
EXPERIMENT_VIEW = "alexnet"  # the key of the experiment's own runs view
NOTE = "mlflow.note.content"

# The leaderboard's columns, as MLflow's runs table names them.
METRIC_COLUMNS = ["val/best_acc", "test/acc_at_best_val", "test/best_acc", "test/acc", "train/loss",
                  "perf/examples_per_sec"]  # the val/ ones stay empty for runs without a validation split
PARAM_COLUMNS = ["lr", "dropout", "resize", "batch_size", "epochs", "train_limit"]


def column(kind: str, name: str) -> str:
    """A runs-table column key: `metrics.`test/best_acc``, `params.`lr``, `attributes.`Duration``."""
    return f"{kind}.`{name}`"


def view_state(params: list[str], objective: str = "test/best_acc", direction: str = "maximize",
               search_filter: str = "") -> dict:
    """A runs-page view: best first by the objective, the params then the accuracy metrics as columns,
    the duration and the datasets each run saw (its Fashion-MNIST splits)."""
    metrics = [objective] + [m for m in METRIC_COLUMNS if m != objective]
    return {"orderByKey": column("metrics", objective), "orderByAsc": direction == "minimize",
            "searchFilter": search_filter,
            "selectedColumns": [column("params", p) for p in params] + [column("metrics", m) for m in metrics]
            + [column("attributes", "Duration"), column("attributes", "Dataset")]}


def experiment_tags() -> dict[str, str]:
    """Tags a new experiment gets: its kind, a description, and its runs view."""
    return {**KIND, NOTE: "AlexNet on Fashion-MNIST (d2l 7.1): runs of `alexnet train`, sweeps (a parent run each, "
                          "its trials as children) and confirm runs. `alexnet ui` prints links to this page sorted "
                          "best first, with the params and accuracies as columns.",
            VIEW_PREFIX + EXPERIMENT_VIEW: json.dumps(view_state(PARAM_COLUMNS))}


def sweep_view_key(study: str) -> str:
    return "sweep-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in study)


def sweep_tags(study: str, space: list[str], objective: str, direction: str, trials: str) -> dict[str, str]:
    """The runs view of one study's trials (`trials`: their filter, `ledger.study_filter`): its searched
    params as columns, its objective as the sort."""
    state = view_state(space + [p for p in ("epochs", "train_limit") if p not in space], objective, direction, trials)
    return {VIEW_PREFIX + sweep_view_key(study): json.dumps(state)}


def runs_url(base: str, experiment_id: str, view: str = EXPERIMENT_VIEW) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{WORKFLOW}&viewStateShareKey={quote(view)}"


def compare_url(base: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    runs = quote(json.dumps(run_ids, separators=(",", ":")))
    exps = quote(json.dumps(experiment_ids, separators=(",", ":")))
    return f"{base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={exps}&{WORKFLOW}"


def artifact_url(base: str, experiment_id: str, run_id: str, path: str) -> str:
    """A run's artifact shown in the UI's artifact view (an HTML file rendered, its scripts run)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path}"


def model_url(base: str, name: str) -> str:
    """A registered model's page: its versions and their aliases."""
    return f"{base.rstrip('/')}/#/models/{quote(name)}"
