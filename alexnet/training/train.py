"""The training loop: the chapter's `d2l.train_ch6`, made fast and resumable.

`train(cfg)` yields one `EpochRecord` per epoch and knows nothing of MLflow or Optuna: tracking logs
the records, the sweep reports them to its pruner, and both call this same function.

What mirrors `train_ch6`: Xavier-uniform conv/linear weights, plain SGD(lr), cross-entropy; per epoch
the running train loss and accuracy (train mode), test accuracy (eval mode, no grad) and examples/s
counted over step time only, as the book's timer does. Added: examples/s end to end (data and
evaluation included), epoch seconds, best-so-far test accuracy, and the full training state for
checkpoints. With a validation split (`val_size > 0`, held out of the training images, never trained
on) each epoch is also evaluated on it, and the best epoch is the one validation chose; the chapter
has no such split (it tunes nothing), and `val_size = 0` keeps its protocol exactly. With one seed on one device, two runs give identical metrics, and a run resumed from a
checkpoint continues exactly where it stopped (shuffling depends on (seed, epoch); the RNG state that
drives dropout is in the checkpoint).

Two pipelines, one loop. `pipeline = "book"` is the chapter's path: PIL Resize + ToTensor in 4
DataLoader workers, fp32, a host sync every step and every evaluation batch (its Accumulator calls
float()), the book's host clock. `pipeline = "fast"` keeps the uint8 data on the device, resizes each
batch there, accumulates metrics on the device, evaluates in larger batches and, on CUDA, adds bf16
autocast, channels_last, fused SGD and cuDNN autotuning (`speed_switches` says what a run applies);
`compile = true` adds torch.compile, its compile time reported apart. Both draw the same shuffle: a
seed gives either the same initial weights, batches and dropout masks. benchmarks/throughput.py
measures one against the other.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from alexnet import UsageError
from alexnet.training import data
from alexnet.training.config import Config
from alexnet.training.model import alexnet, init_weights
from alexnet.redact import first_line

REFRESH_STEPS = 25  # read the running loss back every this many steps: progress bar and divergence check


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    train_acc: float
    test_acc: float
    best_test_acc: float          # the best test accuracy so far (the chapter's runs have nothing else)
    best_epoch: int               # the epoch chosen so far: best validation accuracy, else best test accuracy
    examples_per_sec: float       # the book's count: training examples / summed step time
    wall_examples_per_sec: float  # training examples / the whole epoch, data and evaluation included
    epoch_seconds: float
    compile_seconds: float = 0.0  # one-time torch.compile warm-up, reported with the first epoch
    warmup_seconds: float = 0.0   # all of the one-time warm-up before the clock (compiling, cuDNN autotuning)
    # With a validation split (val_size > 0), else None:
    val_acc: float | None = None
    best_val_acc: float | None = None
    test_acc_at_best_val: float | None = None  # test accuracy of the epoch validation chose
    # The training state after this epoch (model, optimizer, epoch, RNG, config). Its tensors are the
    # live ones: copy them before the next epoch starts if they must outlive it.
    state: Callable[[], dict] = field(default=None, repr=False, compare=False)

    def metrics(self) -> dict[str, float]:
        """Namespaced metric names, as logged to MLflow (`val/...` and `test/acc_at_best_val` only with
        a validation split; `perf/compile_seconds` and `perf/warmup_seconds` only where they are > 0: the
        first epoch of a compiled run or of one warmed up on CUDA)."""
        metrics = {
            "train/loss": self.train_loss,
            "train/acc": self.train_acc,
            "test/acc": self.test_acc,
            "test/best_acc": self.best_test_acc,
        }
        if self.val_acc is not None:
            metrics.update({"val/acc": self.val_acc, "val/best_acc": self.best_val_acc,
                            "test/acc_at_best_val": self.test_acc_at_best_val})
        metrics.update({
            "perf/examples_per_sec": self.examples_per_sec,
            "perf/wall_examples_per_sec": self.wall_examples_per_sec,
            "perf/epoch_seconds": self.epoch_seconds,
        })
        if self.compile_seconds > 0:
            metrics["perf/compile_seconds"] = self.compile_seconds
        if self.warmup_seconds > 0:
            metrics["perf/warmup_seconds"] = self.warmup_seconds
        return metrics


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, step: int, loss: float):
        super().__init__(f"training loss became {loss} at epoch {epoch}, step {step} (learning rate too high?)")
        self.epoch, self.step, self.loss = epoch, step, loss


def resolve_device(cfg: Config) -> torch.device:
    """The device `cfg.device` names ("auto": cuda, then mps, then cpu), or a UsageError where this
    machine has no such device."""
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
            raise UsageError(f"config: device = {cfg.device!r}, but torch sees no CUDA GPU here (torch {torch.__version__}, "
                             f"{build}): use device = \"cpu\" or \"auto\"")
        if (device.index or 0) >= count:
            raise UsageError(f"config: device = {cfg.device!r}, but this machine has {count} GPU(s): cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("config: device = 'mps', but this machine has no Apple GPU: use device = \"cpu\" or \"auto\"")
    return device


def check_device(cfg: Config) -> torch.device:
    """The resolved device, checked usable: a small computation runs on it (a GPU can be present yet
    taken, broken or out of memory). A UsageError otherwise."""
    device = resolve_device(cfg)
    try:
        (torch.ones(8, device=device) * 2).sum().item()
    except RuntimeError as e:
        raise UsageError(f"config: device {device} is present but not usable ({first_line(e)})") from None
    return device


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """bf16 autocast where it pays (fast pipeline on a CUDA GPU with native bf16: Ampere or newer);
    fp32, the chapter's, elsewhere: CPU autocast and emulated bf16 (V100, T4) are slower than fp32."""
    if cfg.precision != "auto":
        return cfg.precision
    fast_cuda = cfg.pipeline == "fast" and device.type == "cuda"
    return "bf16" if fast_cuda and torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"


