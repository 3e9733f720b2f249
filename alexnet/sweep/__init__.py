"""Optuna sweeps: every trial trains with the same `tracked_train` a single run uses, as a child MLflow run.

The protocol between the launcher, the workers, Optuna and MLflow:
  1. The launcher (`launcher.py`, `alexnet sweep FILE`) checks the sweep file (`spec.py`), the device,
     the data and both stores, then, under the study lock, creates or reopens the Optuna study and the
     MLflow parent run (its id kept in the study's user attributes) and queues the base trial.
  2. Each worker (`worker.py`, a process of its own) loops: under the study lock (`study.py`) it fails
     stale trials (no heartbeat: their worker died; a WAITING copy is queued), counts, and starts one
     trial or stops. The trial (`objective.py`) suggests its params, releases the lock, trains as a
     child run, reports every epoch to the pruner. Its run's status mirrors the trial's state:
     COMPLETE -> FINISHED, PRUNED -> KILLED (tag `sweep.state=PRUNED`), FAIL -> FAILED.
     With `pack = K` (`packs.py`) a worker starts up to K trials in one round and trains those that share
     a network and data as one trial pack (`alexnet/training/pack.py`); each stays its own trial and run.
  3. After each trial, under the lock, retention (`retention.py`) deletes the checkpoints of the trials
     the study does not keep.
  4. The launcher watches the study, then keeps the top K, writes the summary and the plots on the
     parent run (`report.py`) and ends the parent: FINISHED when the study has its count, KILLED when
     stopped short (running the same command again resumes both).
`ledger.py` answers what a study is, for every command: its runs (parent, trials, confirm runs), its
settings (written once per launch, read back typed) and the trials it keeps (the sweep's retention and
`alexnet gc` alike). `dry_run.py` runs the machinery tiny in a temporary store; `confirm.py` re-trains
the top trials and the baseline with fresh seeds.
"""
