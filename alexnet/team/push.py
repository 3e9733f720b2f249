"""`alexnet push`: move local work to the team's servers. Runs are copied from the project's own store (or
`--from-tracking-uri`) to a tracking server with MLflow's client API, and a sweep's Optuna study from the
project's own storage (or `--from-storage`) to the team's database.

A run arrives with its params, every metric's full history (values, steps, timestamps), its tags, its
artifacts (checkpoints, plots, config), its logged models, its start and end time and its status; a child
run under its copied parent. The copy gets a new run id (the old one is its tag `pushed.from_run_id`), and
a logged model a new model id. A study arrives with its trials (numbers, params, values, states, times,
intermediate values, attributes), its MLflow run ids rewritten to the copies', so the same `alexnet sweep
FILE` resumes it on the team's servers. Not kept: run and model ids, artifacts' file times, deleted runs,
and runs still RUNNING (pushed once they end).

Pushing again copies only what is not there yet: a run already pushed is found by its tag and reused, a
trial already pushed by its number in the source study (its `pushed.from_trial` there), its start time and
its params. So a sweep resumed locally after a push sends its new runs and trials on the next push, and a
push stopped half-way (the run it was copying is deleted) is completed by the next one.
"""

from __future__ import annotations

import copy
import sys
import tempfile

import mlflow
import optuna
from mlflow.entities import LoggedModelStatus, Metric, Param, RunTag

from alexnet import UsageError
from alexnet.tracking import store
from alexnet.sweep import ledger
from alexnet.sweep.study import rdb_storage
from alexnet.team.backends import check_database
from alexnet.home import default_tracking_uri, mlruns_dir, where
from alexnet.redact import first_line, redact

PUSHED = "pushed.from_run_id"
FROM_TRIAL = "pushed.from_trial"  # on a pushed trial: its number in the study it came from


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def selected_runs(src: mlflow.MlflowClient, experiment: str | None, study: str | None) -> list:
    """The runs to push, parents before their children: a study's runs (parent, trials, confirmations)
    wherever they are, an experiment's runs, or (neither named) every run."""
    if study:
        exps = [e.experiment_id for e in src.search_experiments()]
        runs = src.search_runs(exps, ledger.study_filter(study), max_results=50000) if exps else []
        runs = [r for r in runs if r.data.tags.get("sweep.study") == study]  # the filter may match by LIKE
        if not runs:
            raise UsageError(f"push: no runs of study {study!r} in {redact(where(src.tracking_uri))}")
    else:
        if experiment:
            exp = src.get_experiment_by_name(experiment)
            if exp is None:
                known = ", ".join(e.name for e in src.search_experiments()) or "none"
                raise UsageError(f"push: no experiment {experiment!r} in {redact(where(src.tracking_uri))} (known: {known})")
            exps = [exp.experiment_id]
        else:
            exps = [e.experiment_id for e in src.search_experiments()]
        runs = src.search_runs(exps, max_results=50000) if exps else []
    return sorted(runs, key=lambda r: ("mlflow.parentRunId" in r.data.tags, r.info.start_time))


def copy_model(src_uri: str, dst: mlflow.MlflowClient, model, experiment_id: str, run_id: str) -> None:
    """A logged model (its files, params, tags) under the copied run."""
    new = dst.create_logged_model(experiment_id, name=model.name, source_run_id=run_id, params=model.params,
                                  tags=model.tags, model_type=model.model_type)
    with tempfile.TemporaryDirectory(prefix="alexnet-push-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=tmp,
                                                    tracking_uri=src_uri)
        dst.log_model_artifacts(new.model_id, local)
    dst.finalize_logged_model(new.model_id, LoggedModelStatus.READY)