def speed_switches(cfg: Config, device: torch.device) -> dict:
    """The speed switches as a run applies them. The book pipeline keeps the chapter's plain path (fp32,
    no autotuning, a host sync every step, evaluation at the training batch size); on the fast one,
    bf16, channels_last and fused SGD apply only on CUDA, where they pay. `deterministic` turns cuDNN's
    autotuning off: it picks its algorithms by timing them, anew in every process."""
    fast, cuda = cfg.pipeline == "fast", device.type == "cuda"
    return {
        "precision": resolve_precision(cfg, device),
        "channels_last": fast and cuda and cfg.channels_last,
        "fused_sgd": fast and cuda and cfg.fused_sgd,
        "cudnn_benchmark": fast and cfg.cudnn_benchmark and not cfg.deterministic,
        "deterministic": cfg.deterministic,
        "compile": cfg.compile,
        "eval_batch_size": cfg.eval_batch_size if fast else cfg.batch_size,
        "sync_each_step": not fast,
        "num_workers": 0 if fast else cfg.num_workers,
    }


class StepTimer:
    """Sums step times like the book's `d2l.Timer`. With `events` (CUDA, fast pipeline) it times each
    step with CUDA events instead, so it needs no host sync per step; the book pipeline syncs every
    step anyway and keeps the book's host clock."""

    def __init__(self, events: bool):
        self.events = events
        self.pairs, self.seconds, self._t = [], 0.0, 0.0

    def start(self):
        if self.events:
            self.pairs.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.pairs[-1][0].record()
        else:
            self._t = time.perf_counter()

    def stop(self):
        if self.events:
            self.pairs[-1][1].record()
        else:
            self.seconds += time.perf_counter() - self._t

    def total(self) -> float:
        if self.events:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.pairs) / 1000
        return self.seconds


