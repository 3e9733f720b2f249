"""Disk in a sweep: only the trials the study keeps (`ledger.kept_trials`: the top `keep_top`, and in a
cost-aware sweep the Pareto front too: a cheaper model may be the one to ship) keep their checkpoints and
models; the others' are deleted once they can no longer be needed (never a running trial's). Params,
metrics and plots stay. `alexnet gc` applies the very same rule (`ledger.releasable`) to sweeps stopped
before theirs ran. Callers hold the study lock, so two processes never delete the same run's artifacts."""

from __future__ import annotations

from alexnet.tracking import disk
from alexnet.sweep.ledger import releasable, trial_runs
from alexnet.sweep.spec import Sweep


def retain(study, sweep: Sweep) -> int:
    """Delete the checkpoints and models of finished trials the study does not keep (pruned, failed,
    infeasible, retried or pushed out); never a running trial's. Returns the bytes freed."""
    # The ranking and the states come from one snapshot: a trial that completes in between must not
    # look finished yet missing from the top (another worker's trial can end at any moment).
    trials = study.get_trials(deepcopy=False)
    runs = trial_runs(sweep.study, experiment=sweep.config["experiment"])
    return sum(disk.delete_checkpoints(r.info.run_id) for r in releasable(runs, trials, sweep))  # tags checkpoints=deleted


def disk_usage(sweep: Sweep) -> int:
    """Bytes the study's trial runs hold (artifacts and logged models): the `disk_bytes` tag each run keeps
    current (its checkpoint writer, its end, and retention update it), so no file is listed."""
    runs = trial_runs(sweep.study, experiment=sweep.config["experiment"])
    return sum(int(r.data.tags.get("disk_bytes") or 0) for r in runs)
