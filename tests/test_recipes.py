"""The scaling-out recipes that cannot run here (no SLURM, no Kubernetes) are checked as far as this
machine can: the SLURM script's shell syntax and its refusal to run without a sweep file and the team's
exports, the Kubernetes manifest as a Job with what a Job needs, and in both the `alexnet sweep` command
line against the real parser and a shipped sweep file. The Ray recipe runs for real in test_scale_out.py."""

import os
import re
import subprocess

import yaml

from alexnet.cli import build_parser
from alexnet.sweep.spec import load_sweep
from conftest import ROOT

SLURM = ROOT / "recipes" / "slurm-sweep.sh"
JOB = ROOT / "recipes" / "k8s-sweep-job.yaml"


def test_the_slurm_script_is_valid_bash_and_asks_for_what_it_needs():
    for script in (SLURM, ROOT / "scripts" / "throwaway-postgres"):
        checked = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
    text = SLURM.read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert sbatch["gres"] == "gpu:1" and "requeue" in sbatch and "array" not in sbatch  # the array: on sbatch's line
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ALEXNET_STORAGE")}
    no_file = subprocess.run(["bash", SLURM], capture_output=True, text=True, env=env, cwd=ROOT)
    assert no_file.returncode != 0 and "usage: sbatch --array" in no_file.stderr
    no_server = subprocess.run(["bash", SLURM, "sweeps/default.toml"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert no_server.returncode != 0 and "MLFLOW_TRACKING_URI" in no_server.stderr
    [line] = re.findall(r"^exec \.venv/bin/alexnet (.*)$", text, re.M)
    args = build_parser().parse_args(line.replace('"$sweep_file"', "sweeps/default.toml").split())
    assert args.command == "sweep" and args.workers == 1
    usage = re.findall(r"^#   sbatch --array=\S+ recipes/slurm-sweep.sh (\S+)$", text, re.M)[0]
    assert load_sweep(ROOT / usage).n_trials > 0


def test_the_kubernetes_manifest_is_a_job_with_a_worker_per_gpu_and_the_password_from_a_secret():
    job = yaml.safe_load(JOB.read_text())
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["parallelism"] == spec["completions"] >= 1 and spec["backoffLimit"] >= 1
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    (container,) = pod["containers"]
    assert container["name"] and container["image"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    command = container["command"]
    args = build_parser().parse_args(command[1:])
    assert command[0] == "alexnet" and args.command == "sweep" and args.workers == 1
    assert load_sweep(ROOT / args.file).n_trials > 0
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://")
    assert env["ALEXNET_STORAGE"]["value"].startswith("postgresql+psycopg://")
    assert "value" not in env["PGPASSWORD"] and env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert mounts <= {v["name"] for v in pod["volumes"]}