def train_one_epoch(model, optimizer, batches, *, epoch, device, amp_dtype, sync_each_step, bar):
    """One pass; returns (mean loss, accuracy, examples, step seconds). Loss and correct counts are
    accumulated on the device; `sync_each_step` reads them back every step as the book does."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen, timer = 0, StepTimer(events=device.type == "cuda" and not sync_each_step)
    for step, (x, y) in enumerate(batches, 1):
        timer.start()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            y_hat = model(x)
            loss = F.cross_entropy(y_hat, y)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            loss_sum += loss.detach().float() * len(y)
            correct += (y_hat.argmax(1) == y).sum()
            if sync_each_step:  # the book's Accumulator calls float()/.item() on every step
                loss_sum.item()
        seen += len(y)
        timer.stop()
        bar.update(1)
        if step % REFRESH_STEPS == 0:
            mean_loss = loss_sum.item() / seen
            if not math.isfinite(mean_loss):
                raise Diverged(epoch, step, mean_loss)
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{correct.item() / seen:.3f}", refresh=False)
    mean_loss = loss_sum.item() / seen
    if not math.isfinite(mean_loss):
        raise Diverged(epoch, step, mean_loss)
    return mean_loss, correct.item() / seen, seen, timer.total()


@torch.no_grad()
def evaluate(model, batches, *, device, amp_dtype, sync_each_step=False) -> float:
    """Test accuracy in eval mode (dropout off), as `d2l.evaluate_accuracy_gpu`, which reads the count
    back every batch (`sync_each_step`); the fast pipeline reads it once."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            correct += (model(x).argmax(1) == y).sum()
        if sync_each_step:
            correct.item()
        seen += len(y)
    return correct.item() / seen


