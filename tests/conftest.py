import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A throw-away project home: MLflow and Optuna stores go to tmp_path/mlruns, never the repo's."""
    monkeypatch.setenv("ALEXNET_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
    # The commands export the store they used (set_up_store), for their child processes; monkeypatch
    # restores only what existed before, so the variable is removed here.
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def run_cli(*args, env=None, timeout=600):
    """`python -m alexnet ARGS` in a subprocess, from the repository root."""
    return subprocess.run([sys.executable, "-m", "alexnet", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def wait_for(predicate, timeout, what, every=0.05):
    """Poll `predicate` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
