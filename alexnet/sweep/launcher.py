"""`alexnet sweep FILE`: check everything, set the study up once, start the workers, watch, summarise.

The launcher never imports torch: it checks the device (with NVML), the data (`alexnet/training/datafiles.py`) and
both stores before the parent run exists, then sets up, under the study lock, the study, the parent run
and the base trial; then it starts N worker processes (`python -m alexnet.sweep.worker SLOT`), each with
its own sampler seed (`seed + slot`: the same seed in two workers proposed duplicate configs), its share of
the CPU threads and, with several GPUs, its own GPU; or, with `--ray`, hands the same workers to a Ray
cluster (`ray_workers.py`), which places them. While they run it prints one line per finished trial and a
progress bar with the best value so far. The parent run carries the launcher's pid and heartbeat, so a
killed launcher leaves it STALE, not RUNNING for ever.

Launchers started independently (other terminals, other machines) on the same storage and tracking server
join the same study and parent run; each gets worker slots of its own. The parent run is ended by the last
launcher whose workers stop, and left RUNNING while another's trials run.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
from tqdm import tqdm

from alexnet import UsageError, home
from alexnet.training import datafiles, sizes
from alexnet.tracking import store
from alexnet.team.backends import check_database, lost_connection
from alexnet.home import artifacts_dir, is_local_default, sqlite_path, tracking_uri, where
from alexnet.redact import first_line, redact
from alexnet.sweep.ledger import made_by_sweep, settings_dict, study_settings, write_settings
from alexnet.sweep.parent import dead_trial_lines, existing_parent
from alexnet.sweep.report import parent_note, summarize, trial_line
from alexnet.sweep.retention import retain
from alexnet.sweep import local_workers
from alexnet.sweep.spec import COSTS, Sweep, base_params, describe_space
from alexnet.sweep.study import open_study, ranked, requeue_server_failures, study_lock, tally
from alexnet.sweep.ledger import FINISHED_STATES, objective_value, seeded
from alexnet.sweep.warm import WarmStart, enqueue, enqueued, seed
from alexnet.sweep.warm import plan as warm_plan
from alexnet.tracking.views import NOTE

UNCOMPARED = {"device", "data_dir", "num_workers", "run_name"}  # may differ between resumes


def preflight(sweep: Sweep, cluster=None) -> None:
    """Before anything is created: the device the trials ask for is there, the data is where the
    config says and intact (on this machine; on a Ray cluster each worker checks its node), the two
    stores answer and are not one database, the cluster answers."""
    device = sweep.config["device"]
    if cluster is None:
        if device.startswith("cuda") and not local_workers.visible_gpus():
            raise UsageError(f"sweep: device = {device!r}, but this machine shows no NVIDIA GPU: "
                             f"use --set device=cpu or device = \"auto\"")
        datafiles.prepare(sweep.config["data_dir"])  # None: no local copy, the workers download it
    if sweep.storage.split("?")[0].rstrip("/") == tracking_uri().split("?")[0].rstrip("/"):
        raise UsageError("sweep: --storage is MLflow's database: Optuna needs its own (e.g. sqlite:///.../optuna.db)")
    if cluster is not None:
        cluster.connect(sweep)
    check_database(sweep.storage, "sweep: --storage")
    store.set_up_store()
    path = sqlite_path(sweep.storage)
    if path is not None:  # made only once the stores answered: a refused sweep creates nothing
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"sweep: cannot make the folder of the Optuna storage {path} ({e.strerror})") from None


def set_up(sweep: Sweep, workers: int, command: str, warm: WarmStart | None = None,
           runs: list[tuple[str, dict]] = ()) -> tuple:
    """Once, in the launching process, under the lock: the study (a new one seeded from `warm`), the
    parent run, the base trial and the `--enqueue` runs. Returns (study, parent run id, first worker slot)."""
    with study_lock(sweep):
        study = open_study(sweep)  # creates the tables once, before any worker opens the file
        exp_id = store.experiment_id(sweep.config["experiment"])
        attrs = study.user_attrs
        fixed = {k: v for k, v in sweep.config.items() if k not in UNCOMPARED}
        if made_by_sweep(attrs):
            started = study_settings(study)
            old = {k: v for k, v in started.config.items() if k not in UNCOMPARED}
            changed = sorted(k for k in set(old) | set(fixed) if old.get(k) != fixed.get(k))
            if changed:
                k = changed[0]
                raise UsageError(f"sweep: study {sweep.study!r} was started with {k} = {old.get(k)!r}, now "
                                 f"{fixed.get(k)!r}: run it as it started, or name a new study (study = ... in the file)")
            if started.space != json.loads(json.dumps(sweep.space)) or started.direction != sweep.direction \
                    or started.objective != sweep.objective or started.cost != sweep.cost \
                    or started.max_epoch_seconds != sweep.max_epoch_seconds:
                raise UsageError(f"sweep: study {sweep.study!r} was started with another search space, objective, cost "
                                 f"or constraint: name a new study (study = ... in the file)")
        started_from = seed(study, attrs, sweep, warm)  # a new study only, before its first trial is queued
        if sweep.cost and not made_by_sweep(attrs):  # Optuna's plots and tables name the two values
            study.set_metric_names([sweep.objective, COSTS[sweep.cost]])
        client = mlflow.MlflowClient()
        parent = existing_parent(attrs.get("mlflow_parent_run_id"))
        if parent is None:
            parent = client.create_run(exp_id, run_name=sweep.study, tags={
                "sweep.study": sweep.study, "sweep.role": "parent", "sweep.storage": redact(sweep.storage),
                "experiment_file": sweep.source, "command": redact(command),
                NOTE: parent_note(sweep, 0, {s: 0 for s in FINISHED_STATES}, [], 0)}).info.run_id
            client.log_param(parent, "objective", f"{sweep.direction} {sweep.objective}")
            for k in ("sampler", "seed", "pruner", "keep_top") + (("cost",) if sweep.cost else ()) \
                    + (("max_epoch_seconds",) if sweep.max_epoch_seconds else ()):
                client.log_param(parent, k, getattr(sweep, k))
            for name, spec in sweep.space.items():
                client.log_param(parent, f"space.{name}", describe_space({name: spec}))
            client.log_text(parent, Path(sweep.source).read_text(), "sweep.toml")
            study.set_user_attr("mlflow_parent_run_id", parent)
        else:
            client.update_run(parent, status="RUNNING")
        write_settings(study, parent, sweep)  # this launch's: a resume may change keep_top, the sampler...
        client.set_tag(parent, "sweep.n_trials", str(sweep.n_trials))
        # A seeded trial with the base's own values is the baseline already: it is not trained again.
        if sweep.enqueue_base and not attrs.get("base_enqueued") \
                and not any(seeded(t) and t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)):
            study.enqueue_trial(base_params(sweep), user_attrs={"baseline": True})
            study.set_user_attr("base_enqueued", True)
        started_from.update(enqueue(study, attrs, runs))
        requeue_server_failures(study, sweep)  # a study that ended with such a failure is not done: it retries it
        for k, v in started_from.items():
            client.set_tag(parent, k, v)
        first_slot = attrs.get("workers_started", 0)
        study.set_user_attr("workers_started", first_slot + workers)
    return study, parent, first_slot


def disk_plan(sweep: Sweep, workers: int) -> str:
    """What a trial writes, from the network's parameter count at the largest resize the sweep trains."""
    spec = sweep.space.get("resize")
    resize = max(spec["choices"]) if spec and "choices" in spec else spec["high"] if spec else sweep.config["resize"]
    one = sizes.weights_bytes(resize)
    # Training: last.pt, and best.pt while the best epoch is an earlier one; at its end the model, then a
    # kept trial holds last.pt and the model, the others nothing. A worker trains `pack` trials at once.
    most = workers * sweep.pack * 3 * one + min(sweep.keep_top, sweep.n_trials or sweep.keep_top) * 2 * one
    line = (f"disk: a trial writes up to {3 * one / 1e6:,.0f} MB ({one / 1e6:,.0f} MB each for last.pt, best.pt and "
            f"the model: {sizes.parameter_count(resize):,} parameters at resize {resize}); the top {sweep.keep_top} "
            f"{'and the Pareto front ' if sweep.cost else ''}keep {2 * one / 1e6:,.0f} MB each, the others nothing: "
            f"at most {most / 1e9:,.2f} GB" + (" plus the front's" if sweep.cost else ""))
    if is_local_default(tracking_uri()):
        line += f", {shutil.disk_usage(artifacts_dir()).free / 1e9:,.1f} GB free in {artifacts_dir()}"
    return line


