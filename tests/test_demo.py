"""What the demo's sweep (sweeps/demo.toml, run by `scripts/demo`) promises, held cheaply: it loads, every
trial takes enough plain-SGD steps to leave the plateau at chance, a trial can be pruned, and the whole
sweep stays within its few minutes of training on 2 CPU cores. (The sweep itself is run by `scripts/demo`;
its transcript and timing are in the manual.)"""

import math

from alexnet.sweep.spec import load_sweep
from alexnet.training.config import MIN_RESIZE, load_config

from conftest import ROOT

DEMO = ROOT / "sweeps" / "demo.toml"
PLATEAU_STEPS = 350  # plain SGD at batch 16 sat near chance for the first ~200 steps on these images
CPU_EXAMPLES_PER_S = 190  # AlexNet at resize 67, batch 16, fp32, on 2 CPU cores (measured 165-200)


def test_the_demo_sweep_loads_and_learns_within_its_budget(home):
    sweep = load_sweep(DEMO)
    cfg = sweep.config
    assert sweep.study == "demo" and sweep.objective == "val/best_acc" and cfg["val_size"] > 0
    assert cfg["resize"] == MIN_RESIZE and "resize" not in sweep.space  # the cheapest images, for every trial
    steps = math.ceil(cfg["train_limit"] / cfg["batch_size"]) * cfg["epochs"]
    assert steps >= PLATEAU_STEPS, "trials would end near chance (0.1) instead of learning"
    # Pruning can happen: a pruner, some trials to judge against, and an epoch to stop after.
    assert sweep.pruner == "median" and 0 < sweep.pruner_startup_trials < sweep.n_trials
    assert sweep.pruner_warmup_epochs < cfg["epochs"]
    # The whole sweep's training, were no trial pruned, fits about 3 minutes on 2 CPU cores.
    seconds = sweep.n_trials * cfg["train_limit"] * cfg["epochs"] / CPU_EXAMPLES_PER_S
    assert seconds < 200, f"{seconds:.0f} s of training: the demo would overrun its 4 minutes"


def test_the_demo_space_is_sane(home):
    sweep = load_sweep(DEMO)
    lr = sweep.space["lr"]
    assert lr["log"] and lr["low"] < sweep.config["lr"] < lr["high"]  # the baseline sits inside the space
    assert lr["high"] <= 0.3  # above it plain SGD at batch 16 diverges or stays at chance
    assert lr["high"] / lr["low"] >= 10  # wide enough that trials differ: a visible spread, a trial to prune
    assert set(sweep.space) == {"lr", "dropout"}
    # Trial 0 is the smoke experiment's own values: what the demo's first step trained.
    smoke = load_config(ROOT / "experiments" / "smoke.toml")
    assert (sweep.config["lr"], sweep.config["dropout"]) == (smoke.lr, smoke.dropout) and sweep.enqueue_base
