"""One frozen config: its defaults are the chapter's baseline (d2l 7.1: AlexNet, Fashion-MNIST
resized to 224, batch 128, SGD lr 0.01, 10 epochs, dropout 0.5).

Experiments (`experiments/*.toml`) are small files of overrides; `--set key=value` overrides on top.
Every value is checked here, before any work starts: a bad key or value is a `UsageError` naming the
key and what it may be.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from alexnet import UsageError
from alexnet.training.sizes import MIN_RESIZE

TRAIN_IMAGES, TEST_IMAGES = 60000, 10000
MAX_VAL_SIZE = TRAIN_IMAGES // 2  # at least half the training images stay for training


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    # --- The chapter's baseline (d2l 7.1) ---
    batch_size: int = _f(128, "training minibatch size (chapter: 128)")
    lr: float = _f(0.01, "SGD learning rate (chapter: 0.01)")
    epochs: int = _f(10, "passes over the training set (chapter: 10)")
    dropout: float = _f(0.5, "dropout probability after each hidden FC layer (chapter: 0.5)")
    resize: int = _f(224, f"side in pixels the 28x28 images are resized to (chapter: 224; min {MIN_RESIZE})")
    # --- Data and run control ---
    seed: int = _f(0, "seeds init, shuffling and dropout: same seed, same device, same metrics")
    device: str = _f("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    data_dir: str = _f("", "folder with the Fashion-MNIST IDX files; empty: $ALEXNET_DATA_DIR, Debian's package, download")
    train_limit: int = _f(0, "train on a class-balanced subset of this many images; 0: all 60,000")
    test_limit: int = _f(0, "evaluate on a class-balanced subset of this many images; 0: all 10,000")
    val_size: int = _f(0, "hold this many of the 60,000 training images out as a class-balanced validation split, never trained on; the best epoch is then chosen on it; 0: none (the chapter's protocol)")
    split_seed: int = _f(0, "seeds which training images the validation split holds (independent of seed)")
    deterministic: bool = _f(False, "deterministic GPU kernels: no cuDNN autotuning, torch.use_deterministic_algorithms; slower")
    # --- Speed switches (each can be turned off to get the chapter's plain arithmetic) ---
    pipeline: str = _f("fast", "fast: uint8 data resident on the device, resized per batch there; book: the chapter's DataLoader with PIL Resize + ToTensor")
    precision: str = _f("auto", "auto: bf16 autocast on CUDA, fp32 elsewhere; fp32 (the chapter's); bf16")
    channels_last: bool = _f(True, "channels_last memory format on CUDA (fast pipeline)")
    fused_sgd: bool = _f(True, "fused SGD kernel on CUDA (fast pipeline)")
    cudnn_benchmark: bool = _f(True, "let cuDNN autotune its convolution algorithms")
    eval_batch_size: int = _f(1000, "batch size for test evaluation on the fast pipeline (the book pipeline uses batch_size); 1000 divides the 10,000 test images: one shape to autotune or compile")
    compile: bool = _f(False, "torch.compile the model; compile time is reported apart")
    num_workers: int = _f(4, "DataLoader worker processes of the book pipeline (the chapter's d2l.get_dataloader_workers(): 4)")
    # --- Tracking ---
    experiment: str = _f("alexnet-fashion-mnist", "MLflow experiment the run is logged to")
    run_name: str = _f("", "MLflow run name; empty: the experiment file's name, lr, resize and start time (smoke-lr0.1-r67-1129-041233)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and type(value) is int:
                object.__setattr__(self, f.name, float(value))  # TOML `lr = 1` means 1.0
            elif type(value).__name__ != f.type:
                raise UsageError(f"config: {f.name} must be {_TYPE_WORDS[f.type]}, got {value!r}")
        for name, (ok, allowed) in _RANGES.items():
            if not ok(getattr(self, name)):
                raise UsageError(f"config: {name} = {getattr(self, name)!r} is out of range (allowed: {allowed})")
        if self.train_limit > TRAIN_IMAGES - self.val_size:
            raise UsageError(f"config: train_limit = {self.train_limit} is more than the {TRAIN_IMAGES - self.val_size:,} "
                             f"training images left after val_size = {self.val_size} (allowed: train_limit <= "
                             f"{TRAIN_IMAGES} - val_size)")


_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}

_RANGES = {
    "batch_size": (lambda v: v >= 1, "batch_size >= 1"),
    "lr": (lambda v: v > 0 and v == v and v != float("inf"), "lr > 0"),
    "epochs": (lambda v: v >= 1, "epochs >= 1"),
    "dropout": (lambda v: 0 <= v < 1, "0 <= dropout < 1"),
    "resize": (lambda v: MIN_RESIZE <= v <= 2048, f"{MIN_RESIZE} <= resize <= 2048"),
    "seed": (lambda v: v >= 0, "seed >= 0"),
    "device": (lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None, "auto, cpu, cuda, cuda:N or mps"),
    "train_limit": (lambda v: 0 <= v <= 60000, "0 (all) to 60000"),
    "test_limit": (lambda v: 0 <= v <= 10000, "0 (all) to 10000"),
    "val_size": (lambda v: 0 <= v <= MAX_VAL_SIZE, f"0 (none) to {MAX_VAL_SIZE}"),
    "split_seed": (lambda v: v >= 0, "split_seed >= 0"),
    "pipeline": (lambda v: v in ("fast", "book"), "fast or book"),
    "precision": (lambda v: v in ("auto", "fp32", "bf16"), "auto, fp32 or bf16"),
    "eval_batch_size": (lambda v: v >= 1, "eval_batch_size >= 1"),
    "num_workers": (lambda v: v >= 0, "num_workers >= 0"),
    "experiment": (lambda v: v.strip() != "", "a non-empty name"),
}

FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def parse_value(key: str, text: str):
    """Turn the text of `--set key=text` into the field's type."""
    kind = FIELDS[key].type
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        return text
    except (ValueError, KeyError):
        raise UsageError(f"config: {key} must be {_TYPE_WORDS[kind]}, got {text!r}") from None