def worker_orders(sweep: Sweep, slot: int, parent: str, deadline: float, threads: int) -> dict:
    """What a worker needs to start (`worker.main`): the resolved sweep, its slot, the parent run, the
    deadline, its torch threads, the stores, and the command the user typed (the runs' `command` tag)."""
    return {"sweep": settings_dict(sweep), "slot": slot, "parent": parent, "deadline": deadline, "threads": threads,
            "tracking_uri": tracking_uri(), "argv": sys.argv}


def run_sweep(sweep: Sweep, workers: int = 1, quiet: bool = False, command: str = "", cluster=None,
              waiting: list | None = None, warm_start: str | None = None, enqueue_runs: list[str] = ()) -> dict:
    """Check, set up, start the workers (here, or on `cluster`, a `ray_workers.Cluster`), watch the
    study until they exit, then keep the top K and summarise. `waiting`: this machine's workers, already
    started (`local_workers.start`; else they are started here), importing while the checks run.
    `warm_start`: `STUDY[@STORAGE]`, an earlier study whose fitting trials seed a new one; `enqueue_runs`:
    MLflow runs whose values of the searched fields are queued as the first trials (`alexnet/sweep/warm.py`).
    Returns the summary plus 'status' (0 done, 1 a worker died or the count is not reached, 2 a worker
    refused its input, 130 interrupted). The parent run ends FINISHED once the study is complete, KILLED
    when this command stopped short, and stays RUNNING while other launchers' workers go on."""
    if workers < 1:
        raise UsageError(f"sweep: --workers must be >= 1, got {workers}")
    if cluster is None and waiting is None:
        waiting = local_workers.start(workers, sweep.config["device"])
    try:
        warm = warm_plan(sweep, warm_start) if warm_start else None  # read and checked before anything is created
        preflight(sweep, cluster)
        home.announce(sweep.config["experiment"])
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        runs = enqueued(sweep, list(enqueue_runs))
        study, parent, first_slot = set_up(sweep, workers, command or " ".join(sys.argv), warm, runs)
    except BaseException:
        local_workers.dismiss(waiting or [])  # they exit having touched nothing
        raise
    print(disk_plan(sweep, workers), file=sys.stderr)  # also with --quiet: it is what the disk must hold
    say = (lambda line: None) if quiet else (lambda line: tqdm.write(line, file=sys.stderr))
    if warm is not None:
        say(warm.line())
    done, running, _ = tally(study)
    placed = cluster.describe(workers) if cluster else f"{workers} worker{'s' if workers > 1 else ''}"
    say(f"sweep {sweep.study!r}: {len(done)} of {sweep.n_trials or 'unlimited'} trials done"
        f"{', resuming' if done or running else ''}; {placed}; "
        f"storage {redact(where(sweep.storage))}; parent run {parent}")
    for line in dead_trial_lines(running, sweep.grace_seconds, sweep.heartbeat_seconds):
        say(line)

    deadline = time.time() + sweep.timeout_minutes * 60 if sweep.timeout_minutes else 0.0
    stop_heartbeat = store.start_heartbeat(parent, also=lambda tags: study.set_user_attr(launcher_key(), tags))
    status, summary, procs = 0, None, []
    try:
        threads = cluster.threads if cluster else local_workers.threads_each(workers)
        orders = [worker_orders(sweep, first_slot + i, parent, deadline, threads) for i in range(workers)]
        if cluster:
            procs = cluster.start(orders)  # Ray gives each its GPU
        else:
            local_workers.send(waiting, orders)
            procs = waiting
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        status = watch(study, sweep, procs, say, quiet)
        status = worker_status(status, procs, first_slot)
        try:
            with study_lock(sweep):  # as in the workers: never two processes deleting one run's files
                retain(study, sweep)
        except Exception as e:
            print(f"alexnet sweep: deleting old checkpoints failed ({first_line(e)}); "
                  f"the next run of this command tries again", file=sys.stderr)
        summary = summarize(study, sweep, parent)
    except Exception as e:
        if lost_connection(e):  # the storage or the server went away: one line, not a traceback
            raise ConnectionError(f"lost {lost_connection(e)} ({first_line(e)}): the workers' trials are retried "
                                  f"once it is back (run the same command again)") from None
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stop_heartbeat()
        if cluster:
            cluster.close()
        status, complete = end_parent(study, sweep, parent, status, summary, deadline)
    return {**summary, "status": status, "parent": parent, "study": study, "complete": complete}


