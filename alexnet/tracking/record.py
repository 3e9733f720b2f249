"""What a tracked run records besides its metrics and checkpoints: enough to re-create it, and at the
end its best epoch as an MLflow PyTorch model.

Before the run exists, `describe` gathers its record: tags for where it came from (experiment file,
command line, git commit and whether the work tree differed from it) and what it ran on (device, GPU,
precision, the speed and determinism switches as applied, versions), the data's checksums; the patch
of an uncommitted work tree (`alexnet/tracking/checkout.py`); every installed package's version. Inside the
run, `log_record` stores the patch as `code.patch`, the versions as `requirements.lock.txt`, and the
data as MLflow dataset inputs: Fashion-MNIST's training, validation and test splits, each with a digest
from the files' checksums and the images it selects (`alexnet reproduce` reads all of it back).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import platform
import re
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
import torchvision
from mlflow.data.schema import TensorDatasetSchema
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.types import Schema, TensorSpec

from alexnet import compat
from alexnet.tracking import checkout
from alexnet.training import data, datafiles
from alexnet.tracking.checkpoint import check_room, tensor_bytes
from alexnet.training.config import TEST_IMAGES, TRAIN_IMAGES, Config
from alexnet.training.model import RawImages, alexnet
from alexnet.redact import redact
from alexnet.tracking.store import local_artifact_dir
from alexnet.training.train import resolve_device, resolve_precision, speed_switches

PACKAGE = Path(__file__).resolve().parents[1]
CHECKOUT = PACKAGE.parent


class _PickleNotice(logging.Filter):
    """MLflow warns, on every model it saves with pickle, that loading one runs code: this project pickles
    its own model on purpose (see `log_model`), and the README says so once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Saving pytorch model by Pickle")


logging.getLogger("mlflow.pytorch").addFilter(_PickleNotice())

PATCH = "code.patch"
REQUIREMENTS = "requirements.lock.txt"
DATASET = "fashion-mnist"
MD5_TAG = "data.md5."  # + file name


@dataclass(frozen=True)
class Record:
    tags: dict[str, str]
    patch: bytes           # empty for a clean work tree
    requirements: str
    datasets: list


