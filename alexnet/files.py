"""Writing a file atomically: a reader (or a process killed mid-write) sees the old file or the new one,
never half of one. The content goes to a temporary name in the same folder (so the rename stays on one
file system), is flushed to disk, and `os.replace` puts it in place; on any error the temporary file is
removed and the old file is left as it was. Temporary names start with a dot and end with `.tmp` (a
suffix may follow, for writers that pick a format from it), so a folder's leftovers from a killed
writer can be found by `.*.tmp*`.

No torch, MLflow or Optuna here: checkpoints, the data files and plots all write through it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def replacing(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` for the caller to fill (write, link, `savefig`); once the block
    ends without error it is synced to disk and replaces `path`; on an error it is removed."""
    path = Path(path)
    # pid and thread: two writers of one path (a background checkpoint thread, two processes) never share it
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp{suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes reach the disk before the name points at them
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """`open(path, "wb")`, atomically: the file appears whole when the block ends without error."""
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        yield fh


def write_bytes(path: str | Path, data: bytes) -> None:
    """`Path(path).write_bytes(data)`, atomically."""
    with atomic_open(path) as fh:
        fh.write(data)