def parse_sets(sets: list[str]) -> dict:
    """`["lr=0.1", "resize=96"]` -> `{"lr": 0.1, "resize": 96}`, each checked against the fields."""
    overrides = {}
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"config: --set wants key=value, got {item!r}")
        check_keys([key], "--set")
        overrides[key] = parse_value(key, text.strip())
    return overrides


def check_keys(keys, where: str):
    for key in keys:
        if key not in FIELDS:
            raise UsageError(f"config: unknown key {key!r} in {where} (known: {', '.join(FIELDS)})")


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config: {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"config: {path}: is a folder, not a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config: {path}: invalid TOML ({e})") from None
    except UnicodeDecodeError:
        raise UsageError(f"config: {path}: not a text file (TOML is UTF-8 text)") from None
    except OSError as e:
        raise UsageError(f"config: {path}: cannot read it ({e.strerror})") from None


def load_config(path: str | Path | None = None, sets: list[str] = (), base: dict | None = None) -> Config:
    """Defaults, then the TOML file's keys (or `base`), then `--set` overrides; checked once at the end."""
    values = dict(base or {})
    if path is not None:
        table = read_toml(path)
        check_keys(table, str(path))
        values.update(table)
    values.update(parse_sets(list(sets)))
    return Config(**values)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (every field, in declaration order), readable back by load_config."""
    return tomli_w.dumps(dataclasses.asdict(cfg))


def describe_fields() -> str:
    """One line per field, for `--help`."""
    width = max(map(len, FIELDS))
    return "\n".join(f"  {n:<{width}}  {f.default!r:<24} {f.metadata['help']}" for n, f in FIELDS.items())