def end_parent(study, sweep: Sweep, parent: str, status: int, summary, deadline: float) -> tuple[int, bool]:
    """Under the study lock: sign this launcher off, and end the parent run, FINISHED or KILLED, unless
    another launcher (another terminal, machine or cluster) is still alive: the last one to stop ends it.
    Returns (status, whether the study has its count)."""
    try:
        with study_lock(sweep):
            study.set_user_attr(launcher_key(), None)
            others = [k for k, tags in study.user_attrs.items()
                      if k.startswith("launcher:") and tags and store.process_gone(tags) is None]
            done, running, _ = tally(study)
    except Exception as e:
        print(f"alexnet sweep: cannot read the study to end the parent run ({first_line(e)})", file=sys.stderr)
        return status or 1, False
    complete = (not sweep.n_trials or len(done) >= sweep.n_trials) and not running
    if status == 0 and summary is None:
        status = 1  # the summary itself failed
    if status == 0 and not complete and not running and not deadline:
        status = 1
    if not others:
        try:
            mlflow.MlflowClient().set_terminated(parent, "FINISHED" if status == 0 else "KILLED")
        except Exception as e:
            print(f"alexnet sweep: cannot end the parent run {parent} ({first_line(e)}); `alexnet runs` shows it "
                  f"STALE", file=sys.stderr)
            status = status or 1
    return status, complete


