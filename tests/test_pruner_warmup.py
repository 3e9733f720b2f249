"""`pruner_warmup_epochs = W`: under every pruner a trial is never pruned before epoch W + 1 (the
W warm-up epochs are not judged), and is prunable from then on. Optuna drives the sweep's own pruner
factory; epochs are reported as steps 1..E, as the objective reports them."""

import optuna
import pytest

from alexnet.sweep.spec import Sweep
from alexnet.sweep.study import make_pruner

optuna.logging.set_verbosity(optuna.logging.WARNING)
EPOCHS = 9


def earliest_prune(pruner_name: str, warmup: int) -> list[int]:
    """Run 12 good trials to the end, then 30 bad ones; return the epoch at which each bad trial was
    pruned (the objective never prunes at the last epoch)."""
    sweep = Sweep(pruner=pruner_name, pruner_warmup_epochs=warmup, pruner_startup_trials=1,
                  config={"epochs": EPOCHS})
    study = optuna.create_study(study_name=f"warmup-{pruner_name}-{warmup}", direction="maximize",
                                pruner=make_pruner(sweep), sampler=optuna.samplers.RandomSampler(seed=0))
    pruned = []
    for number in range(42):
        trial = study.ask()
        good = number < 12
        for epoch in range(1, EPOCHS + 1):
            trial.report((0.9 if good else 0.1) + epoch / 100, epoch)
            if epoch < EPOCHS and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                pruned.append(epoch)
                break
        else:
            study.tell(trial, 0.9 if good else 0.1)
    return pruned


@pytest.mark.parametrize("pruner_name", ["median", "hyperband"])
@pytest.mark.parametrize("warmup", [0, 1, 2])
def test_no_trial_is_pruned_during_its_warmup(pruner_name, warmup):
    pruned = earliest_prune(pruner_name, warmup)
    assert pruned, "the bad trials must be pruned at all"
    assert min(pruned) == warmup + 1  # never earlier, and the first epoch after the warm-up is judged


def test_hyperband_warmup_past_the_last_epoch_prunes_nothing():
    assert earliest_prune("hyperband", EPOCHS) == []
