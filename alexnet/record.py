"""What a tracked run records besides its metrics and checkpoints: where it came from and what it ran
on (tags), and at the end its best epoch as an MLflow PyTorch model."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow
import torch
import torchvision
from mlflow.models import infer_signature
from mlflow.utils import requirements_utils

from alexnet import data
from alexnet.checkpoint import check_room, local_artifact_dir, tensor_bytes
from alexnet.config import Config
from alexnet.model import alexnet
from alexnet.redact import redact
from alexnet.train import resolve_device, resolve_precision

CHECKOUT = Path(__file__).resolve().parents[1]


def run_tags(cfg: Config, source: str | None) -> dict[str, str]:
    """Where the run came from (experiment file, command line, git commit and dirty flag) and what it
    ran on (device, GPU, precision, versions)."""
    device = resolve_device(cfg)
    tags = {
        "experiment_file": source or "",
        "command": redact(" ".join(sys.argv)),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "precision": resolve_precision(cfg, device),
        "version.python": platform.python_version(),
        "version.torch": torch.__version__,
        "version.torchvision": torchvision.__version__,
        "version.mlflow": mlflow.__version__,
    }
    try:
        tags["version.optuna"] = importlib.metadata.version("optuna")  # without importing it (0.3 s)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=CHECKOUT,
                               capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            tags["git.commit"] = commit.stdout.strip()
            tags["git.dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return tags


def log_model(run, cfg: Config, model_state: dict) -> str:
    """Log `model_state` as the run's MLflow PyTorch model (`torch.export` format), with two real
    test images as its input example and the signature they give. Returns the model's URI."""
    # MLflow writes the model to a temporary folder, then copies it into the store.
    nbytes = tensor_bytes(model_state)
    for folder in filter(None, [tempfile.gettempdir(), local_artifact_dir(run.info.artifact_uri)]):
        check_room(folder, nbytes, "the model")
    model = alexnet(cfg.dropout, cfg.resize)
    model.load_state_dict(model_state)
    model.eval()
    example = data.resize_batch(data.load(cfg.data_dir, train=False).data[:2], cfg.resize)  # batch 2: export keeps the batch dim free
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    # The logged model is made here, in the run's experiment: MLflow's own would go to its "active"
    # experiment, which this project never sets (it uses the client API only).
    logged = mlflow.MlflowClient().create_logged_model(
        run.info.experiment_id, name="model", source_run_id=run.info.run_id,
        params={k: redact(str(v)) for k, v in asdict(cfg).items()})
    # Explicit requirements: MLflow's inference of them loads the model in a subprocess (~18 s here).
    # No serving-input check: it reloads the 187 MB model to predict the example again (~0.8 s a run),
    # and on a GPU machine it loads onto CUDA, where MLflow refuses a model exported on the CPU.
    info = mlflow.pytorch.log_model(model, name="model", input_example=example.numpy(), signature=signature,
                                    serialization_format="pt2", validate_serving_input=False,
                                    run_id=run.info.run_id, model_id=logged.model_id,
                                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return info.model_uri


def warm_up_model_logging() -> None:
    """Pay `log_model`'s one-time costs early, in the checkpoint writer's thread while training goes on:
    MLflow checks the model's requirements against a map of every installed package (3.3 s in a fresh
    process on 2 cores, with torch's CUDA wheels installed). Only a speed-up: anything that fails here
    is left for `log_model` itself to meet."""
    try:
        requirements_utils._init_modules_to_packages_map()  # cached by MLflow for the process
    except Exception:
        pass


warm_up_model_logging.what = "warming up model logging"
