import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # The test processes share the cores instead of each starting one torch thread per core (set
    # before torch is imported here; subprocesses inherit it).
    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(share))


@pytest.fixture(scope="session", autouse=True)
def inductor_cache(tmp_path_factory):
    """torch.compile's kernel cache (hundreds of MB) goes to the session's temp folder, which is
    removed when the suite passes, not to /tmp/torchinductor_<user>, which nothing removes. (Only its
    precompiled headers, about 150 MB, written once and reused, still go there: torch fixes that path
    at import.)"""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("torchinductor")))
        yield


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """This test's own temp folder, for it and its subprocesses: MLflow's model loading and artifact
    downloads without a destination copy into a temp folder they never remove."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


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


def wait_for(predicate, timeout, what, every=0.05, proc=None, log=None):
    """Poll `predicate` until it is true; fail the test after `timeout` seconds. With `proc` (a Popen whose
    output goes to the file `log`), fail as soon as it exits, and say in both failures what it printed last."""
    def printed():
        return f"; it printed:\n{Path(log).read_text(errors='replace')[-3000:]}" if log else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}{printed()}")
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}{printed()}")


def default_sigint():
    """A `preexec_fn` for a child the test will Ctrl-C: started from a background job, a process inherits
    SIGINT ignored, and Python then installs no KeyboardInterrupt handler; this restores the default."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def file_size_limit(nbytes: int):
    """A `preexec_fn` that limits the files the subprocess writes to `nbytes` (`ulimit -f`): it stands
    in for a full disk, as writes past it fail (EFBIG) the way they fail on a full disk (ENOSPC)."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails, not kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit
