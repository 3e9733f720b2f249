"""Learning curves: the loss and accuracies per epoch of one or more runs, read back from MLflow, in one
PNG (matplotlib's object API: no display, no global state, safe in a background thread)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
from matplotlib.figure import Figure

from alexnet import files
from alexnet.redact import first_line

CURVES = {"train/loss": "loss", "train/acc": "train acc", "test/acc": "test acc"}


def history(run_id: str, keys=CURVES) -> dict[str, dict[int, float]]:
    """Per-epoch values, {key: {epoch: value}} (the last value logged, should an epoch have two)."""
    client = mlflow.MlflowClient()
    return {key: {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
            for key in keys}


def plot_curves(run_ids: list[str], path: str | Path, labels: list[str] | None = None) -> Path:
    """Loss (left) and train/test accuracy (right) per epoch, one colour per run, in one PNG."""
    if labels is None:
        client = mlflow.MlflowClient()
        labels = [client.get_run(r).info.run_name or r[:8] for r in run_ids]
    fig = Figure(figsize=(11, 4.2))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for i, (run_id, label) in enumerate(zip(run_ids, labels)):
        color = f"C{i % 10}"
        curves = history(run_id)
        for key, ax, style in (("train/loss", ax_loss, "-"), ("train/acc", ax_acc, "--"), ("test/acc", ax_acc, "-")):
            points = sorted(curves[key].items())
            if points:
                ax.plot(*zip(*points), style, color=color, marker="o", markersize=3,
                        label=f"{label} ({CURVES[key]})" if ax is ax_acc else label)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy (dashed: train, solid: test)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.replacing(path, suffix=path.suffix) as tmp:  # savefig picks the format from the suffix
        fig.savefig(tmp, dpi=110)
    return path


def log_curves(run_id: str) -> None:
    """`learning_curves.png` on the run, from its metric history (all epochs, also across resumes). A
    plot that fails is noted in a tag: it must not fail the run it describes."""
    client = mlflow.MlflowClient()
    try:
        with tempfile.TemporaryDirectory(prefix="alexnet-plot-") as tmp:
            path = Path(tmp) / "learning_curves.png"
            plot_curves([run_id], path)
            client.log_artifact(run_id, str(path))
    except Exception as e:
        client.set_tag(run_id, "curves_error", first_line(e, 500))


log_curves.what = "drawing the learning curves"
