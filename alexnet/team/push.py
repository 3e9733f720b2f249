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
study already there is left as it is. A push stopped half-way deletes the run it was copying.
"""

from __future__ import annotations

import copy
import sys
import tempfile

import mlflow
import optuna
from mlflow.entities import LoggedModelStatus, Metric, Param, RunTag
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from alexnet import UsageError
from alexnet.tracking import store
from alexnet.sweep.study import rdb_storage
from alexnet.team.backends import check_database
from alexnet.home import default_tracking_uri, mlruns_dir, where
from alexnet.redact import first_line, redact

PUSHED = "pushed.from_run_id"


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def selected_runs(src: mlflow.MlflowClient, experiment: str | None, study: str | None) -> list:
    """The runs to push, parents before their children: a study's runs (parent, trials, confirmations)
    wherever they are, an experiment's runs, or (neither named) every run."""
    if study:
        exps = [e.experiment_id for e in src.search_experiments()]
        runs = src.search_runs(exps, f"tags.`sweep.study` = '{study}'", max_results=50000) if exps else []
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
        get_artifact_repository(new.artifact_location, tracking_uri=dst.tracking_uri).log_artifacts(local)
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


def push_runs(src: mlflow.MlflowClient, dst: mlflow.MlflowClient, runs: list, say) -> dict[str, str]:
    """Copy `runs` (parents first); returns old run id -> new run id, also for runs pushed before."""
    ids, experiments = {}, {}
    for run in runs:
        old = run.info.run_id
        if run.info.status == "RUNNING":
            say(f"push: run {old} ({run.info.run_name}) is still RUNNING: not pushed (push again once it ends)")
            continue
        name = src.get_experiment(run.info.experiment_id).name
        if name not in experiments:
            exp = dst.get_experiment_by_name(name)
            experiments[name] = exp.experiment_id if exp else dst.create_experiment(name)
        there = dst.search_runs([experiments[name]], f"tags.`{PUSHED}` = '{old}'")
        if there:
            ids[old] = there[0].info.run_id
            continue
        parent = run.data.tags.get("mlflow.parentRunId")
        ids[old] = copy_run(src, dst, run, experiments[name], ids.get(parent) if parent else None)
        say(f"push: run {old} ({run.info.run_name}, {run.info.status}) -> {ids[old]}")
    return ids


def push_study(name: str, from_storage: str, to_storage: str, ids: dict[str, str], say) -> None:
    """`optuna.copy_study`, with the study's and its trials' MLflow run ids rewritten to the copies'."""
    source = optuna.load_study(study_name=name, storage=rdb_storage(from_storage))
    to_url, to_storage = to_storage, rdb_storage(to_storage)
    if name in optuna.study.get_all_study_names(to_storage):
        say(f"push: study {name!r} is already in {redact(to_url)}: left as it is")
        return
    trials = source.get_trials(deepcopy=False)
    if any(t.state.name == "RUNNING" for t in trials):
        raise UsageError(f"push: study {name!r} has RUNNING trials (a sweep is running, or its worker died): let it "
                         f"finish, or run the same `alexnet sweep FILE` to resume it, then push")
    target = optuna.create_study(study_name=name, storage=to_storage, directions=source.directions)
    for key, value in source._storage.get_study_system_attrs(source._study_id).items():
        target._storage.set_study_system_attr(target._study_id, key, value)
    for key, value in source.user_attrs.items():
        target.set_user_attr(key, ids.get(value, value) if key == "mlflow_parent_run_id" else value)
    for trial in trials:
        trial = copy.deepcopy(trial)
        if trial.user_attrs.get("mlflow_run_id") in ids:
            trial.set_user_attr("mlflow_run_id", ids[trial.user_attrs["mlflow_run_id"]])
        target._storage.create_new_trial(target._study_id, template_trial=trial)
    say(f"push: study {name!r}: {len(trials)} trials -> {redact(to_url)}")


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
    try:
        ids = push_runs(src, dst, runs, say)
        if study and to_storage:
            push_study(study, from_storage, to_storage, ids, say)
        elif study:
            say("push: the Optuna study stays where it is (give --to-storage to copy it)")
    except KeyboardInterrupt:
        say("push: interrupted; the run being copied was removed; push again to copy the rest")
        return 130
    except (OSError, mlflow.exceptions.MlflowException) as e:
        raise UsageError(f"push: {first_line(e)}") from None
    say(f"push: done: {len(ids)} runs on {redact(to_tracking_uri)}")
    return 0
