"""`alexnet reproduce RUN_ID`: train a run again from its record alone, and compare.

What the record gives (`alexnet/tracking/record.py`): the resolved config (`config.toml`), the git commit, the
patch of an uncommitted work tree (`code.patch`), the data's checksums, the device, the switches and the
versions. The run is re-created with the same code:
- this checkout is at the run's commit with the same uncommitted changes (none, usually): here, in
  this process;
- it is at the run's commit but its work tree differs (the run's patch, or the user's own changes): in a
  temporary `git worktree` at the commit with the run's patch applied, by `python -m alexnet train`
  there; the user's work tree is never touched;
- it is at another commit: refused (check the run's commit out), unless `--force`, which trains the
  run's config with this checkout's code as it is.
Data whose checksums differ from the record's is refused, and so is a record that lacks something
needed (one line naming it). The new run is tagged `reproduces=RUN_ID`; then a per-epoch table shows
both runs' metrics and their differences (timings aside). On the CPU, with the same device and
versions, every number must be identical; on a GPU only with `deterministic = true` (cuDNN picks its
algorithms anew in every process when autotuning; see the README for how far apart runs then land).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from alexnet import UsageError, home
from alexnet.tracking import checkout, record, store, lifecycle
from alexnet.training import data, datafiles
from alexnet.training.config import Config, to_toml
from alexnet.home import project_root, tracking_uri, where
from alexnet.redact import redact
from alexnet.training.train import check_device, resolve_device

TAG = "reproduces"
SKIPPED = ("perf/", "system/")  # timings and the machine's load: never the same twice


def read_record(run_id: str) -> tuple:
    """(run, config, code patch) from the run's record, or a UsageError naming what it lacks."""
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UsageError(f"no run {run_id!r} in {redact(where(tracking_uri()))} (list runs with `alexnet runs`)") from None
    tags = run.data.tags

    def lacks(what: str, why: str = "") -> UsageError:
        return UsageError(f"run {run_id}'s record lacks {what}{why}: it cannot be re-created from it")

    try:
        table = tomllib.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.toml"))
    except Exception:
        raise lacks("its resolved config (config.toml)") from None
    try:
        cfg = Config(**table)
    except (TypeError, UsageError) as e:
        raise lacks("a config this code can read", f" ({e})") from None
    if not tags.get("git.commit"):
        raise lacks("its git commit (tag git.commit)", ": it was not trained from a git checkout")
    missing = [name for name in datafiles.FILES if f"{record.MD5_TAG}{name}" not in tags]
    if missing:
        raise lacks(f"the data's checksums (tag {record.MD5_TAG}{missing[0]})")
    if tags.get("git.left_out"):
        raise lacks(f"untracked files that were too big to record ({tags['git.left_out']})")
    if tags.get("git.patch_masked") == "true":
        raise lacks("its exact uncommitted changes", " (code.patch held text that looked like a secret and was masked)")
    patch = b""
    if tags.get("git.dirty") == "true":
        try:
            with tempfile.TemporaryDirectory(prefix="alexnet-patch-") as tmp:
                patch = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=record.PATCH,
                                                                 dst_path=tmp)).read_bytes()
        except Exception:
            raise lacks(f"its uncommitted changes ({record.PATCH})") from None
        if checkout.Code(tags["git.commit"], patch).patch_sha256 != tags.get("git.patch_sha256"):
            raise lacks(f"an intact {record.PATCH}", " (its sha256 differs from the one recorded)")
    return run, cfg, patch


def check_data(run, cfg: Config) -> None:
    """The data here must be the data the run saw: the same checksums, file by file."""
    here = datafiles.checksums(data.prepare(cfg.data_dir))
    for name, md5 in here.items():
        recorded = run.data.tags[f"{record.MD5_TAG}{name}"]
        if md5 != recorded:
            raise UsageError(f"the data differs from run {run.info.run_id}'s: {name} has MD5 {md5} here, {recorded} "
                             f"in the record; point data_dir / ALEXNET_DATA_DIR at the data it was trained on")


def differences(run, cfg: Config) -> list[str]:
    """What differs between the run's machine and this one, each in words (empty: nothing)."""
    tags, here = run.data.tags, record.run_tags(cfg, None)
    keys = ["device", "gpu"] + sorted(k for k in tags if k.startswith("version."))
    return [f"{k} {tags.get(k) or '-'} then, {here.get(k) or '-'} now" for k in keys if tags.get(k, "") != here.get(k, "")]


