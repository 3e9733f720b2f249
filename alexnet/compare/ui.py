"""`alexnet ui`: the MLflow UI on the project's store, on 127.0.0.1 unless told otherwise.

It starts `mlflow ui` (one worker) as a child process, waits until `/health` answers, prints the URLs
that open where a user looks (`alexnet/tracking/views.py`: the model-training view, best first, the params and
accuracies as columns; a study's trials; the compare page of a study's top trials), optionally opens the
first in a browser, and stops the server on Ctrl-C. Binding beyond loopback needs an explicit
`--allowed-hosts`: MLflow refuses requests whose Host header it does not know, and a server on
0.0.0.0 shows every run to the network. A tracking URI that is already a server needs no UI of ours:
the URLs on it are printed instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import webbrowser
from pathlib import Path

import mlflow

from alexnet import UsageError, home
from alexnet.sweep import ledger
from alexnet.tracking import store, views
from alexnet.home import artifacts_dir, is_local_default, where
from alexnet.redact import redact

HTML = "plots/sweep.html"  # a sweep's interactive plots on its parent run (alexnet/sweep/figures.py)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def links(base: str, experiment: str, sweep: str | None = None, top: int = 3) -> list[tuple[str, str]]:
    """(what it shows, URL) of the pages to open, their views written on the experiment first. With
    `sweep`: the study's trials, the compare page of its `top` best FINISHED trials, its interactive plots
    (once the sweep wrote them) and the experiment's registered model (once one was promoted); else the
    experiment's runs and each of its studies' trials."""
    client = mlflow.MlflowClient()
    if sweep:
        parent = ledger.parent_run(sweep, "ui")
        exp_id = parent.info.experiment_id
        settings = ledger.parent_settings(parent)
        objective = settings.objective
        best = ledger.best_trial_runs(sweep, settings, exp_id, top)
        if not best:
            raise UsageError(f"ui: sweep {sweep!r} has no FINISHED trial to compare yet")
        found = [(f"sweep {sweep!r}: its trials, best {objective} first", sweep_page(base, client, sweep, parent)),
                 (f"sweep {sweep!r}: its top {len(best)} trials side by side",
                  views.compare_url(base, [r.info.run_id for r in best], [exp_id]))]
        if HTML in {f.path for f in client.list_artifacts(parent.info.run_id, "plots")}:
            found.append((f"sweep {sweep!r}: its plots, interactive",
                          views.artifact_url(base, exp_id, parent.info.run_id, HTML)))
        name = client.get_experiment(exp_id).name
        if client.search_registered_models(f"name = '{name}'"):
            found.append((f"registered model {name!r}: its versions, the champion", views.model_url(base, name)))
        return found
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return [(f"experiment {experiment!r} has no runs yet: the experiments", f"{base.rstrip('/')}/#/experiments")]
    for key, value in views.experiment_tags().items():  # an experiment made before these tags gets them
        if key != views.NOTE or key not in exp.tags:  # a description edited in the UI stays
            client.set_experiment_tag(exp.experiment_id, key, value)
    found = [(f"experiment {experiment!r}: its runs, best test/best_acc first", views.runs_url(base, exp.experiment_id))]
    for name, parent in ledger.parents(exp.experiment_id).items():
        found.append((f"sweep {name!r}: its trials", sweep_page(base, client, name, parent)))
    return found


def sweep_page(base: str, client, study: str, parent) -> str:
    """The runs page of a study's trials, its view (the searched params, the objective) written first."""
    settings = ledger.parent_settings(parent)
    for key, value in views.sweep_tags(study, list(settings.space), settings.objective, settings.direction,
                                       ledger.study_filter(study, "trial")).items():
        client.set_experiment_tag(parent.info.experiment_id, key, value)
    return views.runs_url(base, parent.info.experiment_id, views.sweep_view_key(study))


def print_links(found: list[tuple[str, str]]) -> None:
    for what, url in found:
        print(f"{what}:\n  {url}", flush=True)


def check_host(host: str, port: int, allowed_hosts: str | None) -> None:
    """Beyond loopback only with the names clients use: MLflow's UI has no login."""
    if host not in LOOPBACK and not allowed_hosts:
        raise UsageError(f"ui: --host {host} would show every run to the network: also pass --allowed-hosts "
                         f"with the names clients use (e.g. --allowed-hosts {socket.gethostname()}:{port})")


def check_port(host: str, port: int, what: str = "ui") -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"{what}: cannot listen on {host}:{port} ({e.strerror}): pick another port with --port") from None