def set_determinism(switches: dict) -> None:
    """Apply the process-wide switches that decide whether a GPU run repeats bit for bit: cuDNN's
    autotuning (its choice of algorithms differs from process to process), cuDNN's deterministic
    algorithms, and `torch.use_deterministic_algorithms` (an op with no deterministic kernel then
    raises instead of running). cuBLAS needs a fixed workspace for it, set before its first use."""
    if switches["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = switches["cudnn_benchmark"]
    torch.backends.cudnn.deterministic = switches["deterministic"]
    torch.use_deterministic_algorithms(switches["deterministic"])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """The batch sizes one pass over n examples yields: full batches and a shorter last one."""
    return sorted({min(n, batch_size), n % batch_size} - {0}, reverse=True)


def _warmup(forward, model, inputs, device, amp_dtype) -> float:
    """Run the model once per (training?, example input) before the clock starts, so what a new shape
    costs the first time it is seen is paid now: compiling its graph (train and eval mode, every batch
    size) under torch.compile, and on CUDA cuDNN's autotuning of every convolution, the allocator's
    growth and kernel loading. RNG and weights are untouched."""
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for training, x in inputs:
            model.train(training)
            # Grad mode is part of the compiled graph's guards: evaluation runs under no_grad, so its
            # graphs are compiled under no_grad too, or the first evaluation would compile them again.
            with torch.set_grad_enabled(training), \
                    torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = forward(x)
            if training:
                out.float().sum().backward()
        model.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - t0


def train(cfg: Config, start: dict | None = None, progress: bool = True) -> Iterator[EpochRecord]:
    """Train `cfg`, yielding an EpochRecord after each epoch. `start` is a checkpoint's state (from
    `EpochRecord.state()`) to resume from: training continues at the epoch after it."""
    # --- Setup ---
    device = resolve_device(cfg)
    switches = speed_switches(cfg, device)
    amp_dtype = torch.bfloat16 if switches["precision"] == "bf16" else None
    cuda, channels_last = device.type == "cuda", switches["channels_last"]
    # These flags are process-wide: they are set again before each epoch, since two trainings may
    # alternate in one process (benchmarks/throughput.py).
    set_determinism(switches)
    torch.manual_seed(cfg.seed)

    # --- Model (built and initialised on the CPU, so the initial weights do not depend on the device) ---
    model = alexnet(cfg.dropout, cfg.resize)
    init_weights(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, fused=True if switches["fused_sgd"] else None)
    # The best epoch so far: by validation accuracy where there is a validation split, else (the
    # chapter's protocol) by test accuracy. The best test accuracy is kept either way.
    first_epoch, best = 1, {"test_acc": 0.0, "epoch": 0, "val_acc": 0.0, "test_acc_at_best_val": 0.0}
    if start is not None:
        model.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        first_epoch = start["epoch"] + 1
        best = {"test_acc": start["best_test_acc"], "epoch": start["best_epoch"],
                "val_acc": start.get("best_val_acc", 0.0), "test_acc_at_best_val": start.get("test_acc_at_best_val", 0.0)}
        torch.set_rng_state(start["rng"]["torch"])
        if cuda and start["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(start["rng"]["cuda"])

    # --- Data: training images, the validation split held out of them (val_size > 0), test images ---
    eval_batch = switches["eval_batch_size"]
    splits = data.Splits(cfg, device, eval_batch, channels_last)
    n_train, validate = splits.sizes["train"], splits.sizes["validation"] > 0

    # --- Warm-up before the clock: compilation, and on CUDA cuDNN's autotuning, timed apart ---
    forward, compile_seconds, warmup_seconds = model, 0.0, 0.0
    if cfg.compile:
        forward = torch.compile(model, dynamic=False)
    # The fast pipeline on CUDA autotunes each new convolution shape the first time it runs (about 5 s of
    # the baseline's first epoch on an H200, benchmarks/README.md): every shape is seen once here instead.
    if cfg.compile or (cuda and switches["cudnn_benchmark"]):
        # Each (mode, batch size, memory format) the run will see is a graph of its own: run all now.
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def example(b):
            return torch.zeros(b, 1, cfg.resize, cfg.resize, device=device).contiguous(memory_format=fmt)

        eval_sizes = {b for name in ("validation", "test") for b in batch_sizes(splits.sizes[name], eval_batch)}
        inputs = ([(True, example(b)) for b in batch_sizes(n_train, cfg.batch_size)]
                  + [(False, example(b)) for b in sorted(eval_sizes, reverse=True)])
        warmup_seconds = _warmup(forward, model, inputs, device, amp_dtype)
        compile_seconds = warmup_seconds if cfg.compile else 0.0

    # --- Training ---
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    # No bar when output is not a terminal (`disable=None`): a log file would get a line per refresh.
    bar = tqdm(total=(cfg.epochs - first_epoch + 1) * steps_per_epoch, unit="step", disable=None if progress else True,
               dynamic_ncols=True, leave=False)
    evaluation = dict(device=device, amp_dtype=amp_dtype, sync_each_step=switches["sync_each_step"])
    try:
        for epoch in range(first_epoch, cfg.epochs + 1):
            bar.set_description(f"epoch {epoch}/{cfg.epochs}")
            set_determinism(switches)
            t0 = time.perf_counter()
            loss, train_acc, seen, step_seconds = train_one_epoch(
                forward, optimizer, splits.batches("train", epoch), epoch=epoch, device=device, amp_dtype=amp_dtype,
                sync_each_step=switches["sync_each_step"], bar=bar)
            val_acc = evaluate(forward, splits.batches("validation"), **evaluation) if validate else None
            test_acc = evaluate(forward, splits.batches("test"), **evaluation)
            epoch_seconds = time.perf_counter() - t0
            if validate:
                if val_acc > best["val_acc"]:
                    best.update(epoch=epoch, val_acc=val_acc, test_acc_at_best_val=test_acc)
            elif test_acc > best["test_acc"]:
                best["epoch"] = epoch
            best["test_acc"] = max(best["test_acc"], test_acc)
            best_now = dict(best)

            def state(epoch=epoch, best=best_now):
                return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                        "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
                        "best_val_acc": best["val_acc"], "test_acc_at_best_val": best["test_acc_at_best_val"],
                        "rng": {"torch": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state_all() if cuda else []},
                        "config": asdict(cfg)}

            yield EpochRecord(epoch, loss, train_acc, test_acc, best_now["test_acc"], best_now["epoch"],
                              examples_per_sec=seen / step_seconds, wall_examples_per_sec=seen / epoch_seconds,
                              epoch_seconds=epoch_seconds,
                              compile_seconds=compile_seconds if epoch == first_epoch else 0.0,
                              warmup_seconds=warmup_seconds if epoch == first_epoch else 0.0,
                              val_acc=val_acc, best_val_acc=best_now["val_acc"] if validate else None,
                              test_acc_at_best_val=best_now["test_acc_at_best_val"] if validate else None,
                              state=state)
    finally:
        bar.close()