def train_here(cfg: Config, tags: dict, quiet: bool) -> str:
    return lifecycle.tracked_train(cfg, tags=tags, progress=not quiet).run_id


def last_line(stderr: bytes) -> str:
    """git's reason, in one line (its last: 'patch does not apply', 'invalid reference: ...')."""
    lines = stderr.decode(errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else "no message"


def train_in_worktree(commit: str, patch: bytes, cfg: Config, tags: dict, quiet: bool) -> str:
    """Train `cfg` with the code of `commit` plus `patch`, in a temporary git worktree (removed
    afterwards), logging to this store. Returns the new run's id."""
    with tempfile.TemporaryDirectory(prefix="alexnet-reproduce-") as tmp:
        tree, config = Path(tmp) / "tree", Path(tmp) / "config.toml"
        added = checkout.git("worktree", "add", "--detach", "--quiet", str(tree), commit, check=False)
        if added.returncode != 0:
            raise UsageError(f"cannot check out commit {commit} in a temporary worktree "
                             f"({last_line(added.stderr)}): is it in this repository? (git fetch)")
        try:
            if patch:
                (Path(tmp) / record.PATCH).write_bytes(patch)
                applied = checkout.git("apply", "--binary", "--whitespace=nowarn", str(Path(tmp) / record.PATCH),
                                       cwd=tree, check=False)
                if applied.returncode != 0:
                    raise UsageError(f"the run's {record.PATCH} does not apply to commit {commit}: "
                                     f"{last_line(applied.stderr)}")
            config.write_text(to_toml(cfg))
            # The worktree is a project of its own (it has a pyproject.toml): point it at this one's stores.
            env = {**os.environ, "ALEXNET_HOME": str(project_root()), "MLFLOW_TRACKING_URI": tracking_uri(),
                   "PYTHONPATH": str(tree)}
            command = [sys.executable, "-m", "alexnet", "train", str(config), *(["--quiet"] if quiet else []),
                       *[f"--tag={k}={v}" for k, v in tags.items()]]
            started = int(time.time() * 1000)
            child = subprocess.Popen(command, cwd=tree, env=env)
            try:
                status = child.wait()
            except KeyboardInterrupt:  # the terminal's Ctrl-C reached the child too: it ends its run KILLED
                child.wait(timeout=120)
                raise
            if status != 0:
                raise UsageError(f"training in the temporary worktree failed (exit status {status})")
        finally:
            checkout.git("worktree", "remove", "--force", str(tree), check=False)
    exp = mlflow.MlflowClient().get_experiment_by_name(cfg.experiment)
    found = mlflow.search_runs([exp.experiment_id], f"tags.`{TAG}` = '{tags[TAG]}' and attributes.start_time >= {started}",
                               order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    if not found:
        raise UsageError(f"the training in the temporary worktree left no run tagged {TAG}={tags[TAG]}")
    return found[0].info.run_id


def compare(original: str, new: str) -> tuple[list[tuple], float]:
    """Rows (epoch, metric, original, reproduction, difference) for every metric the original logged
    per epoch (timings aside), and the largest absolute difference (inf where one lacks a value)."""
    client = mlflow.MlflowClient()
    keys = sorted(k for k in client.get_run(original).data.metrics if not k.startswith(SKIPPED))
    rows, worst = [], 0.0
    for key in keys:
        a = {m.step: m.value for m in client.get_metric_history(original, key)}
        b = {m.step: m.value for m in client.get_metric_history(new, key)}
        for epoch in sorted(set(a) | set(b)):
            diff = b[epoch] - a[epoch] if epoch in a and epoch in b else float("inf")
            rows.append((epoch, key, a.get(epoch), b.get(epoch), diff))
            worst = max(worst, abs(diff))
    return sorted(rows), worst


def format_rows(rows: list[tuple]) -> str:
    def num(v):
        return "-" if v is None else f"{v:.6f}"

    width = max([len("metric")] + [len(r[1]) for r in rows])
    lines = [f"epoch  {'metric':<{width}}  {'original':>10}  {'reproduction':>12}  {'difference':>10}"]
    for epoch, key, a, b, diff in rows:
        lines.append(f"{epoch:>5}  {key:<{width}}  {num(a):>10}  {num(b):>12}  {diff:>10.3g}")
    return "\n".join(lines)


def differing(rows: list[tuple]) -> str:
    """The epochs and metrics that differ, epoch by epoch ("" when none does)."""
    by_epoch = {}
    for epoch, key, _, _, diff in rows:
        if diff != 0:
            by_epoch.setdefault(epoch, []).append(key)
    return "; ".join(f"epoch {epoch}: {', '.join(keys)}" for epoch, keys in sorted(by_epoch.items()))


def reproduce(run_id: str, force: bool = False, quiet: bool = False) -> int:
    """`alexnet reproduce RUN_ID [--force]`: 0 when the new run matches as it should, 1 when it differs
    where it should be identical (same code, device and versions, on the CPU or deterministic)."""
    store.set_up_store()
    run, cfg, patch = read_record(run_id)
    home.announce(cfg.experiment)
    check_device(cfg)  # a device this machine lacks: one line now, not a failed training
    check_data(run, cfg)
    commit, here = run.data.tags["git.commit"], checkout.current()
    say = (lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    same_code = here.commit == commit
    if not same_code and not force:
        at = f"at commit {here.commit}" if here.commit else "not a git checkout"
        raise UsageError(f"this checkout is {at}; run {run_id} was trained at commit {commit}: check that commit "
                         f"out (git checkout {commit}) and run this again, or --force to train it with this code")
    machine = differences(run, cfg)
    name = f"{run.info.run_name}-reproduce"
    cfg = dataclasses.replace(cfg, run_name=name)
    tags = {TAG: run_id, "experiment_file": run.data.tags.get("experiment_file", "")}
    code = f"commit {commit[:12]}" + (f" + its {record.PATCH}" if patch else "")
    if not same_code:
        say(f"reproducing run {run_id} with this checkout's code ({here.commit or 'no commit'}), not its own ({code}): --force")
        tags["reproduce.forced"] = "true"
        new = train_here(cfg, tags, quiet)
    elif here.patch == patch and not here.left_out:
        say(f"reproducing run {run_id} ({code}) here: this checkout holds the same code")
        new = train_here(cfg, tags, quiet)
    else:
        say(f"reproducing run {run_id} ({code}) in a temporary git worktree; this work tree is left as it is")
        new = train_in_worktree(commit, patch, cfg, tags, quiet)

    rows, worst = compare(run_id, new)
    print(f"run {new} reproduces run {run_id} (tag {TAG}={run_id})")
    if not rows:
        print(f"run {run_id} logged no epoch (it stopped before its first ended): nothing to compare")
        return 0
    print(format_rows(rows))
    if worst != 0:
        print(f"differs at {differing(rows)}")
    line, status = verdict(rows, worst, resolve_device(cfg).type, cfg.deterministic, same_code, machine)
    print(line)
    return status


# A GPU run without `deterministic = true` repeats only within its stated tolerance: cuDNN's autotuning
# picks convolution algorithms per process, and they round differently. On an H200 one fast-pipeline
# baseline ended 0.012 test accuracy from another of the same seed (README, "On a GPU").
GPU_ACC_TOLERANCE = 0.02


def verdict(rows: list[tuple], worst: float, device: str, deterministic: bool, same_code: bool,
            machine: list[str]) -> tuple[str, int]:
    """What the comparison means, and the command's status: 0 reproduced (identical, within the GPU's
    tolerance, or allowed to differ: other code, device or versions), 1 not reproduced."""
    if worst == 0:
        return "identical: every metric of every epoch equals the original's (timings aside)", 0
    if not same_code or machine:
        why = "; ".join(machine) or "the code differs (--force)"
        return f"differs by up to {worst:.3g}, as it may: {why}", 0
    if device == "cpu" or deterministic:
        return f"NOT reproduced: the largest difference is {worst:.3g}, with the same code, device and versions", 1
    accuracy = max((abs(r[4]) for r in rows if r[1].split("/")[-1].startswith(("acc", "best_acc"))), default=0.0)
    within = accuracy <= GPU_ACC_TOLERANCE
    return (f"{'within' if within else 'NOT reproduced: beyond'} the stated tolerance on {device} without "
            f"deterministic = true (cuDNN's autotuning picks algorithms per process): accuracies differ by up to "
            f"{accuracy:.3g}, the tolerance is {GPU_ACC_TOLERANCE:g} (losses and other metrics by up to {worst:.3g})",
            0 if within else 1)
