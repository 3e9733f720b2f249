"""`alexnet ui --open --sweep STUDY` on a temp store holding a real tiny sweep (a parent run as the sweep
makes it, two trained trials) and a plain run, and the URLs `alexnet ui` prints opened in headless
Chromium (Debian's /usr/bin/chromium driven by Playwright). What the pages show is checked: the
model-training view, not GenAI's; sorted by the objective, best first; the params and accuracies as
columns; a sweep's trials as rows of their own; the compare page plotting the objective; a sweep's
interactive plots drawn in the artifact view; a promoted model's registry page with its alias.
Screenshots go to tests/artifacts/ (git-ignored); with ALEXNET_DOCS_SCREENSHOTS=1 also to docs/assets/,
where the manual shows them."""

import os
import signal
import socket
import subprocess
import sys

import mlflow
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from alexnet import cli
from alexnet.team import promote
from alexnet.tracking import store, lifecycle
from alexnet.compare import ui
from alexnet import home as home_module
from alexnet.training.config import Config
from alexnet.sweep import figures
from conftest import ROOT, wait_for

CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "tests" / "artifacts"
DOC_SHOTS = ROOT / "docs" / "assets"
TINY = dict(resize=67, epochs=1, train_limit=256, test_limit=200, batch_size=64, eval_batch_size=200)
RUNS = {"uis-trial-0": 0.05, "uis-trial-1": 0.2, "plain": 0.1}
GENAI_ONLY = ["Training runs", "Evaluation runs", "Judges", "Sessions"]  # the GenAI view's side bar


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shown(value: float) -> str:
    """How the UI prints these metrics (test accuracies on 200 images: multiples of 0.005)."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A sweep's runs as `alexnet sweep` leaves them in MLflow (a parent with the study's params, two
    trained child trials) and a plain run; then `alexnet ui --open --sweep uis --top 2`, running: the
    URLs it printed, the one it opened (the "browser" is a script that writes its URL down), its base."""
    home = tmp_path_factory.mktemp("ui")
    saved = {k: os.environ.get(k) for k in ("ALEXNET_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["ALEXNET_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    proc = None
    try:
        store.set_up_store()
        client = mlflow.MlflowClient()
        exp = store.experiment_id(store.DEFAULT_EXPERIMENT)
        parent = client.create_run(exp, run_name="uis", tags={"sweep.study": "uis", "sweep.role": "parent"})
        for k, v in {"objective": "maximize test/best_acc", "space.lr": "lr log-uniform [0.01, 0.5]",
                     "keep_top": "2"}.items():
            client.log_param(parent.info.run_id, k, v)
        for name, lr in RUNS.items():
            tags = {"sweep.study": "uis", "sweep.role": "trial", "sweep.trial": name[-1]} if "trial" in name else {}
            lifecycle.tracked_train(Config(**TINY, lr=lr, run_name=name), progress=False, tags=tags,
                                   parent_run_id=parent.info.run_id if tags else None)
        client.set_terminated(parent.info.run_id, "FINISHED")
        browser = home / "browser.sh"
        browser.write_text(f'#!/bin/sh\necho "$1" >> {home / "opened.txt"}\n')
        browser.chmod(0o755)
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "alexnet", "ui", "--open", "--port", str(port), "--sweep", "uis",
                                 "--top", "2"], cwd=ROOT, env={**os.environ, "BROWSER": f"{browser} %s",
                                                              "TMPDIR": str(home)},  # its server's log goes there
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        printed = [proc.stdout.readline() for _ in range(4)]  # two pages: what each shows, then its URL
        wait_for(lambda: (home / "opened.txt").exists() or proc.poll() is not None, 60, "the UI to open its page")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        yield {"home": home, "exp": exp, "printed": printed, "urls": [line.strip() for line in printed if line.startswith("  http")],
               "opened": (home / "opened.txt").read_text().split(), "base": f"http://127.0.0.1:{port}",
               "runs": {r.info.run_name: r for r in client.search_runs([exp])}, "proc": proc}
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM: `alexnet ui` stops its server (its own session) before it exits
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def at_store(served, monkeypatch):
    """This process's MLflow client on the served store (a test before this one may have pointed it
    elsewhere): `ui.links` reads and writes the experiment's views there."""
    monkeypatch.setenv("ALEXNET_HOME", str(served["home"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", home_module.default_tracking_uri())
    mlflow.set_tracking_uri(home_module.default_tracking_uri())
    return served


@pytest.fixture
def page():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup --test installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 2600, "height": 800})  # the table renders visible columns only
        page.set_default_timeout(60_000)
        try:
            yield page
        finally:
            browser.close()


def screenshot(page, name: str):
    """tests/artifacts/NAME; with ALEXNET_DOCS_SCREENSHOTS=1 also the manual's copy, docs/assets/NAME (the
    pictures in the manual are these, taken of the real UI; tests/test_docs.py checks the names)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / name)
    if os.environ.get("ALEXNET_DOCS_SCREENSHOTS") == "1":
        DOC_SHOTS.mkdir(parents=True, exist_ok=True)
        (DOC_SHOTS / name).write_bytes((SHOTS / name).read_bytes())


def rows_top_down(page, names) -> list[str]:
    """The given run names in the order the runs table shows them, top to bottom."""
    grid = page.get_by_role("grid").first
    found = {name: grid.get_by_text(name, exact=True).first for name in names}
    for cell in found.values():
        cell.wait_for()
    return sorted(names, key=lambda name: found[name].bounding_box()["y"])


def check_model_training_view(page):
    page.get_by_text("Model training").first.wait_for()
    body = page.inner_text("body")
    for genai in GENAI_ONLY:
        assert genai not in body, genai  # MLflow 3.17's default: the GenAI view
    return body


def test_the_runs_page_is_the_model_training_view_best_first_with_params_and_accuracies(at_store, page):
    served = at_store
    # What `alexnet ui` prints for the experiment: the same `links` on the same server.
    [(what, url), (sweep_what, sweep_url)] = ui.links(served["base"], store.DEFAULT_EXPERIMENT)
    assert what.startswith("experiment 'alexnet-fashion-mnist'") and "viewStateShareKey=sweep-uis" in sweep_url
    page.goto(url)
    names = list(served["runs"])  # the parent, both trials, the plain run: every row at top level
    order = rows_top_down(page, names)
    body = check_model_training_view(page)
    assert "Sort: test/best_acc" in body
    best = {n: served["runs"][n].data.metrics.get("test/best_acc", float("-inf")) for n in names}
    assert [best[n] for n in order] == sorted(best.values(), reverse=True), order  # best first; the parent last
    grid = page.get_by_role("grid").first
    text = grid.inner_text()
    for header in ["lr", "dropout", "resize", "batch_size", "epochs", "train_limit", "test/best_acc", "test/acc",
                   "train/loss", "perf/examples_per_sec"]:
        assert header in text.split("\n"), header
    for name in RUNS:
        assert shown(best[name]) in text
    screenshot(page, "ui-runs.png")


def test_the_sweep_pages_show_its_trials_and_compare_its_top_trials_on_the_objective(served, page):
    trials_url, compare_url = served["urls"]
    page.goto(trials_url)
    trials = [n for n in RUNS if "trial" in n]
    order = rows_top_down(page, trials)
    body = check_model_training_view(page)
    best = {n: served["runs"][n].data.metrics["test/best_acc"] for n in trials}
    assert [best[n] for n in order] == sorted(best.values(), reverse=True)
    grid_text = page.get_by_role("grid").first.inner_text()
    assert "plain" not in grid_text and "\nuis\n" not in f"\n{grid_text}\n"  # only the study's trials
    assert "2 matching runs" in body and "lr" in grid_text.split("\n")
    screenshot(page, "ui-sweep.png")

    page.set_viewport_size({"width": 1800, "height": 1500})
    page.goto(compare_url)
    page.get_by_text("Comparing 2 Runs").wait_for()
    check_model_training_view(page)
    # The parallel coordinates plot the runs' first logged metric: the objective, logged first.
    metrics = page.get_by_text("Metrics:", exact=True).locator("xpath=..").inner_text()
    assert "test/best_acc" in metrics and "system/" not in metrics and "train/loss" not in metrics
    text = page.inner_text("body")
    for name in trials:
        assert name in text and served["runs"][name].info.run_id in text
    screenshot(page, "ui-compare.png")


def test_ui_printed_the_sweep_pages_and_opened_the_first(served):
    printed, urls = served["printed"], served["urls"]
    assert printed[0] == "sweep 'uis': its trials, best test/best_acc first:\n"
    assert printed[2] == "sweep 'uis': its top 2 trials side by side:\n"
    assert "workflowType=machine_learning" in urls[0] and "viewStateShareKey=sweep-uis" in urls[0]
    assert "#/compare-runs?runs=" in urls[1] and "workflowType=machine_learning" in urls[1]
    assert served["opened"] == urls[:1]  # --open opened the first page


def test_ctrl_c_stops_the_ui_and_its_server(served):
    """A second `alexnet ui` on the same store (the shared one keeps serving the other tests): once it
    prints its pages, Ctrl-C stops it and its MLflow server."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "alexnet", "ui", "--port", str(port)], cwd=ROOT,
                            env={**os.environ, "ALEXNET_HOME": str(served["home"]), "TMPDIR": str(served["home"])},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().startswith("experiment 'alexnet-fashion-mnist'"), proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "ui: stopping" in err, err[-3000:]
    assert err.startswith("alexnet: store sqlite:///") and "experiment 'alexnet-fashion-mnist'" in err.splitlines()[0]

    def nothing_listens():  # (binding would also fail on the port's TIME_WAIT connections, which are not a server)
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) != 0
    wait_for(nothing_listens, 30, "its server's port to be closed")  # its server and workers are gone


def test_ui_refuses_an_unknown_sweep_before_starting(home, capsys):
    store.set_up_store()
    assert cli.main(["ui", "--sweep", "nosuch"]) == 2
    assert "ui: no sweep 'nosuch'" in capsys.readouterr().err


def test_the_runs_page_and_a_runs_page_show_the_fashion_mnist_dataset_inputs(at_store, page):
    """The Dataset column shows each run's Fashion-MNIST inputs by name and digest; a run's page opens a
    drawer listing each split with its context and profile."""
    served = at_store
    runs = {name: served["runs"][name] for name in RUNS}
    digests = {i.dataset.digest for r in runs.values() for i in r.inputs.dataset_inputs}
    assert len(digests) == 2  # every run saw the same train and test images
    page.goto(ui.links(served["base"], store.DEFAULT_EXPERIMENT)[0][1])
    rows_top_down(page, list(RUNS))
    grid = page.get_by_role("grid").first
    grid.get_by_text("fashion-mnist (").first.wait_for()  # the Dataset column's cells come after the rows
    text = grid.inner_text()
    assert any(d in text for d in digests), text

    run = runs["plain"]
    page.goto(f"{served['base']}/#/experiments/{served['exp']}/runs/{run.info.run_id}")
    page.get_by_text("fashion-mnist (").first.click()
    page.get_by_text("2 datasets used").wait_for()
    screenshot(page, "ui-run-datasets.png")
    drawer = page.inner_text("body")
    for dataset_input in run.inputs.dataset_inputs:
        context = dataset_input.tags[0].value
        assert f"fashion-mnist ({dataset_input.dataset.digest})\n{context.title()}" in drawer, context
    assert "num rows: 256" in drawer and "Path: /" in drawer


def test_a_sweeps_interactive_plots_render_in_the_artifact_view(at_store, page, tmp_path):
    """The parent run's plots/sweep.html (Optuna's plotly plots, plotly.js inside the file) opened where
    `alexnet ui --sweep` points: the UI renders it in a sandboxed frame, and the plots draw there."""
    served = at_store
    study = optuna.create_study(study_name="uis", direction="maximize")
    space = {"lr": FloatDistribution(0.01, 0.5, log=True)}
    for name, lr in RUNS.items():  # the served runs as a study: params, value, per-epoch values
        if "trial" in name:
            acc = served["runs"][name].data.metrics["test/best_acc"]
            study.add_trial(create_trial(params={"lr": lr}, distributions=space, value=acc, intermediate_values={1: acc}))
    study.add_trial(create_trial(params={"lr": 0.3}, distributions=space, value=0.12, intermediate_values={1: 0.12}))
    titles = figures.save_html(study, tmp_path / "sweep.html", "test/best_acc")
    parent = served["runs"]["uis"].info.run_id
    mlflow.MlflowClient().log_artifact(parent, str(tmp_path / "sweep.html"), "plots")
    pages = dict(ui.links(served["base"], store.DEFAULT_EXPERIMENT, sweep="uis", top=2))
    url = pages["sweep 'uis': its plots, interactive"]
    assert url.endswith(f"/runs/{parent}/artifacts/plots/sweep.html")
    page.set_viewport_size({"width": 1600, "height": 1400})
    page.goto(url)
    frame = page.frame_locator("iframe.mlflow-html-iframe")
    frame.locator(".js-plotly-plot").nth(len(titles) - 1).wait_for()
    assert frame.locator(".js-plotly-plot").count() == len(titles) == 4
    frame.locator("svg.main-svg").first.wait_for()  # plotly drew: its scripts ran inside the frame
    assert "Optimisation history" in frame.locator("body").inner_text()
    assert frame.locator(".js-plotly-plot .scatterlayer .point").count() >= 3  # the trials, as points
    screenshot(page, "ui-sweep-plots.png")


def test_the_registered_models_page_shows_the_promoted_version_and_its_alias(at_store, page):
    """`alexnet promote uis` on the served store (its confirmation written as `alexnet confirm` writes it):
    the registered model's page lists the version with the alias champion."""
    served = at_store
    winner = served["runs"]["uis-trial-1"]
    configs = [{"label": label, "params": {"lr": lr}, "values": v, "mean": sum(v) / 3, "std": 0.01, "sweep": v[0],
                "trial": trial, "run_id": run_id, "test_values": v, "test_mean": sum(v) / 3, "test_std": 0.01}
               for label, lr, v, trial, run_id in [("baseline = trial 0", 0.05, [0.1, 0.11, 0.12], 0, None),
                                                   ("trial 1", 0.2, [0.2, 0.21, 0.22], 1, winner.info.run_id)]]
    mlflow.MlflowClient().log_dict(served["runs"]["uis"].info.run_id, {
        "objective": "test/best_acc", "direction": "maximize", "seeds": [1000, 1001, 1002], "p_value": 0.001,
        "winner": "trial 1", "verdict": "yes: trial 1 beats the baseline", "beats_baseline": True, "winner_trial": 1,
        "winner_run_id": winner.info.run_id, "final_test_metric": "test/acc", "configs": configs}, "confirm.json")
    assert promote.promote("uis", quiet=True) == 0
    pages = dict(ui.links(served["base"], store.DEFAULT_EXPERIMENT, sweep="uis", top=2))
    url = pages["registered model 'alexnet-fashion-mnist': its versions, the champion"]
    assert url == f"{served['base']}/#/models/alexnet-fashion-mnist"
    page.goto(url)
    page.get_by_text("Version 1").first.wait_for()
    page.get_by_text("@ champion").first.wait_for()
    body = page.inner_text("body")
    assert "alexnet-fashion-mnist" in body and "Version 2" not in body
    screenshot(page, "ui-registered-model.png")
