"""`alexnet promote STUDY`: a sweep's confirmed winner into MLflow's model registry, as the `champion`.

What `alexnet confirm STUDY` decided (the parent run's `confirm.json`: the winner, mean and std per
configuration over fresh seeds, the one-sided Welch p-value Holm-corrected over the top configurations,
the verdict, the final test figure) is the only ground: a winner that confirm did not find better than
the baseline after that correction is refused unless `--force`.
The model registered is the one the winner's sweep trial logged (the trial's own run, trained on the
sweep's seed; a winner seeded from an earlier study: that study's run). If it is gone but the run's best
checkpoint is not, the model is logged again from that checkpoint; if retention deleted both, the refusal
says so. One registered model per experiment, named after it (`alexnet-fashion-mnist`); each promotion is
a version, tagged with the study, the trial, the confirmation's statistics and the data's digests, and the
alias `champion` moves to it (aliases, not the deprecated stages):

    mlflow.pytorch.load_model("models:/alexnet-fashion-mnist@champion")

Promoting the same winner again reuses its version (its tags refreshed). The store must hold a model
registry: the local SQLite store and a tracking server on a database do.
"""

from __future__ import annotations

import math
import re
import sys
import tomllib

import mlflow
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

from alexnet import UsageError, compat, home
from alexnet.tracking import disk, record, run_files, store
from alexnet.sweep import ledger
from alexnet.training.config import Config
from alexnet.home import tracking_uri, where
from alexnet.tracking.record import MD5_TAG
from alexnet.redact import first_line, redact
from alexnet.sweep.spec import format_params

ALIAS = "champion"
CONFIRM = "confirm.json"


def read_confirmation(parent, study: str) -> dict:
    """The parent run's `confirm.json`, or a UsageError saying to run confirm first."""
    try:
        return mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/{CONFIRM}")
    except Exception:
        raise UsageError(f"promote: sweep {study!r} has no confirmation ({CONFIRM} on its parent run): run "
                         f"`alexnet confirm {study}` first; only a winner confirmed over fresh seeds is promoted") from None


def check_winner(confirmed: dict, study: str, force: bool) -> dict:
    """The winner's configuration from the confirmation; refused if confirm did not find it better than
    the baseline, unless `force`."""
    winner = next((c for c in confirmed.get("configs", []) if c["label"] == confirmed.get("winner")), None)
    if winner is None:
        raise UsageError(f"promote: confirm found no winner for sweep {study!r} ({confirmed.get('verdict')}): "
                         f"nothing to promote")
    beats = confirmed.get("beats_baseline", confirmed.get("verdict", "").startswith("yes:"))
    if not beats and not force:
        raise UsageError(f"promote: confirm did not find the winner, {winner['label']}, better than the baseline "
                         f"({confirmed.get('verdict')}); --force promotes it all the same")
    return winner


def winner_run(confirmed: dict, winner: dict, study: str):
    """The MLflow run of the winner's sweep trial."""
    run_id = winner.get("run_id") or confirmed.get("winner_run_id")
    trial = winner.get("trial", confirmed.get("winner_trial"))
    if not run_id:  # a confirmation written before it recorded run ids: the study's trial run
        found = [r for r in ledger.trial_runs(study, status="FINISHED") if r.data.tags.get("sweep.trial") == str(trial)]
        run_id = found[0].info.run_id if found else None
    try:
        return mlflow.MlflowClient().get_run(run_id) if run_id else None
    except MlflowException:
        return None


def logged_model(run, keep_top: int, quiet: bool):
    """The run's logged model: the one it has, or one logged again from its best checkpoint; a
    UsageError saying why there is none."""
    models = [m for m in disk.logged_models(run) if m.status == LoggedModelStatus.READY]
    if models:
        return models[0]
    what = f"run {run.info.run_id} ({run.info.run_name})"
    if run.data.tags.get("checkpoints") == "deleted":
        raise UsageError(f"promote: {what} has no model or checkpoint left: the sweep's retention deleted them (it "
                         f"keeps the top {keep_top} trials'); train that config again, or sweep with a larger keep_top")
    state = run_files.fetch_best(run.info.run_id)
    if state is None:
        raise UsageError(f"promote: {what} has no model and no checkpoint to log one from")
    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.toml")
    if not quiet:
        print(f"promote: {what} has no model; logging it from its best checkpoint (epoch {state['epoch']})",
              file=sys.stderr)
    record.log_model(run, Config(**tomllib.loads(text)), state["model"])
    disk.measure(run.info.run_id)
    return next(m for m in disk.logged_models(run) if m.status == LoggedModelStatus.READY)


def slug(label: str) -> str:
    """A configuration's label as a tag key: "baseline = trial 0" -> "baseline_trial_0"."""
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")


