#!/usr/bin/env bash
# A sweep across machines over ssh: WORKERS workers on each HOST, all joining one study and one parent run
# on the team's servers (see "Scaling out" in README.md). Each host has the project checked out and set up
# (scripts/setup, then .venv/bin/pip install -e '.[team]') in ~/$ALEXNET_CHECKOUT (default alexnet-sweeps),
# and the database password in ~/.pgpass (a line `db.lab:5432:alexnet_optuna:alexnet:PASSWORD`, mode 600),
# never here. With the two variables `alexnet server` printed:
#   export MLFLOW_TRACKING_URI=http://mlflow.lab:5000
#   export ALEXNET_STORAGE=postgresql+psycopg://alexnet@db.lab:5432/alexnet_optuna
#   recipes/ssh-sweep.sh sweeps/default.toml 4 gpu1 gpu2 gpu3
# Each host's workers log to ~/$ALEXNET_CHECKOUT/sweep-HOST.log and go on after ssh returns. Run it again
# (or the same `alexnet sweep` command on any host) to add workers; the study's count stays exact.
set -euo pipefail
usage="usage: recipes/ssh-sweep.sh SWEEP_FILE WORKERS_PER_HOST HOST [HOST ...]"
sweep_file=${1:?$usage}
workers=${2:?$usage}
shift 2
if (( $# == 0 )); then echo "$usage" >&2; exit 2; fi
: "${MLFLOW_TRACKING_URI:?export the MLFLOW_TRACKING_URI that alexnet server printed}"
: "${ALEXNET_STORAGE:?export the ALEXNET_STORAGE that alexnet server printed}"
checkout=${ALEXNET_CHECKOUT:-alexnet-sweeps}
for host in "$@"; do
  ssh "$host" "cd $(printf %q "$checkout") && MLFLOW_TRACKING_URI=$(printf %q "$MLFLOW_TRACKING_URI") \
ALEXNET_STORAGE=$(printf %q "$ALEXNET_STORAGE") nohup .venv/bin/alexnet sweep $(printf %q "$sweep_file") \
--workers $(printf %q "$workers") > $(printf %q "sweep-$host.log") 2>&1 &"
  echo "ssh-sweep: $workers workers started on $host (log: ~/$checkout/sweep-$host.log)"
done
