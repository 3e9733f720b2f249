"""Checkpoints: the training state (model, optimizer, epoch, RNG, config) as files, written without
stalling training and read back without trusting them. This module knows the format and how a file is
written; where a run's files live (its artifacts `checkpoints/last.pt` and `checkpoints/best.pt`, on
the local store or a server) is `alexnet/tracking/run_files.py`'s, which hands the writer its folder.

File format: one header line `ALEXNET-CHECKPOINT 1 sha256=<64 hex>\n`, then the bytes `torch.save`
wrote. The checksum covers those bytes and lives in the same file, so a kill at any moment leaves
either the old checkpoint or the new one, never a file and a checksum that disagree. Every file is
written to a temporary name and renamed into place. `load()` checks the checksum, then calls
`torch.load(..., weights_only=True)`, which rebuilds tensors and plain containers only and never runs
pickled code.

Cost: `snapshot()` copies the state's tensors on their own device when called (a memcpy; on a GPU an
asynchronous device-to-device copy), then a background thread moves the copy to the host, serializes,
hashes and publishes it while the next epoch trains. `last.pt` is written every epoch; `best.pt` is never
written as a copy of it: it exists only while the best epoch is an earlier one (see `Writer`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import resource
import shutil
import threading
from pathlib import Path

import torch

from alexnet import UsageError, files

MAGIC = b"ALEXNET-CHECKPOINT 1 sha256="
HEADER_BYTES = len(MAGIC) + 64 + 1  # magic, hex digest, newline


def _map(fn, tree):
    """Apply `fn` to every tensor in nested dicts/lists/tuples, copying the containers."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(fn, v) for v in tree)
    return tree


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def snapshot(state: dict) -> dict:
    """A private copy of `state`, made now: the next epoch changes the live tensors in place."""
    return _map(lambda t: t.detach().clone(), state)


def to_host(tree: dict, ready: torch.cuda.Event | None = None) -> dict:
    """`tree` with every tensor on the CPU. CUDA copies run on a side stream once `ready` (recorded
    after the snapshot's copies) has passed, so they overlap the next epoch's kernels."""
    cuda = next((t.device for t in _tensors(tree) if t.device.type == "cuda"), None)
    if cuda is None:
        return tree
    stream = torch.cuda.Stream(cuda)
    if ready is not None:
        stream.wait_event(ready)
    with torch.cuda.stream(stream):
        return _map(lambda t: t.to("cpu"), tree)  # blocking copies: done when this returns


class _HashingFile:
    """The file object `torch.save` writes through: it hashes what passes (one pass over the bytes)
    and writes it on. A write error (a full disk) is kept, not raised, and `save` raises it once
    torch is done: raised under torch's zip writer, it would turn into an unrelated error ("unexpected
    pos"), and the writer's C++ destructor can then abort the whole process (SIGABRT), taking the
    run's end with it."""

    def __init__(self, fh):
        self.fh, self.sha, self.error = fh, hashlib.sha256(), None

    def write(self, data):
        if self.error is None:
            try:
                self.sha.update(data)
                self.fh.write(data)
            except OSError as e:
                self.error = e
        return memoryview(data).nbytes

    def flush(self):
        pass


def tensor_bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(tree))


def check_room(folder: str | Path, nbytes: int, what: str) -> None:
    """Raise OSError unless a file of `nbytes` fits in `folder`: the disk's free space and the process's
    file-size limit (`ulimit -f`). When a write fails under torch's zip writer (`torch.save`, and
    `torch.export` inside MLflow's `log_model`), the writer can abort the process from its C++
    destructor, so a file that cannot fit is refused before torch starts it."""
    needed = nbytes + (1 << 20)  # the archive's headers and pickled structure
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:  # not made yet: the nearest one that is
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"No space left on device: {what} needs {needed / 1e6:,.0f} MB, "
                                    f"{folder} has {free / 1e6:,.0f} MB free")
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY and limit < needed:
        raise OSError(errno.EFBIG, f"File too large: {what} needs {needed / 1e6:,.0f} MB, files may have at most "
                                   f"{limit / 1e6:,.0f} MB here (ulimit -f)")


def save(state: dict, path: str | Path) -> str:
    """Write `state` (CPU tensors) to `path` atomically; return its sha256."""
    path = Path(path)
    check_room(path.parent, tensor_bytes(state), "a checkpoint")
    with files.atomic_open(path) as fh:
        fh.write(b"\0" * HEADER_BYTES)  # the header is filled in once the digest is known
        hashing = _HashingFile(fh)
        torch.save(state, hashing)
        if hashing.error is not None:
            raise hashing.error
        digest = hashing.sha.hexdigest()
        fh.seek(0)
        fh.write(MAGIC + digest.encode() + b"\n")
    return digest


def load(path: str | Path, what: str = "") -> dict:
    """Read a checkpoint, refusing it (UsageError) unless its checksum matches."""
    path = Path(path)
    what = what or str(path)
    data = path.read_bytes()
    header, payload = data[:HEADER_BYTES], memoryview(data)[HEADER_BYTES:]
    if not header.startswith(MAGIC) or not header.endswith(b"\n"):
        raise UsageError(f"checkpoint {what} is not an alexnet checkpoint (no checksum header): refusing to load it")
    expected = header[len(MAGIC):-1].decode("ascii", "replace")
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise UsageError(f"checkpoint {what} is damaged (sha256 {actual[:12]}..., expected {expected[:12]}...): "
                         f"refusing to load it")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


