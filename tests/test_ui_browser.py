"""`alexnet ui`'s server on a temp store with two real tiny runs, opened in headless Chromium (Debian's
/usr/bin/chromium driven by Playwright): the runs page and the compare page show the runs' names,
params and metrics, and the runs page and a run's page show the Fashion-MNIST dataset inputs. Screenshots go to tests/artifacts/ (git-ignored)."""

import os
import socket

import mlflow
import pytest

from alexnet import home as project, store, tracking, ui
from alexnet.config import Config
from conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "tests" / "artifacts"
TINY = dict(resize=67, epochs=1, train_limit=256, test_limit=200, batch_size=64, eval_batch_size=200)
RUNS = {"ui-lr-0.05": 0.05, "ui-lr-0.2": 0.2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shown(value: float) -> str:
    """How the UI prints these metrics (test accuracies on 200 images: multiples of 0.005)."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


@pytest.fixture
def server(home):
    """Two real tiny runs in a temp store, and the MLflow UI serving them."""
    for name, lr in RUNS.items():
        tracking.tracked_train(Config(**TINY, lr=lr, run_name=name), progress=False)
    uri = project.tracking_uri()
    proc, base = ui.start(uri, project.artifacts_dir().as_uri(), port=free_port(),
                          log_path=home / "ui.log")
    try:
        ui.wait_ready(proc, base, timeout=180)
        yield base
    finally:
        ui.stop(proc)
        os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def page():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup --test installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1800, "height": 700})
        page.set_default_timeout(60_000)
        try:
            yield page
        finally:
            browser.close()


def test_runs_and_compare_pages_show_names_params_and_metrics(server, page):
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(store.DEFAULT_EXPERIMENT)
    found = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(found) == set(RUNS)
    SHOTS.mkdir(exist_ok=True)

    # Runs page: show the lr and dropout params and the accuracy metrics as columns.
    page.goto(ui.runs_url(server, exp.experiment_id))
    for name in RUNS:
        page.get_by_text(name, exact=True).first.wait_for()
    if page.get_by_role("button", name="Close").count():
        page.get_by_role("button", name="Close").first.click()  # the assistant side panel
    page.get_by_role("button", name="Columns").click()
    for column in ["test/best_acc", "train/loss", "lr", "dropout"]:
        page.get_by_title(column, exact=True).first.click()
    page.keyboard.press("Escape")
    grid = page.get_by_role("grid").first
    grid.get_by_text("test/best_acc").wait_for()
    page.screenshot(path=SHOTS / "ui-runs.png")
    text = grid.inner_text()
    for name, run in found.items():
        assert name in text
        assert shown(run.data.metrics["test/best_acc"]) in text
        assert f"{run.data.metrics['train/loss']:.3f}"[:4] in text
    for header in ["test/best_acc", "train/loss", "lr", "dropout", "0.05", "0.2", "0.5"]:
        assert header in text, header
    # The Dataset column: each run's Fashion-MNIST inputs, by name and digest, with the split as context.
    digests = {i.dataset.digest for r in found.values() for i in r.inputs.dataset_inputs}
    assert len(digests) == 2  # the two runs saw the same train and test images
    assert "fashion-mnist" in text and any(d in text for d in digests), text

    # A run's page names its datasets; their drawer lists each split with its context and profile.
    run = found["ui-lr-0.05"]
    page.goto(f"{server}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}")
    page.get_by_text("fashion-mnist (").first.click()
    page.get_by_text("2 datasets used").wait_for()
    page.screenshot(path=SHOTS / "ui-run-datasets.png")
    drawer = page.inner_text("body")
    for dataset_input in run.inputs.dataset_inputs:
        context = dataset_input.tags[0].value
        assert f"fashion-mnist ({dataset_input.dataset.digest})\n{context.title()}" in drawer, context
    assert "num rows: 256" in drawer and "Path: /" in drawer
    page.keyboard.press("Escape")

    # Compare page: both runs side by side, with their params and metrics.
    page.set_viewport_size({"width": 1800, "height": 1500})
    page.goto(ui.compare_url(server, [r.info.run_id for r in found.values()], [exp.experiment_id]))
    page.get_by_text("test/best_acc").first.wait_for()
    for name in RUNS:
        page.get_by_text(name, exact=True).first.wait_for()
    page.get_by_text("Visualizations", exact=True).click()  # fold the plots: the tables are what we check
    text = page.inner_text("body")
    page.get_by_text("Show diff only").first.click()  # the screenshot shows the params that differ
    page.screenshot(path=SHOTS / "ui-compare.png")
    assert "Comparing 2 Runs" in text
    for key in ["lr", "dropout", "resize", "test/acc", "test/best_acc", "train/loss", "perf/examples_per_sec"]:
        assert key in text, key
    for name, run in found.items():
        assert name in text and run.info.run_id in text
        assert shown(run.data.metrics["test/best_acc"]) in text
