"""No test metric steers a sweep: the same sweep run twice, once with the trainer's test metrics made
adversarial (`1 - value` in every process, tests/adversarial/sitecustomize.py), must take the same
decisions: the same trial values and intermediate values (what the sampler and the pruner read), the
same states (pruned or not), the same trials kept by retention, the same best trial, and `confirm` the
same ranking, winner and verdict. Only the test figures themselves differ, and that shows the
perturbation took hold.

Budget: 3 trials of resize 67, 256 training / 200 validation / 200 test images, 2 epochs each, then
confirm of the top 1 over 2 seeds, in each of the two stores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna

from conftest import ROOT

SWEEP = """
study = "honest"
n_trials = 3
pruner = "median"
pruner_startup_trials = 1
pruner_warmup_epochs = 0
keep_top = 1
heartbeat_seconds = 1
grace_seconds = 4

[space]
lr = { low = 0.01, high = 0.3, log = true }
dropout = { low = 0.0, high = 0.8 }

[set]
resize = 67
train_limit = 256
val_size = 200
test_limit = 200
batch_size = 64
epochs = 2
"""


def run_store(home: Path, adversarial: bool) -> dict:
    """Sweep, then confirm, in the project home `home`; what each decided, read back from both stores."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["ALEXNET_HOME"] = str(home)
    if adversarial:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "adversarial"), str(ROOT)])
        env["ALEXNET_ADVERSARIAL_TEST_METRICS"] = "1"
    home.mkdir()
    path = home / "honest.toml"
    path.write_text(SWEEP)
    for args in (["sweep", path, "--quiet"], ["confirm", "honest", "--top", "1", "--seeds", "2", "--quiet"]):
        done = subprocess.run([sys.executable, "-m", "alexnet", *map(str, args)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="honest", storage=f"sqlite:///{home / 'mlruns' / 'optuna.db'}")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlruns' / 'mlflow.db'}")
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    trial_runs = {t.number: client.get_run(t.user_attrs["mlflow_run_id"]) for t in study.trials}
    confirmed = json.loads(Path(client.download_artifacts(parent.info.run_id, "confirm.json", str(home))).read_text())
    return {
        "trials": [(t.number, t.state.name, t.params, t.value, t.intermediate_values) for t in study.trials],
        "kept": sorted(n for n, r in trial_runs.items() if r.data.tags.get("checkpoints") != "deleted"),
        "best": {k: v for k, v in parent.data.tags.items() if k.startswith("best.") and k != "best.run_id"},
        "confirm": {k: confirmed[k] for k in ("objective", "winner", "verdict", "p_value")},
        "confirm_rows": [(c["label"], c["values"], c["mean"]) for c in confirmed["configs"]],
        "test": {n: r.data.metrics.get("test/acc") for n, r in trial_runs.items()},
        "confirm_test": [c["test_values"] for c in confirmed["configs"]],
    }


def test_adversarial_test_metrics_change_no_decision_of_a_sweep_or_confirm(tmp_path):
    honest = run_store(tmp_path / "honest", adversarial=False)
    flipped = run_store(tmp_path / "flipped", adversarial=True)
    # The perturbation took hold: every test figure the trials and confirm logged is 1 - the honest one.
    assert honest["test"] and all(abs(flipped["test"][n] - (1 - v)) < 1e-9 for n, v in honest["test"].items())
    assert all(abs(f - (1 - h)) < 1e-9 for hs, fs in zip(honest["confirm_test"], flipped["confirm_test"])
               for h, f in zip(hs, fs))
    # ... and changed no decision.
    assert flipped["trials"] == honest["trials"]
    assert flipped["kept"] == honest["kept"] and len(honest["kept"]) == 1
    assert flipped["best"] == honest["best"]
    assert flipped["confirm"] == honest["confirm"] and honest["confirm"]["objective"] == "val/best_acc"
    assert flipped["confirm_rows"] == honest["confirm_rows"]