class Writer:
    """One background thread that publishes checkpoints while training goes on, into `folder`: what
    `run_files.RunCheckpoints` is for a run, with `publish(state, name)` (returns the file's bytes),
    `keep_last_as_best()` (makes the published `last.pt` `best.pt` too; returns its bytes), `remove(name)`
    and `path(name)` (the file's name in messages).

    `submit(state, best, then)` snapshots the state at once and returns that snapshot; the thread
    writes it later as `last.pt`, then calls `then()` (tracking logs the epoch's metrics there, so a
    metric is in the run only once the state that produced it can be resumed: a resumed run never logs
    an epoch twice). `best` says the state is the best so far.

    No two identical weight files: `best.pt` exists only while the best state is not `last.pt`. When a
    worse state is about to replace a `last.pt` that holds the best one, that file becomes `best.pt`
    first (`keep_last_as_best`); when a new best is written as `last.pt`, `best.pt` goes. A kill at any
    moment leaves a whole, resumable `last.pt` (and `run_files.fetch_best` reads the best from `last.pt`
    whenever its best epoch is its epoch, whatever `best.pt` then holds).

    If the thread is still busy, a newer state replaces the waiting one (only the newest `last` matters;
    a best state replaced so is written as `best.pt` directly; the callbacks of both still run, after it).
    `call_after(fn)` queues a callback behind the waiting writes. `on_written(sizes)` is called after each
    write with the bytes of `last.pt` and `best.pt` (tracking records them on the run). An error in the
    thread is raised by the next `submit` or by `close`, naming what failed (`writing checkpoints/last.pt`,
    or the callback's `what`, e.g. logging an epoch's metrics), so a full disk is never silent; callbacks
    behind a failed write do not run."""

    def __init__(self, folder, last_is_best: bool = False, on_written=None):
        self.folder, self.on_written = folder, on_written
        self.last_is_best = last_is_best    # the published last.pt holds the best state (a resume knows)
        self.pending_last = None            # (snapshot, ready event, best?) waiting to be written
        self.pending_best = None            # (snapshot, ready event): a best state a newer one replaced
        self.sizes = {"last": 0, "best": 0}  # bytes published, as far as this writer knows
        self.callbacks: list = []           # run in order once the pending writes are published
        self.error: tuple[str, BaseException] | None = None  # (what was being done, its error)
        self.closing = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def submit(self, state: dict, best: bool, then=None) -> dict:
        self._raise()
        snap = snapshot(state)
        ready = None
        if any(t.is_cuda for t in _tensors(snap)):
            ready = torch.cuda.Event()
            ready.record()
        with self.cond:
            waiting = self.pending_last
            if best:
                self.pending_best = None
            elif waiting is not None and waiting[2]:
                self.pending_best = waiting[:2]
            self.pending_last = (snap, ready, best)
            if then is not None:
                self.callbacks.append(then)
            self.cond.notify()
        return snap

    def call_after(self, fn) -> None:
        self._raise()
        with self.cond:
            self.callbacks.append(fn)
            self.cond.notify()

    def _loop(self):
        while True:
            with self.cond:
                while self.pending_last is None and not self.callbacks and not self.closing:
                    self.cond.wait()
                if self.pending_last is None and not self.callbacks:
                    return
                last, best, self.pending_last, self.pending_best = self.pending_last, self.pending_best, None, None
                callbacks, self.callbacks = self.callbacks, []
            what = f"writing {self.folder.path('last')}"
            if last is not None and not self._attempt(what, lambda: self._write(last, best)):
                return
            for fn in callbacks:
                if not self._attempt(getattr(fn, "what", "a callback after a checkpoint"), fn):
                    return

    def _write(self, last, best) -> None:
        """Publish `last` as `last.pt`, keeping exactly one copy of the best state."""
        snap, ready, is_best = last
        if best is not None:  # a best state that was never last.pt: its own file
            self.sizes["best"] = self.folder.publish(to_host(*best), "best")
        elif not is_best and self.last_is_best:  # last.pt holds the best: it stays, as best.pt
            self.sizes["best"] = self.folder.keep_last_as_best()
        self.sizes["last"] = self.folder.publish(to_host(snap, ready), "last")
        if is_best:  # the new last.pt is the best: a best.pt would be an older, worse state
            self.folder.remove("best")
            self.sizes["best"] = 0
        self.last_is_best = is_best
        if self.on_written is not None:
            self.on_written(dict(self.sizes))

    def _attempt(self, what: str, fn) -> bool:
        """Run `fn`; keep its error, with what was being done, for the training thread to raise."""
        try:
            fn()
            return True
        except BaseException as e:
            self.error = (what, e)
            return False

    def _raise(self):
        if self.error is not None:
            (what, error), self.error = self.error, None
            kind = OSError if isinstance(error, OSError) else RuntimeError  # a full disk stays an OSError
            raise kind(f"{what} failed: {error}") from error

    def close(self):
        """Write what is waiting, run the callbacks, stop the thread, raise its error. Closing again
        does nothing."""
        if self.closing and not self.thread.is_alive() and self.error is None:
            return
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join()
        self._raise()