def describe(cfg: Config, source: str | None) -> Record:
    """Everything the run records about its origin, gathered before the run exists."""
    code = checkout.current()
    root = data.prepare(cfg.data_dir)
    md5 = datafiles.checksums(root)
    tags = {**run_tags(cfg, source), **{f"{MD5_TAG}{name}": value for name, value in md5.items()},
            "data.source": datafiles.origin(cfg.data_dir)}
    patch = b""
    if code.commit:
        tags.update({"git.commit": code.commit, "git.dirty": str(code.dirty).lower()})
        if code.patch:
            # A patch is stored as it is, or masked like everything else the project stores: then the
            # run cannot be re-created from it, and its record says so.
            patch = redact(code.patch.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
            tags["git.patch_sha256"] = code.patch_sha256
            if patch != code.patch:
                tags["git.patch_masked"] = "true"
        if code.left_out:
            tags["git.left_out"] = redact(", ".join(code.left_out))[:5000]
    return Record(tags, patch, requirements_lock(), dataset_inputs(cfg, md5, tags["data.source"]))


def run_tags(cfg: Config, source: str | None) -> dict[str, str]:
    """Where the run came from (experiment file, command line) and what it ran on (device, GPU,
    precision, the switches as applied, versions)."""
    device = resolve_device(cfg)
    cuda = device.type == "cuda"
    tags = {
        "experiment_file": source or "",
        "command": redact(" ".join(sys.argv)),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else "",
        "precision": resolve_precision(cfg, device),
        "speed_switches": json.dumps(speed_switches(cfg, device), sort_keys=True),
        "version.python": platform.python_version(),
        "version.torch": torch.__version__,
        "version.torchvision": torchvision.__version__,
        "version.mlflow": mlflow.__version__,
    }
    if cuda:
        tags.update({"version.cuda": str(torch.version.cuda), "version.cudnn": str(torch.backends.cudnn.version())})
    try:
        tags["version.optuna"] = importlib.metadata.version("optuna")  # without importing it (0.3 s)
    except importlib.metadata.PackageNotFoundError:
        pass
    return tags


@functools.cache  # a process's installed packages do not change under it (45 ms to list; a sweep worker runs many trials)
def requirements_lock() -> str:
    """Every installed distribution as `name==version`, sorted, after the interpreter and platform:
    a lock file `pip install -r` takes (the first of two copies on the path wins, as at import)."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            pins.setdefault(re.sub(r"[-_.]+", "-", name).lower(), f"{name}=={dist.version}")
    header = (f"# python {platform.python_version()} ({platform.python_implementation()}) on {platform.platform()}\n"
              f"# {len(pins)} distributions installed in {sys.prefix}\n")
    return header + "".join(f"{pins[k]}\n" for k in sorted(pins))


def split_sizes(cfg: Config) -> dict[str, int]:
    """How many images each split of `cfg` holds (what `data.split_indices` selects), without loading them."""
    return {"train": cfg.train_limit or TRAIN_IMAGES - cfg.val_size, "validation": cfg.val_size,
            "test": cfg.test_limit or TEST_IMAGES}


# What the UI shows as the dataset's schema: torchvision's uint8 images and int64 labels.
SCHEMA = json.dumps(TensorDatasetSchema(features=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28), "image")]),
                                        targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "label")])).to_dict())
SELECTED_BY = {"train": ("val_size", "split_seed", "train_limit"), "validation": ("val_size", "split_seed"),
               "test": ("test_limit",)}


def dataset_inputs(cfg: Config, md5: dict[str, str], origin: str) -> list[DatasetInput]:
    """Fashion-MNIST as MLflow dataset inputs, one per split the run uses, its context the split. MLflow
    keeps one input per (name, digest) and run, so each split is a dataset of its own: its digest hashes
    the files' checksums and the selection (sizes, split seed), so runs that saw the same images share it."""
    inputs = []
    for split, n in split_sizes(cfg).items():
        if n == 0:
            continue
        files = {name: md5[name] for name in datafiles.FILES if name.startswith("t10k" if split == "test" else "train")}
        profile = {"num_rows": n, "split": split, **{k: getattr(cfg, k) for k in SELECTED_BY[split]}, "md5": files}
        digest = hashlib.sha256(json.dumps(profile, sort_keys=True).encode()).hexdigest()[:16]
        kind = "http" if origin.startswith("http") else "local"
        dataset = Dataset(name=DATASET, digest=digest, source_type=kind, schema=SCHEMA,
                          source=json.dumps({"url" if kind == "http" else "uri": origin}), profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, tags=[InputTag(compat.DATASET_CONTEXT, split)]))
    return inputs


def log_record(run_id: str, rec: Record) -> None:
    """Store the record's files and dataset inputs on the run (its tags went with the run's first)."""
    client = mlflow.MlflowClient()
    client.log_text(run_id, rec.requirements, REQUIREMENTS)
    if rec.patch:
        with tempfile.TemporaryDirectory(prefix="alexnet-record-") as tmp:
            path = Path(tmp) / PATCH
            path.write_bytes(rec.patch)
            client.log_artifact(run_id, str(path))
    log_datasets(client, run_id, rec.datasets)


# MLflow's SQL store looks a dataset up and then inserts it, in one transaction: two runs logging the same
# new digest at the same instant (sweep workers starting trials together) both insert, and one is refused
# by the datasets' key (PostgreSQL "duplicate key value violates unique constraint", SQLite "UNIQUE
# constraint failed", MySQL "Duplicate entry"), through a tracking server as BAD_REQUEST.
DUPLICATE = re.compile(r"unique|duplicate", re.IGNORECASE)
DATASET_ATTEMPTS = 3


