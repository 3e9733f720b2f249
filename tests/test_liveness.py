"""Is a RUNNING run's process alive? Two "machines" that bear one hostname (containers sharing a host's
network, a fleet of machines all called `ubuntu`) but not one pid namespace: a run of the other one, whose
pid means nothing here, is alive while its heartbeat is fresh, for `alexnet runs --kill-stale`,
`train --resume`, `alexnet gc` and a sweep launcher ending its parent run; once its heartbeat is stale it
is gone. In this very pid namespace the pid itself is checked, at once."""

import os
import platform
import subprocess
import time

import mlflow
import optuna
import pytest

from alexnet import UsageError, cli
from alexnet.sweep import launcher
from alexnet.sweep.spec import Sweep
from alexnet.tracking import lifecycle, store

OTHER_NAMESPACE = "00000000-0000-0000-0000-000000000000:4026531836"  # another kernel's first pid namespace


def gone_pid() -> int:
    """A pid that has just ended here."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    return dead.pid


def twin(heartbeat_age_s: float) -> dict:
    """The tags of a process on another machine or container named like this one: its pid is no process
    here, its heartbeat `heartbeat_age_s` old."""
    return {"host": platform.node(), "pid": str(gone_pid()), "pid_namespace": OTHER_NAMESPACE,
            "process_start": f"{time.time() - 600:.3f}", "heartbeat": str(int(time.time() - heartbeat_age_s))}


def test_a_twin_of_this_host_is_judged_by_its_heartbeat_and_this_namespace_by_its_pid():
    now = time.time()
    assert store.stale_reason("RUNNING", twin(30), now) is None
    why = store.stale_reason("RUNNING", twin(3600), now)
    assert why.startswith(f"no heartbeat from {platform.node()} (another machine or container of this name) for 60 min")
    mine = store.process_tags()
    assert mine["pid_namespace"] == store.pid_namespace() != OTHER_NAMESPACE
    assert store.stale_reason("RUNNING", mine) is None
    dead = {**mine, "pid": str(gone_pid())}
    assert store.stale_reason("RUNNING", dead) == f"process {dead['pid']} is gone"  # fresh heartbeat or not
    # Tags written before they named a namespace: this hostname proves nothing, the heartbeat decides.
    old = {k: v for k, v in dead.items() if k != "pid_namespace"}
    assert store.stale_reason("RUNNING", old, now) is None
    assert "no heartbeat" in store.stale_reason("RUNNING", {**old, "heartbeat": str(int(now - 3600))}, now)


def test_kill_stale_and_resume_leave_a_twins_live_run_alone(home, capsys):
    store.set_up_store()
    client = mlflow.MlflowClient()
    exp = store.experiment_id(store.DEFAULT_EXPERIMENT)
    live = client.create_run(exp, run_name="twin-live", tags=twin(30)).info.run_id
    silent = client.create_run(exp, run_name="twin-silent", tags=twin(3600)).info.run_id

    assert cli.main(["runs", "--kill-stale"]) == 0
    err = capsys.readouterr().err
    assert f"marked run {silent} KILLED" in err and live not in err
    assert client.get_run(live).info.status == "RUNNING"
    assert client.get_run(silent).info.status == "KILLED"
    assert "no heartbeat" in client.get_run(silent).data.tags["killed_reason"]

    with pytest.raises(UsageError, match=f"run {live} is still RUNNING"):
        lifecycle.resume_config(live)
    # Once its heartbeat is stale, --resume takes it (and stops only at what is missing: a checkpoint).
    client.set_tag(live, "heartbeat", str(int(time.time() - 3600)))
    with pytest.raises(UsageError, match="has no checkpoint"):
        lifecycle.resume_config(live)


def test_a_launcher_does_not_end_the_parent_run_a_twins_launcher_still_uses(home, tmp_path):
    store.set_up_store()
    client = mlflow.MlflowClient()
    parent = client.create_run(store.experiment_id(store.DEFAULT_EXPERIMENT), run_name="study").info.run_id
    sweep = Sweep(study="twins", n_trials=1, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name=sweep.study, storage=sweep.storage)
    study.set_user_attr(launcher.launcher_key(), store.process_tags())  # this launcher
    # The twin's launcher has this host's name, and may well have this very pid.
    study.set_user_attr(f"launcher:{platform.node()}:{OTHER_NAMESPACE}:{gone_pid()}", twin(30))
    assert launcher.launcher_key() != f"launcher:{platform.node()}:{OTHER_NAMESPACE}:{os.getpid()}"

    launcher.end_parent(study, sweep, parent, 0, {}, 0.0)
    assert client.get_run(parent).info.status == "RUNNING"  # the twin's launcher ends it
    assert launcher.launcher_key() not in study.user_attrs or study.user_attrs[launcher.launcher_key()] is None

    key = next(k for k in study.user_attrs if OTHER_NAMESPACE in k)
    study.set_user_attr(key, twin(3600))  # the twin died long ago
    launcher.end_parent(study, sweep, parent, 0, {}, 0.0)
    assert client.get_run(parent).info.status in ("FINISHED", "KILLED")