def mean_std(c: dict, prefix: str = "") -> str:
    """A confirmed configuration's mean +/- std over its seeds (`prefix` "test_": its test figure)."""
    n = sum(v is not None and math.isfinite(v) for v in c[f"{prefix}values"])
    return f"{c[f'{prefix}mean']:.4f} +/- {c[f'{prefix}std']:.4f} (n={n})"


def version_tags(study: str, parent, run, confirmed: dict, winner: dict, forced: bool) -> dict[str, str]:
    """What a registered version says of where it came from: the study and trial, the confirmation's
    statistics per configuration, the final test figure, the data's checksums and digests."""
    p = confirmed.get("p_value")
    tags = {"sweep.study": study, "sweep.trial": str(winner.get("trial")), "sweep.run_id": run.info.run_id,
            "sweep.parent_run_id": parent.info.run_id, "sweep.params": format_params(winner["params"]),
            "confirm.winner": winner["label"], "confirm.verdict": confirmed.get("verdict", "")[:5000],
            "confirm.objective": f"{confirmed.get('direction')} {confirmed.get('objective')}",
            "confirm.test": confirmed.get("test", ""), "confirm.p_value": "nan" if p is None else f"{p:.4g}",
            "confirm.seeds": ",".join(map(str, confirmed.get("seeds", []))),
            "confirm.beats_baseline": str(confirmed.get("beats_baseline", False)).lower(),
            "promoted.forced": str(forced).lower(),
            f"test.{confirmed.get('final_test_metric', 'acc')}": mean_std(winner, "test_")}
    for c in confirmed.get("configs", []):
        tags[f"confirm.mean_std.{slug(c['label'])}"] = mean_std(c)
    tags.update({k: v for k, v in run.data.tags.items() if k.startswith(MD5_TAG)})
    for i in run.inputs.dataset_inputs:
        context = next((t.value for t in i.tags if t.key == compat.DATASET_CONTEXT), i.dataset.name)
        tags[f"data.digest.{context}"] = i.dataset.digest
    return {k: redact(v) for k, v in tags.items()}


def register(name: str, model, run, tags: dict[str, str], description: str):
    """A version of registered model `name` for the logged `model` (the one already made for it, if any),
    tagged; the registered model is created on its first promotion."""
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description=f"AlexNet on Fashion-MNIST (d2l 7.1): the winners of the "
                                                         f"experiment's sweeps, confirmed over fresh seeds "
                                                         f"(`alexnet promote`). The alias `{ALIAS}` is the one to ship.")
    source = f"models:/{model.model_id}"  # the logged model; the registry keeps its files' location too
    same = [v for v in client.search_model_versions(f"name = '{name}'") if v.source == source]
    version = same[0] if same else client.create_model_version(
        name, source=source, run_id=run.info.run_id, model_id=model.model_id, tags=tags, description=description)
    for k, v in tags.items():
        client.set_model_version_tag(name, version.version, k, v)
    return version, bool(same)


def promote(study: str, force: bool = False, quiet: bool = False) -> int:
    """`alexnet promote STUDY`: everything is checked before anything is written."""
    store.set_up_store()
    parent = ledger.parent_run(study, "promote")
    name = mlflow.MlflowClient().get_experiment(parent.info.experiment_id).name
    home.announce(name)
    confirmed = read_confirmation(parent, study)
    winner = check_winner(confirmed, study, force)
    try:  # a store without a model registry is refused before a model is logged again for it
        mlflow.MlflowClient().search_registered_models(max_results=1)
    except MlflowException as e:
        raise UsageError(f"promote: the store {redact(where(tracking_uri()))} has no model registry that answers "
                         f"({first_line(e)}): use the local SQLite store or a tracking server on a database") from None
    run = winner_run(confirmed, winner, study)
    if run is None or run.info.status != "FINISHED":
        raise UsageError(f"promote: the winner, {winner['label']} of sweep {study!r}, has no FINISHED run "
                         f"({winner.get('run_id') or 'none recorded'}): nothing to register")
    model = logged_model(run, ledger.parent_settings(parent).keep_top, quiet)
    tags = version_tags(study, parent, run, confirmed, winner, force and not confirmed.get("beats_baseline"))
    description = (f"Sweep '{study}', {winner['label']} ({format_params(winner['params'])}): "
                   f"{confirmed.get('objective')} {mean_std(winner)} over fresh seeds. Confirm: {confirmed.get('verdict')}")
    client = mlflow.MlflowClient()
    before = next((v.version for v in client.search_model_versions(f"name = '{name}'") if ALIAS in (v.aliases or [])), None)
    version, reused = register(name, model, run, tags, description)
    client.set_registered_model_alias(name, ALIAS, version.version)
    print(f"promoted {winner['label']} of sweep {study!r} (run {run.info.run_id}): registered model {name!r} "
          f"version {version.version}{' (already registered)' if reused else ''}, alias {ALIAS!r}"
          + (f" (was version {before})" if before and before != version.version else ""))
    print(f"load it: mlflow.pytorch.load_model(\"models:/{name}@{ALIAS}\")")
    return 0