def log_datasets(client, run_id: str, datasets: list) -> None:
    """Log the dataset inputs; one refused because another run created the same dataset at the same
    instant is logged again, and then finds it (the store skips an input the run already has, so trying
    again is harmless). Any other error is the caller's."""
    for attempt in range(1, DATASET_ATTEMPTS + 1):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except MlflowException as e:
            if attempt == DATASET_ATTEMPTS or not DUPLICATE.search(str(e)):
                raise
            time.sleep(0.05 * attempt)


def description(cfg: Config, source: str | None) -> str:
    """The run's description in MLflow's UI (the `mlflow.note.content` tag): what it trains, in a line."""
    sizes = split_sizes(cfg)
    held_out = f", {sizes['validation']:,} validation" if sizes["validation"] else ""
    origin = f" From `{source}`." if source and source != "/dev/null" else ""
    return (f"AlexNet on Fashion-MNIST: {cfg.epochs} epochs at resize {cfg.resize}, lr {cfg.lr:g}, batch "
            f"{cfg.batch_size}, dropout {cfg.dropout:g}, seed {cfg.seed}; {sizes['train']:,} training{held_out} and "
            f"{sizes['test']:,} test images ({cfg.pipeline} pipeline).{origin}")


def outcome(error: BaseException | None, records: list) -> str:
    """How the run ended, in a line for its description (`records`: this call's epochs)."""
    last = records[-1] if records else None
    reached = f" after epoch {last.epoch}" if last else " before its first epoch ended"
    if error is None:
        if last is None:
            return "**Finished**: every epoch was already trained."
        if last.val_acc is not None:
            return (f"**Finished**: validation chose epoch {last.best_epoch} (val accuracy {last.best_val_acc:.4f}, "
                    f"test accuracy there {last.test_acc_at_best_val:.4f}).")
        return (f"**Finished**: test accuracy {last.test_acc:.4f} at its last epoch, best {last.best_test_acc:.4f} "
                f"at epoch {last.best_epoch}.")
    if getattr(error, "note", ""):  # a callback's own words (the sweep's pruner)
        return error.note
    if isinstance(error, KeyboardInterrupt):
        return f"**Stopped** (interrupted){reached}; it resumes from its last checkpoint."
    return f"**Failed**{reached}: {redact(str(error)).splitlines()[0][:500] if str(error) else type(error).__name__}."


def log_model(run, cfg: Config, model_state: dict) -> str:
    """Log `model_state` as the run's MLflow PyTorch model, taking raw images (`alexnet.training.model.RawImages`:
    uint8 or [0, 1] float, B x 28 x 28 or B x 1 x 28 x 28; the run's resize inside). Its input example is
    four real test images as the files hold them (uint8 4 x 28 x 28), its signature what they give.
    Returns the model's URI."""
    # MLflow writes the model to a temporary folder, then copies it into the store.
    nbytes = tensor_bytes(model_state)
    for folder in filter(None, [tempfile.gettempdir(), local_artifact_dir(run.info.artifact_uri)]):
        check_room(folder, nbytes, "the model")
    warm_up_model_logging()  # done beside training already, or in progress there: then this waits for it
    with torch.device("meta"):  # no random init of weights about to be replaced (0.2-0.4 s on a CPU)
        net = alexnet(cfg.dropout, cfg.resize)
    net.load_state_dict({k: v.cpu() for k, v in model_state.items()}, assign=True)  # the snapshot's own tensors
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


_PACKAGE_MAP = threading.Lock()


def warm_up_model_logging() -> None:
    """Pay `log_model`'s one-time cost early, beside training (the checkpoint writer's thread at a run's
    start, a sweep worker while it waits for its orders): MLflow checks the model's requirements against
    a map of every installed package, 1.4-3.3 s to build in a fresh process with torch's CUDA wheels
    installed, then cached for the process. `log_model` calls it too, and so waits for a warm-up still in
    progress rather than building the map a second time. Only a speed-up: anything that fails here is left
    for `log_model` itself to meet."""
    with _PACKAGE_MAP:
        try:
            compat.warm_up_requirements()
        except Exception:
            pass


warm_up_model_logging.what = "warming up model logging"