def launcher_key() -> str:
    """This launcher's entry in the study's user attributes: its process tags, kept fresh by the parent
    run's heartbeat, so that the others can tell whether it is still alive. Named by its pid namespace too:
    launchers in two containers of one hostname may well have the same pid."""
    return f"launcher:{platform.node()}:{store.pid_namespace()}:{os.getpid()}"


def watch(study, sweep: Sweep, procs: list, say, quiet: bool) -> int:
    """Until the workers exit: one line per finished trial, a progress bar with the best value so far.
    Ctrl-C stops the workers (their trials end KILLED and are queued again) and returns 130."""
    done, _, _ = tally(study)
    seen = {t.number for t in done} | {t.number for t in study.get_trials(deepcopy=False) if seeded(t)}
    failed_once, warned = set(), []
    bar = tqdm(total=sweep.n_trials or None, initial=len(done), unit="trial", disable=True if quiet else None,
               dynamic_ncols=True, desc=f"sweep {sweep.study}", file=sys.stderr)

    def poll(final=False):
        trials = study.get_trials(deepcopy=False)
        retried_as = {t.system_attrs["retry_history"][-1]: t.number for t in trials if "retry_history" in t.system_attrs}
        for t in trials:
            if t.state.is_finished() and t.number not in seen:
                # A dead worker's trial is failed a moment before its retry is queued: give the retry
                # one poll to appear, so the line can say which trial retries it.
                if t.state.name == "FAIL" and t.number not in retried_as and t.number not in failed_once and not final:
                    failed_once.add(t.number)
                    continue
                seen.add(t.number)
                say(trial_line(t, sweep.objective, retried_as, sweep.config["epochs"], sweep.cost))
        finished, _, _ = tally(study, trials)
        bar.n = len(finished)
        best = ranked(study, sweep.direction, trials)
        if best:
            bar.set_postfix_str(f"best {objective_value(best[0]):.4f} (trial {best[0].number})", refresh=False)
        bar.refresh()

    def poll_quietly(final=False):
        try:
            poll(final)
        except Exception as e:  # the storage may come back; the workers decide whether to go on
            if not lost_connection(e):
                raise
            if not warned:
                warned.append(e)
                say(f"lost {lost_connection(e)} ({first_line(e)}): waiting for the workers")

    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.25)
            poll_quietly()
        poll_quietly(final=True)
        return 0
    except KeyboardInterrupt:
        say("interrupted: stopping the workers (their trials end KILLED and are queued again)")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        poll_quietly(final=True)
        return 130
    finally:
        bar.close()


def worker_status(status: int, procs: list, first_slot: int) -> int:
    """The sweep's exit status from the workers' (a worker killed or failing makes it 1; one that refused
    its input, 2), with a line for each that did not end well."""
    for i, p in enumerate(procs):
        where = p.where if hasattr(p, "where") else f"pid {p.pid}"  # a Ray worker says where it ran
        if p.returncode not in (0, 130) and status == 0:
            status = 2 if p.returncode == 2 else 1
        if p.returncode and p.returncode < 0:
            print(f"alexnet sweep: worker {first_slot + i} ({where}) was killed by "
                  f"{signal.Signals(-p.returncode).name}: its trial is retried with the same params by a running "
                  f"worker, or when the study resumes (run the same command again)", file=sys.stderr)
        elif p.returncode not in (0, 2, 130):
            print(f"alexnet sweep: worker {first_slot + i} ({where}) exited with status {p.returncode}",
                  file=sys.stderr)
    return status
