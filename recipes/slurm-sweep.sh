#!/usr/bin/env bash
# A sweep on a SLURM cluster: one worker per array task, each on one GPU, all joining one study and one
# parent run on the team's servers (see "Scaling out" in README.md). From the project's checkout, on a
# login node, with the two variables `alexnet server` printed:
#   export MLFLOW_TRACKING_URI=http://mlflow.lab:5000
#   export ALEXNET_STORAGE=postgresql+psycopg://alexnet@db.lab:5432/alexnet_optuna
#   sbatch --array=0-7 recipes/slurm-sweep.sh sweeps/default.toml
# The database password goes in ~/.pgpass (a line `db.lab:5432:alexnet_optuna:alexnet:PASSWORD`, mode 600),
# never in this script. A task whose node fails is requeued (--requeue); the study's heartbeat retries its
# trial elsewhere, so the count stays exact. Tasks that start once the count is reached exit at once.
#SBATCH --job-name=alexnet-sweep
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --output=alexnet-sweep-%A_%a.out
set -euo pipefail
sweep_file=${1:?usage: sbatch --array=0-N recipes/slurm-sweep.sh SWEEP_FILE}
: "${MLFLOW_TRACKING_URI:?export the MLFLOW_TRACKING_URI that alexnet server printed, then sbatch}"
: "${ALEXNET_STORAGE:?export the ALEXNET_STORAGE that alexnet server printed, then sbatch}"
cd "${SLURM_SUBMIT_DIR:-.}"
# Runs, checkpoints and models go to the tracking server; the node's own disk holds only scratch.
export ALEXNET_HOME="${TMPDIR:-/tmp}/alexnet-${SLURM_JOB_ID:-$$}"
mkdir -p "$ALEXNET_HOME"
exec .venv/bin/alexnet sweep "$sweep_file" --workers 1