def copy_run(src: mlflow.MlflowClient, dst: mlflow.MlflowClient, run, experiment_id: str, parent: str | None) -> str:
    """One run, whole; returns the copy's id. A copy stopped half-way is deleted."""
    tags = {k: v for k, v in run.data.tags.items() if k not in ("mlflow.parentRunId", "mlflow.runName")}
    if parent:
        tags["mlflow.parentRunId"] = parent
    new = dst.create_run(experiment_id, start_time=run.info.start_time, run_name=run.info.run_name).info.run_id
    try:
        for part in chunks([RunTag(k, v) for k, v in tags.items()], 100):
            dst.log_batch(new, tags=part)
        for part in chunks([Param(k, v) for k, v in run.data.params.items()], 100):
            dst.log_batch(new, params=part)
        if run.inputs and run.inputs.dataset_inputs:  # the splits it trained on: the UI's Dataset column
            dst.log_inputs(new, datasets=list(run.inputs.dataset_inputs))
        history = [Metric(m.key, m.value, m.timestamp, m.step) for key in run.data.metrics
                   for m in src.get_metric_history(run.info.run_id, key)]
        for part in chunks(history, 1000):
            dst.log_batch(new, metrics=part)
        with tempfile.TemporaryDirectory(prefix="alexnet-push-") as tmp:
            if src.list_artifacts(run.info.run_id):
                dst.log_artifacts(new, src.download_artifacts(run.info.run_id, "", tmp))
        for model in src.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'"):
            copy_model(src.tracking_uri, dst, model, experiment_id, new)
        dst.set_terminated(new, run.info.status, end_time=run.info.end_time)
        dst.set_tag(new, PUSHED, run.info.run_id)  # last: a run with this tag is whole
    except BaseException:
        dst.delete_run(new)
        raise
    return new


def push_runs(src: mlflow.MlflowClient, dst: mlflow.MlflowClient, runs: list, say) -> tuple[dict[str, str], int]:
    """Copy `runs` (parents first); returns old run id -> new run id, also for runs pushed before, and how
    many it copied now."""
    ids, experiments, copied = {}, {}, 0
    for run in runs:
        old = run.info.run_id
        if run.info.status == "RUNNING":
            say(f"push: run {old} ({run.info.run_name}) is still RUNNING: not pushed (push again once it ends)")
            continue
        name = src.get_experiment(run.info.experiment_id).name
        if name not in experiments:
            exp = dst.get_experiment_by_name(name)
            experiments[name] = exp.experiment_id if exp else dst.create_experiment(name)
        there = dst.search_runs([experiments[name]], ledger.tag_clause(PUSHED, old))
        if there:
            ids[old] = there[0].info.run_id
            continue
        parent = run.data.tags.get("mlflow.parentRunId")
        ids[old] = copy_run(src, dst, run, experiments[name], ids.get(parent) if parent else None)
        copied += 1
        say(f"push: run {old} ({run.info.run_name}, {run.info.status}) -> {ids[old]}")
    return ids, copied


def trial_key(trial) -> tuple:
    """What identifies a trial across pushes: the source's trial number (on a pushed copy, its
    `pushed.from_trial`), its start time and its params. A copy keeps all three, so a copy made by an
    earlier version of push, which left no `pushed.from_trial`, is recognised too; a trial the team's
    own workers ran has another start time."""
    number = int(trial.user_attrs.get(FROM_TRIAL, trial.number))
    return number, trial.datetime_start, tuple(sorted((k, repr(v)) for k, v in trial.params.items()))


