"""Disk in a sweep: only the top `keep_top` trials keep their checkpoints and models (in a cost-aware
sweep, the trials on the Pareto front too: a cheaper model may be the one to ship); the others' are
deleted once they can no longer be needed (never a running trial's). Params, metrics and plots stay.
The ranking is of the trials this study trained: trials seeded from an earlier study have no files here.
Callers hold the study lock, so two processes never delete the same run's artifacts."""

from __future__ import annotations

from alexnet.tracking import disk
from alexnet.sweep.parent import trial_runs
from alexnet.sweep.spec import Sweep
from alexnet.sweep.study import FINISHED_STATES, pareto_front, ranked, seeded


def retain(study, sweep: Sweep) -> int:
    """Delete the checkpoints and models of finished trials outside the top `keep_top` and the Pareto
    front (pruned, failed, infeasible, retried or pushed out); never a running trial's. Returns the bytes
    freed."""
    # The ranking and the states come from one snapshot: a trial that completes in between must not
    # look finished yet missing from the top (another worker's trial can end at any moment).
    trials = [t for t in study.get_trials(deepcopy=False) if not seeded(t)]
    keep = {t.number for t in ranked(study, sweep.direction, trials)[:sweep.keep_top]}
    if sweep.cost:
        keep |= {t.number for t in pareto_front(trials, [sweep.direction, "minimize"])}
    states = {t.number: t.state.name for t in trials}
    freed = 0
    for run in trial_runs(sweep.study, experiment=sweep.config["experiment"]):
        tags = run.data.tags
        number = int(tags.get("sweep.trial", -1))
        if number in keep or states.get(number) not in FINISHED_STATES or run.info.status == "RUNNING" \
                or tags.get("checkpoints") == "deleted":
            continue
        freed += disk.delete_checkpoints(run.info.run_id)  # tags the run checkpoints=deleted
    return freed


def disk_usage(sweep: Sweep) -> int:
    """Bytes the study's trial runs hold (artifacts and logged models): the `disk_bytes` tag each run keeps
    current (its checkpoint writer, its end, and retention update it), so no file is listed."""
    runs = trial_runs(sweep.study, experiment=sweep.config["experiment"])
    return sum(int(r.data.tags.get("disk_bytes") or 0) for r in runs)
