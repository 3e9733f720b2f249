"""Trial packs in a sweep (`pack = K`, `alexnet sweep --pack K`): a worker starts K trials at once and
trains those that share a network and data as one pack (alexnet/training/pack.py).

Each member is an ordinary trial: the worker's own `run_trial` runs it, in a thread of its own, through
the same objective, the same `tracked_train` and so its own Optuna trial, heartbeat, child MLflow run,
per-epoch metrics, checkpoints, pruning decision and final state. The one difference is where its
epochs come from: instead of `train`, `tracked_train` iterates the member's share of the pack, which
this module feeds from one `train_pack` on the worker's main thread.

- Asking: under the study lock, trials are started one after another (each drawn with the others
  RUNNING, so TPE's constant liar sees them, and its run set up before the next is asked for) until K
  are running or the count is reached.
- Grouping: members pack together where their configs agree on everything but lr and dropout (the
  resize, the batch, the seed, hence the data order: a member's checkpoint then resumes alone in
  `train`). A member with no partner trains alone, as a pack of one; groups train one after another.
- Epochs: the pack yields an epoch; each member records it (its checkpoint slice is copied, its
  pruner asked) and asks for the next; a member that ended (pruned, diverged, failed) leaves the
  pack, and the survivors are stacked again.
- Faults: Ctrl-C or SIGTERM on the worker interrupts every member (runs KILLED, trials queued again);
  a lost server or a full disk is raised by the worker after its members ended, as for one trial.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import asdict

from alexnet import UsageError
from alexnet.sweep.study import next_step
from alexnet.training.config import Config
from alexnet.training.pack import check_fits, train_pack
from alexnet.training.train import resolve_device

SHARED_EXCEPT = ("lr", "dropout", "run_name")  # what members of one pack may differ in
_END = object()
_checked = set()  # sweeps whose largest pack this process has checked against its memory


class Member:
    """One trial of a pack, seen from the pack: its config once its run exists, its epochs as they come."""

    def __init__(self):
        self.cond = threading.Condition()
        self.cfg = None         # its run exists and asks for its first epoch
        self.start = None       # a checkpoint to start from (always None for a sweep's new trial)
        self.ready = False      # asking for its next epoch
        self.gone = False       # its thread ended: finished, pruned, failed or interrupted
        self.error = None
        self.epochs = queue.Queue()

    def mark(self, **what):
        """Set these fields and wake whoever waits on them."""
        with self.cond:
            for k, v in what.items():
                setattr(self, k, v)
            self.cond.notify_all()

    def wait(self, what: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: getattr(self, what) or self.gone)

    def release(self):
        pass  # its params are drawn; the pack holds the study lock until every member's run is set up

    def records(self, cfg, start=None, progress=False):
        """The trainer `tracked_train` iterates for this member: the pack's epochs, one by one."""
        self.mark(cfg=cfg, start=start, ready=True)
        while True:
            item = self.epochs.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            self.mark(ready=True)  # recorded: its checkpoint copied, its pruner asked

    def give(self, item) -> None:
        self.mark(ready=False)
        self.epochs.put(item)


def check_memory(sweep) -> None:
    """Once per worker: the sweep's pack at its largest resize and batch fits this device's memory."""
    if sweep.study in _checked:
        return
    largest = {}
    for name in ("resize", "batch_size"):
        s = sweep.space.get(name)
        if s is not None:
            largest[name] = max(s["choices"]) if "choices" in s else s["high"]
    cfg = Config(**{**sweep.config, **largest})
    try:
        check_fits(sweep.pack, cfg, resolve_device(cfg))
    except UsageError as e:
        raise UsageError(f"{e}, or more workers with smaller packs") from None
    _checked.add(sweep.study)


def run_pack(study, sweep, slot: int, parent: str, release, deadline: float, run_trial) -> None:
    """Under the study lock (`release` lets it go): start up to `sweep.pack` trials, then train them in packs."""
    check_memory(sweep)
    members, threads = [], []
    try:
        while len(members) < sweep.pack:
            if members and next_step(study, sweep, deadline) != "start":
                break
            member = Member()
            thread = threading.Thread(target=_run, args=(member, run_trial, study, sweep, slot, parent),
                                      name=f"pack-member-{len(members)}", daemon=True)
            thread.start()
            # Its run is set up before the next member's starts: two runs logging the same dataset at
            # once would both try to create it in the store.
            member.wait("cfg")
            members.append(member)
            threads.append(thread)
        release()
        for group in groups([m for m in members if not m.gone]):
            train_group(group)
    except BaseException as error:  # Ctrl-C or SIGTERM: every member's run ends KILLED, its trial queued again
        interrupt = error if isinstance(error, KeyboardInterrupt) else KeyboardInterrupt()
        for member in members:
            member.epochs.put(interrupt)
        for thread in threads:
            thread.join()
        raise
    for thread in threads:
        thread.join()
    for member in members:  # what `run_trial` raises to stop the worker (a lost server, a full disk)
        if member.error is not None:
            raise member.error


def _run(member: Member, run_trial, study, sweep, slot: int, parent: str) -> None:
    try:
        run_trial(study, sweep, slot, parent, member.release, trainer=member.records)
    except BaseException as e:
        member.error = e
    finally:
        member.mark(gone=True)


def groups(members: list[Member]) -> list[list[Member]]:
    """Members whose configs agree on all but lr and dropout, in the order they were started."""
    out = {}
    for m in members:
        key = tuple(sorted((k, v) for k, v in asdict(m.cfg).items() if k not in SHARED_EXCEPT))
        out.setdefault(key, []).append(m)
    return list(out.values())


def train_group(group: list[Member]) -> None:
    """One pack: each epoch handed to its members; those that ended leave it before the next."""
    leave = set()
    try:
        for out in train_pack([m.cfg for m in group], [m.start for m in group], progress=False, leave=leave):
            for i, record in out.items():
                group[i].give(record)
            for i in out:
                group[i].wait("ready")
                if group[i].gone:
                    leave.add(i)
    except Exception as e:  # the pack itself failed: so does each member's run, with the reason
        for member in group:
            member.epochs.put(e)
        return
    for member in group:
        member.epochs.put(_END)
