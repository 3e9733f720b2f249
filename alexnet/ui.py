"""`alexnet ui`: the MLflow UI on the project's store, on 127.0.0.1 unless told otherwise.

It starts `mlflow ui` (one worker) as a child process, waits until `/health` answers, prints the URL of
the experiment's runs page, and stops the server on Ctrl-C. Binding beyond loopback needs an explicit
`--allowed-hosts`: MLflow refuses requests whose Host header it does not know, and a server on
0.0.0.0 shows every run to the network. A tracking URI that is already a server needs no UI of ours:
its URL is printed instead.
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
from pathlib import Path
from urllib.parse import quote


from alexnet import UsageError, store
from alexnet.home import artifacts_dir, is_local_default, where
from alexnet.redact import redact

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def runs_url(base: str, experiment_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"


def compare_url(base: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    runs = quote("[" + ",".join(f'"{r}"' for r in run_ids) + "]")
    exps = quote("[" + ",".join(f'"{e}"' for e in experiment_ids) + "]")
    return f"{base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={exps}"


def check_port(host: str, port: int, what: str = "ui") -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"{what}: cannot listen on {host}:{port} ({e.strerror}): pick another port with --port") from None


def start(uri: str, artifact_root: str | None, host: str = "127.0.0.1", port: int = 5000,
          allowed_hosts: str | None = None, log_path: str | Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start `mlflow ui` on `uri`; returns (process, base URL). The store URI travels in the
    environment, not on the command line, so a password in it never shows in `ps`."""
    if host not in LOOPBACK and not allowed_hosts:
        raise UsageError(f"ui: --host {host} would show every run to the network: also pass --allowed-hosts "
                         f"with the names clients use (e.g. --allowed-hosts {socket.gethostname()}:{port})")
    check_port(host, port)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port), "--workers", "1"]
    if artifact_root:
        cmd += ["--default-artifact-root", artifact_root]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # its job runner only slows the start (~5 s)
    log_path = Path(log_path or Path(tempfile.gettempdir()) / f"alexnet-ui-{port}.log")
    with open(log_path, "wb") as log:
        # A session of its own: the terminal's Ctrl-C reaches only us, and we stop the whole group.
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log_path
    host_in_url = f"[{host}]" if ":" in host else ("127.0.0.1" if host in ("0.0.0.0", "::") else host)
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


def serve(host: str, port: int, allowed_hosts: str | None, experiment: str) -> int:
    """`alexnet ui`: start, print the runs page's URL, wait for Ctrl-C."""
    uri = store.set_up_store()
    # The project's own experiment is made if missing; any other must exist (a typo is one line, not a UI).
    exp_id = store.experiment_id(experiment, create=experiment == store.DEFAULT_EXPERIMENT)
    if uri.startswith(("http://", "https://")):
        base = redact(uri)
        print(runs_url(base, exp_id))
        print(f"(runs are on the tracking server {base}: open it there, no local UI needed)", file=sys.stderr)
        return 0
    artifact_root = artifacts_dir().as_uri() if is_local_default(uri) else None
    proc, base = start(uri, artifact_root, host, port, allowed_hosts)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` too stops the server (finally below)
    try:
        print(f"ui: starting the MLflow UI on {redact(where(uri))} ...", file=sys.stderr)
        wait_ready(proc, base)
        print(runs_url(base, exp_id))
        print(f"ui: experiment {experiment!r}; server log {proc.log_path}; Ctrl-C stops it", file=sys.stderr)
        proc.wait()
        print(f"ui: mlflow ui exited ({proc.returncode}); log: {proc.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ui: stopping", file=sys.stderr)
        return 0
    finally:
        stop(proc)
