"""The scaling-out recipes that cannot run here (no SLURM, no Kubernetes, no other hosts) are checked as
far as this machine can: the SLURM and ssh scripts' shell syntax and their refusal to run without a sweep
file and the team's exports, the Kubernetes manifest as a Job with what a Job needs, the ssh script's
remote command as a shell on the host would run it, and in each the `alexnet sweep` command line against
the real parser and a shipped sweep file. The Ray recipe runs for real in test_scale_out.py."""

import os
import re
import subprocess

import yaml

from alexnet.cli import build_parser
from alexnet.sweep.spec import load_sweep
from conftest import ROOT

SLURM = ROOT / "recipes" / "slurm-sweep.sh"
JOB = ROOT / "recipes" / "k8s-sweep-job.yaml"
SSH = ROOT / "recipes" / "ssh-sweep.sh"


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


def test_the_ssh_script_starts_the_same_sweep_on_every_host_with_the_teams_stores(tmp_path):
    """With a stand-in `ssh` that records its host and runs nothing: one command per host, which a shell
    on that host parses into `cd CHECKOUT`, the two exports and `alexnet sweep FILE --workers N` in the
    background; without a file, hosts or the exports it stops with a usage line."""
    checked = subprocess.run(["bash", "-n", SSH], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "ssh").write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> "$SSH_LOG"\n')
    (bin_ / "ssh").chmod(0o755)
    team = {"MLFLOW_TRACKING_URI": "http://mlflow.lab:5000",
            "ALEXNET_STORAGE": "postgresql+psycopg://alexnet@db.lab:5432/alexnet_optuna"}
    env = {**{k: v for k, v in os.environ.items() if k not in team}, "PATH": f"{bin_}:{os.environ['PATH']}",
           "SSH_LOG": str(tmp_path / "ssh.log")}

    for args, extra, said in ((["sweeps/default.toml", "4"], team, "usage: recipes/ssh-sweep.sh"),
                              (["sweeps/default.toml", "4", "gpu1"], {}, "MLFLOW_TRACKING_URI")):
        refused = subprocess.run(["bash", SSH, *args], capture_output=True, text=True, env={**env, **extra}, cwd=ROOT)
        assert refused.returncode != 0 and said in refused.stderr, refused.stderr
    assert not (tmp_path / "ssh.log").exists()

    ran = subprocess.run(["bash", SSH, "sweeps/default.toml", "4", "gpu1", "gpu2"], capture_output=True, text=True,
                         env={**env, **team}, cwd=ROOT)
    assert ran.returncode == 0, ran.stderr
    calls = (tmp_path / "ssh.log").read_text().split("\0")[:-1]
    assert calls[0::2] == ["gpu1", "gpu2"]
    for host, remote in zip(calls[0::2], calls[1::2]):
        # The host's shell runs it: a stand-in for `alexnet` prints the exports it got, then its arguments.
        assert remote.startswith("cd alexnet-sweeps && ") and remote.endswith(" &")
        (tmp_path / "alexnet-sweeps" / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
        fake = tmp_path / "alexnet-sweeps" / ".venv" / "bin" / "alexnet"
        fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$MLFLOW_TRACKING_URI" "$ALEXNET_STORAGE" "$@"\n')
        fake.chmod(0o755)
        ran = subprocess.run(["bash", "-c", remote.removesuffix(" &").replace("nohup ", "")], capture_output=True,
                             text=True, cwd=tmp_path, env={k: v for k, v in env.items() if k not in team})
        assert ran.returncode == 0, ran.stderr
        uri, storage, *words = (tmp_path / "alexnet-sweeps" / f"sweep-{host}.log").read_text().splitlines()
        assert (uri, storage) == (team["MLFLOW_TRACKING_URI"], team["ALEXNET_STORAGE"])
        args = build_parser().parse_args(words)
        assert args.command == "sweep" and args.workers == 4 and load_sweep(ROOT / args.file).n_trials > 0