def push_study(name: str, from_storage: str, to_storage: str, ids: dict[str, str], say) -> int:
    """Copy the study's trials that the team's study does not hold yet (all of them the first time), with
    its and its trials' MLflow run ids rewritten to the copies'; returns how many were copied. The study
    is created on the first push; a push stopped after that is completed by the next one, and a study
    resumed locally after a push sends its new trials on the next one."""
    src_storage, dst_storage = rdb_storage(from_storage), rdb_storage(to_storage)
    if name not in {s.study_name for s in src_storage.get_all_studies()}:
        raise UsageError(f"push: no study {name!r} in {redact(from_storage)} (give --from-storage where it is)")
    source = optuna.load_study(study_name=name, storage=src_storage)
    trials = source.get_trials(deepcopy=False)
    if any(t.state.name == "RUNNING" for t in trials):
        raise UsageError(f"push: study {name!r} has RUNNING trials (a sweep is running, or its worker died): let it "
                         f"finish, or run the same `alexnet sweep FILE` to resume it, then push")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not Optuna's "A new study created in RDB" line
    try:
        target = optuna.create_study(study_name=name, storage=dst_storage, directions=source.directions,
                                     load_if_exists=True)
    finally:
        optuna.logging.set_verbosity(verbosity)
    if target.directions != source.directions:
        raise UsageError(f"push: study {name!r} in {redact(to_storage)} has other directions "
                         f"({', '.join(d.name for d in target.directions)}): not the same study")
    # The study's own attributes first, each push again (setting one twice changes nothing).
    src_id, dst_id = src_storage.get_study_id_from_name(name), dst_storage.get_study_id_from_name(name)
    for key, value in src_storage.get_study_system_attrs(src_id).items():
        dst_storage.set_study_system_attr(dst_id, key, value)
    for key, value in source.user_attrs.items():
        if key == "mlflow_parent_run_id":
            value = ids.get(value, value)
        elif key == ledger.SETTINGS:  # the team's copy lives in the team's storage: gc there opens that one
            value = {**value, "storage": redact(to_storage)}
        target.set_user_attr(key, value)
    there = {trial_key(t) for t in target.get_trials(deepcopy=False)}
    new = 0
    for trial in trials:
        if trial_key(trial) in there:
            continue
        trial = copy.deepcopy(trial)
        if trial.user_attrs.get("mlflow_run_id") in ids:
            trial.set_user_attr("mlflow_run_id", ids[trial.user_attrs["mlflow_run_id"]])
        trial.set_user_attr(FROM_TRIAL, trial.number)
        target.add_trial(trial)
        new += 1
    say(f"push: study {name!r}: {new} new trial{'s' * (new != 1)} ({len(trials) - new} already there) "
        f"-> {redact(to_storage)}")
    return new


def push(to_tracking_uri: str, to_storage: str | None, experiment: str | None, study: str | None,
         from_tracking_uri: str | None, from_storage: str | None) -> int:
    say = lambda line: print(line, file=sys.stderr)  # noqa: E731
    source_uri = from_tracking_uri or default_tracking_uri()
    if where(source_uri) == where(to_tracking_uri):
        raise UsageError("push: --to-tracking-uri is the store the runs come from")
    from_storage = from_storage or f"sqlite:///{mlruns_dir() / 'optuna.db'}"
    store.quiet_mlflow()
    store.set_up_store(to_tracking_uri)  # one line if the server does not answer
    if study and to_storage:
        check_database(to_storage, "push: --to-storage")
    src, dst = mlflow.MlflowClient(tracking_uri=source_uri), mlflow.MlflowClient(tracking_uri=to_tracking_uri)
    runs = selected_runs(src, experiment, study)
    say(f"push: {len(runs)} runs from {redact(where(source_uri))} to {redact(to_tracking_uri)}")
    new_trials = None
    try:
        ids, copied = push_runs(src, dst, runs, say)
        if study and to_storage:
            new_trials = push_study(study, from_storage, to_storage, ids, say)
        elif study:
            say("push: the Optuna study stays where it is (give --to-storage to copy it)")
    except KeyboardInterrupt:
        say("push: interrupted; the run being copied was removed; push again to copy the rest")
        return 130
    except (OSError, mlflow.exceptions.MlflowException, optuna.exceptions.StorageInternalError) as e:
        raise UsageError(f"push: {first_line(e)}") from None
    trials = "" if new_trials is None else f", {new_trials} new trial{'s' * (new_trials != 1)}"
    say(f"push: done: copied {copied} new run{'s' * (copied != 1)} ({len(ids) - copied} already there){trials} "
        f"to {redact(to_tracking_uri)}")
    return 0
