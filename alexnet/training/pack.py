"""Trial packs: K trainings of the same network at the same resize, trained as one model.

The members' weights are stacked (one tensor of K slices per parameter) and one `torch.func.vmap` over
`functional_call` runs all K networks on each batch: the first convolution sees the batch once for all
members, and every later layer runs as one grouped or batched kernel instead of K small ones. Each
member keeps what makes it a trial of its own:

- its learning rate: plain SGD (the chapter's `SGD(lr)`: no momentum, no weight decay) is p -= lr * g,
  applied member by member to its slice;
- its dropout rate and its own dropout masks, drawn from its own generator, which starts where a
  single run's global RNG stands after its initialisation: each member draws exactly the masks its
  single run would draw;
- its initialisation: built and initialised from its own `seed`, as `train` does.

All members see one data stream, shuffled by `data_seed` (default: the first member's seed), in the
same order: common random numbers, so two members differ by their settings, not by their batches.

`train_pack(cfgs)` reads as `train(cfg)` does, and yields, after each epoch, one `EpochRecord` per
member still in the pack, whose `state()` is that member's own checkpoint in `train`'s format: a
member's slice resumes alone with `train(cfg, start=state)`. A member leaves the pack at the end of an
epoch (pruned: the caller names it in `leave`; diverged: its record is a `Diverged`), and the survivors
are stacked again, so a pruned member costs nothing more. A pack of one runs the plain network without
vmap and is `train`, bit for bit on the CPU (tests/test_pack.py).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from tqdm import tqdm

from alexnet import UsageError
from alexnet.training import data, sizes
from alexnet.training.config import Config
from alexnet.training.model import alexnet, init_weights
from alexnet.training.train import (REFRESH_STEPS, Diverged, EpochRecord, StepTimer, resolve_device,
                                    set_determinism, speed_switches)

# What members of one pack may differ in; every other field (resize, batch size, epochs, data) is shared.
MEMBER_FIELDS = ("lr", "dropout", "seed", "run_name", "experiment")
HEADROOM = 0.85  # the share of free memory a pack may plan to fill: allocator slack, the caller's own


# --- Memory ------------------------------------------------------------------------------------------

def member_bytes(resize: int, batch_size: int, eval_batch_size: int) -> int:
    """About what one member needs while it trains, in fp32: weights and gradients, and the activations of
    one training batch kept for the backward pass and their gradients (each layer's output, twice), or
    an evaluation batch's largest layer output with the ReLU's beside it, whichever is more."""
    c1, c2, c3, c4 = sizes.feature_sides(resize)
    outputs = [resize ** 2, 96 * c1 ** 2, 96 * c1 ** 2, 96 * c2 ** 2,  # input; conv, ReLU, pool
               256 * c2 ** 2, 256 * c2 ** 2, 256 * c3 ** 2,
               384 * c3 ** 2, 384 * c3 ** 2, 384 * c3 ** 2, 384 * c3 ** 2, 256 * c3 ** 2, 256 * c3 ** 2,
               256 * c4 ** 2, 3 * 4096, 3 * 4096, 10]  # FC, ReLU, dropout mask
    train_activations = 2 * batch_size * sum(outputs)
    eval_activations = eval_batch_size * 2 * max(outputs)
    return 4 * (2 * sizes.parameter_count(resize) + max(train_activations, eval_activations))


def free_bytes(device: torch.device) -> int:
    """Memory free for a new pack: the GPU's free memory, or the RAM Linux says is available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_fits(k: int, cfg: Config, device: torch.device, free: int | None = None) -> None:
    """A UsageError, before anything is built, where K members would not fit in the device's memory."""
    switches = speed_switches(cfg, device)
    need = member_bytes(cfg.resize, cfg.batch_size, switches["eval_batch_size"])
    free = free_bytes(device) if free is None else free
    fits = int(free * HEADROOM // need)
    if k > fits:
        raise UsageError(f"pack: {k} members at resize {cfg.resize}, batch {cfg.batch_size} need about "
                         f"{k * need / 2**30:.1f} GiB, and {device} has {free / 2**30:.1f} GiB free: "
                         + (f"at most {fits} fit (pack = {fits})" if fits else "not even one member fits"))


def check_members(cfgs: list[Config]) -> None:
    """Members share everything but their learning rate, dropout, seed and name."""
    if not cfgs:
        raise UsageError("pack: no members")
    first = {k: v for k, v in asdict(cfgs[0]).items() if k not in MEMBER_FIELDS}
    for i, cfg in enumerate(cfgs[1:], 1):
        other = {k: v for k, v in asdict(cfg).items() if k not in MEMBER_FIELDS}
        differ = [k for k in first if first[k] != other[k]]
        if differ:
            raise UsageError(f"pack: member {i} differs from member 0 in {', '.join(differ)}: members may differ "
                             f"only in {', '.join(MEMBER_FIELDS[:3])}")
    if cfgs[0].pipeline != "fast" or cfgs[0].compile:
        raise UsageError("pack: members train on the fast pipeline without compile (pipeline = \"fast\", compile = false)")


# --- The stacked model ----------------------------------------------------------------------------

class Pack:
    """K members' weights stacked, their learning rates, dropout rates and dropout generators."""

    def __init__(self, cfgs: list[Config], device: torch.device, starts: list[dict | None]):
        self.cfgs, self.device = list(cfgs), device
        with torch.device("meta"):  # the layers' structure alone: no weights, no draws from the RNG
            self.template = alexnet(0.0, cfgs[0].resize)
        members, self.generators, self.cpu_states, self.optimizer_states = [], [], [], []
        for cfg, start in zip(cfgs, starts):
            # As `train`: the seed, then the network built and initialised on the CPU.
            torch.manual_seed(cfg.seed)
            model = alexnet(cfg.dropout, cfg.resize)
            init_weights(model)
            optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
            if start is not None:
                model.load_state_dict(start["model"])
                optimizer.load_state_dict(start["optimizer"])
                torch.set_rng_state(start["rng"]["torch"])
                if device.type == "cuda" and start["rng"]["cuda"]:
                    torch.cuda.set_rng_state(start["rng"]["cuda"][device.index or 0], device)
            # Its dropout draws continue the global RNG where its own single run would continue it.
            generator = torch.Generator(device)
            generator.set_state(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())
            self.generators.append(generator)
            self.cpu_states.append(torch.get_rng_state())  # a CUDA member's CPU RNG: as its run leaves it
            self.optimizer_states.append(optimizer.state_dict())
            members.append({name: p.detach() for name, p in model.named_parameters()})
        self.params = {name: torch.stack([m[name] for m in members]).to(device).requires_grad_()
                       for name in members[0]}
        self.dropout_layers = [i for i, layer in enumerate(self.template) if isinstance(layer, nn.Dropout)]

    def __len__(self):
        return len(self.cfgs)

    def masks(self, x_batch: int) -> list[torch.Tensor | None]:
        """Per dropout layer, the K members' scaled masks (K x B x 4096), or None where no member drops
        anything. Member by member, in the order its single run draws them."""
        if all(cfg.dropout == 0 for cfg in self.cfgs):
            return [None] * len(self.dropout_layers)
        per_layer = [[] for _ in self.dropout_layers]
        for cfg, generator in zip(self.cfgs, self.generators):
            for j in range(len(self.dropout_layers)):
                width = self.template[self.dropout_layers[j] - 2].out_features
                if cfg.dropout == 0:  # F.dropout draws nothing at p = 0
                    per_layer[j].append(torch.ones(x_batch, width, device=self.device))
                    continue
                keep = 1 - cfg.dropout
                per_layer[j].append(torch.empty(x_batch, width, device=self.device)
                                    .bernoulli_(keep, generator=generator).div_(keep))
        return [torch.stack(m) for m in per_layer]

    def _member_forward(self, params: dict, x: torch.Tensor, masks) -> torch.Tensor:
        """One member's network, layer by layer as `model.alexnet` builds it; its dropout is its mask."""
        j = 0
        for i, layer in enumerate(self.template):
            if isinstance(layer, nn.Dropout):
                if masks[j] is not None:
                    x = x * masks[j]
                j += 1
            else:
                own = {n: params[f"{i}.{n}"] for n, _ in layer.named_parameters()}
                x = functional_call(layer, own, (x,)) if own else layer(x)
        return x

    def forward(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """K x B x 10 class scores. Training draws each member's dropout masks first."""
        masks = self.masks(len(x)) if training else [None] * len(self.dropout_layers)
        if len(self) == 1:  # the plain network, no vmap: a pack of one is `train`'s arithmetic
            one = [m[0] if m is not None else None for m in masks]
            return self._member_forward({n: p[0] for n, p in self.params.items()}, x, one).unsqueeze(0)
        return vmap(self._member_forward, in_dims=(0, None, [0 if m is not None else None for m in masks]))(
            self.params, x, masks)

    @torch.no_grad()
    def step(self) -> None:
        """Plain SGD, member by member: p -= lr * g on its slice, as `torch.optim.SGD` does on the CPU
        (`add_(g, alpha=-lr)`), so each member's update is its single run's, bit for bit."""
        for p in self.params.values():
            for k, cfg in enumerate(self.cfgs):
                p[k].add_(p.grad[k], alpha=-cfg.lr)
            p.grad = None

    def keep(self, members: list[int]) -> None:
        """Only `members` (indices into the pack) stay: the weights are stacked again without the others."""
        self.cfgs = [self.cfgs[k] for k in members]
        self.generators = [self.generators[k] for k in members]
        self.cpu_states = [self.cpu_states[k] for k in members]
        self.optimizer_states = [self.optimizer_states[k] for k in members]
        index = torch.tensor(members, device=self.device)
        self.params = {n: p.detach().index_select(0, index).requires_grad_() for n, p in self.params.items()}

    def member_state(self, k: int) -> dict:
        """Member k's weights (views of the live stack) and optimizer state, as `train`'s state holds them."""
        return {"model": {n: p[k].detach() for n, p in self.params.items()},
                "optimizer": self.optimizer_states[k]}


# --- Epochs ------------------------------------------------------------------------------------------

def train_pack_epoch(pack: Pack, batches, *, epoch, device, amp_dtype, bar):
    """One pass, all members at once: per member (mean loss, accuracy), the examples seen, the step seconds
    and, per member, the step at which its running loss stopped being finite (None: it did not)."""
    k = len(pack)
    loss_sum = torch.zeros(k, device=device)
    correct = torch.zeros(k, dtype=torch.long, device=device)
    diverged: list[int | None] = [None] * k
    seen, timer = 0, StepTimer(events=device.type == "cuda")
    for step, (x, y) in enumerate(batches, 1):
        timer.start()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            y_hat = pack.forward(x, training=True)
            # Each member's loss is its own batch mean; their sum gives each member its own gradient.
            losses = torch.stack([F.cross_entropy(y_hat[m], y) for m in range(k)])
        losses.sum().backward()
        pack.step()
        with torch.no_grad():
            loss_sum += losses.detach().float() * len(y)
            correct += (y_hat.argmax(2) == y).sum(1)
        seen += len(y)
        timer.stop()
        bar.update(1)
        if step % REFRESH_STEPS == 0:
            _note_diverged(loss_sum.tolist(), seen, step, diverged)
            bar.set_postfix(loss=f"{min(loss_sum.tolist()) / seen:.3f}", refresh=False)
    losses = [s / seen for s in loss_sum.tolist()]
    _note_diverged(loss_sum.tolist(), seen, step, diverged)
    return losses, [c / seen for c in correct.tolist()], seen, timer.total(), diverged


def _note_diverged(sums: list[float], seen: int, step: int, diverged: list) -> None:
    for m, s in enumerate(sums):
        if diverged[m] is None and not math.isfinite(s / seen):
            diverged[m] = (step, s / seen)


@torch.no_grad()
def evaluate_pack(pack: Pack, batches, *, device, amp_dtype) -> list[float]:
    """Each member's accuracy on a split, dropout off."""
    correct = torch.zeros(len(pack), dtype=torch.long, device=device)
    seen = 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            correct += (pack.forward(x, training=False).argmax(2) == y).sum(1)
        seen += len(y)
    return [c / seen for c in correct.tolist()]


def train_pack(cfgs: list[Config], starts: list[dict | None] | None = None, progress: bool = True,
               leave: set | None = None, data_seed: int | None = None) -> Iterator[dict]:
    """Train the members `cfgs` as one pack, yielding after each epoch {member index: EpochRecord, or a
    `Diverged` for a member whose loss stopped being finite}; indices are positions in `cfgs`. The
    caller adds to `leave` the members to drop (pruned); they and diverged members are gone from the
    next epoch. `starts`: a checkpoint state per member (None: from scratch); all must be at the same epoch."""
    # --- Setup ---
    check_members(cfgs)
    cfg0, starts = cfgs[0], list(starts or [None] * len(cfgs))
    device = resolve_device(cfg0)
    switches = speed_switches(cfg0, device)
    amp_dtype = torch.bfloat16 if switches["precision"] == "bf16" else None
    cuda = device.type == "cuda"
    check_fits(len(cfgs), cfg0, device)
    leave = set() if leave is None else leave
    set_determinism(switches)

    # --- Model: each member initialised as its own run would be, then stacked ---
    pack = Pack(cfgs, device, starts)
    members = list(range(len(cfgs)))  # the pack's slices, by index into cfgs
    first_epoch, bests = 1, []
    for start in starts:
        best = {"test_acc": 0.0, "epoch": 0, "val_acc": 0.0, "test_acc_at_best_val": 0.0}
        if start is not None:
            first_epoch = start["epoch"] + 1
            best = {"test_acc": start["best_test_acc"], "epoch": start["best_epoch"],
                    "val_acc": start.get("best_val_acc", 0.0), "test_acc_at_best_val": start.get("test_acc_at_best_val", 0.0)}
        bests.append(best)
    if len({s["epoch"] if s else 0 for s in starts}) > 1:
        raise UsageError("pack: members resume from different epochs; resume them apart")

    # --- Data: one stream for every member (common random numbers) ---
    shared = Config(**{**asdict(cfg0), "seed": cfg0.seed if data_seed is None else data_seed})
    eval_batch = switches["eval_batch_size"]
    splits = data.Splits(shared, device, eval_batch, channels_last=False)
    n_train, validate = splits.sizes["train"], splits.sizes["validation"] > 0

    # --- Training ---
    steps_per_epoch = math.ceil(n_train / cfg0.batch_size)
    bar = tqdm(total=(cfg0.epochs - first_epoch + 1) * steps_per_epoch, unit="step",
               disable=None if progress else True, dynamic_ncols=True, leave=False)
    evaluation = dict(device=device, amp_dtype=amp_dtype)
    try:
        for epoch in range(first_epoch, cfg0.epochs + 1):
            if not members:
                return
            bar.set_description(f"epoch {epoch}/{cfg0.epochs} ({len(members)} members)")
            set_determinism(switches)
            t0 = time.perf_counter()
            losses, train_accs, seen, step_seconds, diverged = train_pack_epoch(
                pack, splits.batches("train", epoch), epoch=epoch, device=device, amp_dtype=amp_dtype, bar=bar)
            val_accs = evaluate_pack(pack, splits.batches("validation"), **evaluation) if validate else None
            test_accs = evaluate_pack(pack, splits.batches("test"), **evaluation)
            epoch_seconds = time.perf_counter() - t0
            out = {}
            for slot, m in enumerate(members):
                if diverged[slot] is not None:
                    out[m] = Diverged(epoch, *diverged[slot])
                    continue
                out[m] = _record(pack, slot, cfgs[m], bests[m], epoch, losses[slot], train_accs[slot],
                                 val_accs[slot] if validate else None, test_accs[slot], seen,
                                 step_seconds, epoch_seconds, cuda)
            yield out
            # Pruned and diverged members leave; the survivors are stacked again for the next epoch.
            stay = [slot for slot, m in enumerate(members) if m not in leave and diverged[slot] is None]
            if len(stay) < len(members):
                pack.keep(stay)
                members = [members[slot] for slot in stay]
    finally:
        bar.close()


def _record(pack: Pack, slot: int, cfg: Config, best: dict, epoch: int, loss, train_acc, val_acc, test_acc,
            seen, step_seconds, epoch_seconds, cuda) -> EpochRecord:
    """One member's EpochRecord, its best-so-far updated as `train` updates it. Speeds are the pack's:
    every member trained on all `seen` examples in the same time."""
    if val_acc is not None:
        if val_acc > best["val_acc"]:
            best.update(epoch=epoch, val_acc=val_acc, test_acc_at_best_val=test_acc)
    elif test_acc > best["test_acc"]:
        best["epoch"] = epoch
    best["test_acc"] = max(best["test_acc"], test_acc)
    best_now, weights = dict(best), pack.member_state(slot)
    generator, cpu_state, device = pack.generators[slot], pack.cpu_states[slot], pack.device

    def state(epoch=epoch, best=best_now):
        # Its dropout stream stands where its single run's global RNG would stand: `train` resumes it.
        rng = {"torch": generator.get_state(), "cuda": []}
        if cuda:
            rng = {"torch": cpu_state, "cuda": torch.cuda.get_rng_state_all()}
            rng["cuda"][device.index or 0] = generator.get_state()
        return {**weights, "epoch": epoch,
                "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
                "best_val_acc": best["val_acc"], "test_acc_at_best_val": best["test_acc_at_best_val"],
                "rng": rng, "config": asdict(cfg)}

    validate = val_acc is not None
    return EpochRecord(epoch, loss, train_acc, test_acc, best_now["test_acc"], best_now["epoch"],
                       examples_per_sec=seen / step_seconds, wall_examples_per_sec=seen / epoch_seconds,
                       epoch_seconds=epoch_seconds, val_acc=val_acc,
                       best_val_acc=best_now["val_acc"] if validate else None,
                       test_acc_at_best_val=best_now["test_acc_at_best_val"] if validate else None,
                       state=state)