def start(uri: str, artifact_root: str | None, host: str = "127.0.0.1", port: int = 5000,
          allowed_hosts: str | None = None, log_path: str | Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start `mlflow ui` on `uri`; returns (process, base URL)."""
    check_host(host, port, allowed_hosts)
    options = (["--default-artifact-root", artifact_root] if artifact_root else []) \
        + (["--allowed-hosts", allowed_hosts] if allowed_hosts else [])
    return launch("ui", options, uri, host, port, log_path)


def launch(program: str, options: list[str], backend_uri: str, host: str, port: int,
           log_path: str | Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start `mlflow ui` or `mlflow server` (`program`) with `options` on the store `backend_uri`, its output
    in a log file (default: alexnet-PROGRAM-PORT.log in the temp folder); returns (process, base URL for
    this machine). The store URI travels in the environment, not on the command line, so a password in it
    never shows in `ps`."""
    check_port(host, port, program)
    cmd = [sys.executable, "-m", "mlflow", program, *options, "--host", host, "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend_uri,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # its job runner only slows the start (~5 s)
    log_path = Path(log_path or Path(tempfile.gettempdir()) / f"alexnet-{program}-{port}.log")
    with open(log_path, "wb") as log:
        # A session of its own: the terminal's Ctrl-C reaches only us, and we stop the whole group.
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log_path
    host_in_url = f"[{host}]" if ":" in host else ("127.0.0.1" if host == "0.0.0.0" else host)
    return proc, f"http://{host_in_url}:{port}"


def wait_ready(proc: subprocess.Popen, base: str, timeout: float = 120.0, what: str = "ui: mlflow ui") -> None:
    """Poll `/health` until it answers; a UsageError with the log's tail if the server dies or is slow."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(proc.log_path).read_text(errors="replace").strip().splitlines()[-3:]
            raise UsageError(f"{what} exited ({proc.returncode}): {' | '.join(tail)} (log: {proc.log_path})")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    stop(proc)
    raise UsageError(f"{what} did not answer within {timeout:.0f} s (log: {proc.log_path})")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def serve(host: str, port: int, allowed_hosts: str | None, experiment: str, sweep: str | None = None,
          top: int = 3, open_browser: bool = False) -> int:
    """`alexnet ui`: start, print the pages' URLs (and open the first), wait for Ctrl-C."""
    if top < 1:
        raise UsageError(f"ui: --top must be >= 1, got {top}")
    if not home.tracking_uri().startswith(("http://", "https://")):  # else no local UI is started
        check_host(host, port, allowed_hosts)  # before the store is touched: a refusal leaves it as it was
        check_port(host, port)
    uri = store.set_up_store()
    home.announce(None if sweep else experiment, uri)
    if not sweep:  # the project's own experiment is made if missing; any other must exist (a typo is one line)
        store.experiment_id(experiment, create=experiment == store.DEFAULT_EXPERIMENT)
    if uri.startswith(("http://", "https://")):
        found = links(redact(uri), experiment, sweep, top)
        print_links(found)
        print(f"(runs are on the tracking server {redact(uri)}: open them there, no local UI needed)", file=sys.stderr)
        if open_browser:
            webbrowser.open(found[0][1])
        return 0
    if sweep:
        ledger.parent_run(sweep, "ui")  # an unknown study is refused before the server starts
    artifact_root = artifacts_dir().as_uri() if is_local_default(uri) else None
    proc, base = start(uri, artifact_root, host, port, allowed_hosts)

    def ready():
        found = links(base, experiment, sweep, top)
        print_links(found)
        print(f"ui: server log {proc.log_path}; Ctrl-C stops it", file=sys.stderr)
        if open_browser:
            webbrowser.open(found[0][1])

    return serve_until_stopped(proc, base, "ui: mlflow ui", f"ui: starting the MLflow UI on {redact(where(uri))} ...",
                               ready)


def serve_until_stopped(proc: subprocess.Popen, base: str, what: str, starting: str, ready) -> int:
    """Once `proc` (an MLflow server, `what`: "ui: mlflow ui") answers, `ready()` says what to open or export;
    then wait. Returns 1 if the server exits by itself (its log named), 0 on Ctrl-C; stopped either way."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` too stops the server (finally below)
    try:
        print(starting, file=sys.stderr)
        wait_ready(proc, base, what=what)
        ready()
        proc.wait()
        print(f"{what} exited ({proc.returncode}); log: {proc.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{what.split(':')[0]}: stopping", file=sys.stderr)
        return 0
    finally:
        stop(proc)
