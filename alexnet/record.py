"""What a tracked run records besides its metrics and checkpoints: where it came from and what it ran
on (tags), and at the end its best epoch as an MLflow PyTorch model."""

from __future__ import annotations

import importlib.metadata
import logging
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
from alexnet.model import RawImages, alexnet
from alexnet.redact import redact
from alexnet.train import resolve_device, resolve_precision

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent


class _PickleNotice(logging.Filter):
    """MLflow warns, on every model it saves with pickle, that loading one runs code: this project pickles
    its own model on purpose (see `log_model`), and the README says so once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Saving pytorch model by Pickle")


logging.getLogger("mlflow.pytorch").addFilter(_PickleNotice())


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


def describe(cfg: Config, source: str | None) -> str:
    """The run's description in MLflow's UI (the `mlflow.note.content` tag): what it trains, in a line."""
    train_images = f"{cfg.train_limit:,}" if cfg.train_limit else "all 60,000"
    test_images = f"{cfg.test_limit:,}" if cfg.test_limit else "all 10,000"
    origin = f" From `{source}`." if source and source != "/dev/null" else ""
    return (f"AlexNet on Fashion-MNIST: {cfg.epochs} epochs at resize {cfg.resize}, lr {cfg.lr:g}, batch "
            f"{cfg.batch_size}, dropout {cfg.dropout:g}, seed {cfg.seed}; {train_images} training and "
            f"{test_images} test images ({cfg.pipeline} pipeline).{origin}")


def outcome(error: BaseException | None, records: list) -> str:
    """How the run ended, in a line for its description (`records`: this call's epochs)."""
    last = records[-1] if records else None
    reached = f" after epoch {last.epoch}" if last else " before its first epoch ended"
    if error is None:
        if last is None:
            return "**Finished**: every epoch was already trained."
        return (f"**Finished**: test accuracy {last.test_acc:.4f} at its last epoch, best {last.best_test_acc:.4f} "
                f"at epoch {last.best_epoch}.")
    if getattr(error, "note", ""):  # a callback's own words (the sweep's pruner)
        return error.note
    if isinstance(error, KeyboardInterrupt):
        return f"**Stopped** (interrupted){reached}; it resumes from its last checkpoint."
    return f"**Failed**{reached}: {redact(str(error)).splitlines()[0][:500] if str(error) else type(error).__name__}."


def log_model(run, cfg: Config, model_state: dict) -> str:
    """Log `model_state` as the run's MLflow PyTorch model, taking raw images (`alexnet.model.RawImages`:
    uint8 or [0, 1] float, B x 28 x 28 or B x 1 x 28 x 28; the run's resize inside). Its input example is
    four real test images as the files hold them (uint8 4 x 28 x 28), its signature what they give.
    Returns the model's URI."""
    # MLflow writes the model to a temporary folder, then copies it into the store.
    nbytes = tensor_bytes(model_state)
    for folder in filter(None, [tempfile.gettempdir(), local_artifact_dir(run.info.artifact_uri)]):
        check_room(folder, nbytes, "the model")
    net = alexnet(cfg.dropout, cfg.resize)
    net.load_state_dict(model_state)
    model = RawImages(net, cfg.resize).eval()
    example = data.load(cfg.data_dir, train=False).data[:4]
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    # The logged model is made here, in the run's experiment: MLflow's own would go to its "active"
    # experiment, which this project never sets (it uses the client API only).
    logged = mlflow.MlflowClient().create_logged_model(
        run.info.experiment_id, name="model", source_run_id=run.info.run_id,
        params={k: redact(str(v)) for k, v in asdict(cfg).items()})
    # Pickled, not `torch.export`ed: `mlflow.pytorch.load_model` then gives the eager module, which takes
    # any batch size, uint8 or float, with or without the channel dimension (an exported graph is fixed to
    # one input's dtype and rank). The `alexnet` package travels with the model (`code_paths`), so it
    # loads where `alexnet` is not installed. MLflow's pyfunc checks inputs against the signature
    # strictly: through it the model takes uint8 B x 28 x 28, the files' own format.
    # Explicit requirements: MLflow's inference of them loads the model in a subprocess (~18 s here).
    # MLflow then reloads the saved model and predicts the example through pyfunc, as a server would.
    info = mlflow.pytorch.log_model(model, name="model", input_example=example.numpy(), signature=signature,
                                    serialization_format="pickle", code_paths=[str(PACKAGE)],
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
