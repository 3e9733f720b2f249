"""The code a run ran: the git commit of the checkout the package runs from and, where the work tree
differs from that commit, the difference as one patch that `git apply` takes. Torch- and MLflow-free.

The patch holds the tracked files' changes (`git diff HEAD --binary`) and the untracked files git does
not ignore, each as a new file (`git diff --no-index /dev/null FILE`): together, the commit and the
patch are the work tree as it was. Git writes nothing here: no index, no objects, no work-tree file.
An untracked file over MAX_UNTRACKED_BYTES (data dropped in the tree, say) is left out and named, and a
run with such a file cannot be re-created from its record.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
MAX_UNTRACKED_BYTES = 1 << 20
# Whatever the user's git config says, patches use a/ b/ prefixes, no colour and no external diff tool.
_DIFF = ["-c", "diff.noprefix=false", "-c", "diff.mnemonicPrefix=false", "-c", "core.quotePath=true", "diff",
         "--binary", "--no-color", "--no-ext-diff", "--src-prefix=a/", "--dst-prefix=b/"]


@dataclass(frozen=True)
class Code:
    commit: str | None                  # None: not a git checkout (an installed package), or git is missing
    patch: bytes = b""                  # empty: the work tree is the commit
    left_out: list[str] = field(default_factory=list)  # untracked files too big to put in the patch

    @property
    def dirty(self) -> bool:
        return bool(self.patch or self.left_out)

    @property
    def patch_sha256(self) -> str:
        return hashlib.sha256(self.patch).hexdigest()


def git(*args: str, cwd: Path = CHECKOUT, check: bool = True) -> subprocess.CompletedProcess:
    """`git ARGS` in `cwd`, output as bytes. Variables that would point git at another repository
    (set inside a git hook, say) are dropped."""
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=60, check=check, env=env)


def current(root: Path = CHECKOUT) -> Code:
    """The commit and the patch of the checkout at `root`; Code(None) where there is no git checkout."""
    try:
        head = git("rev-parse", "--verify", "HEAD", cwd=root, check=False)
        if head.returncode != 0:
            return Code(None)
        tracked = git(*_DIFF, "HEAD", cwd=root).stdout
        untracked = git("ls-files", "--others", "--exclude-standard", "-z", cwd=root).stdout
    except (OSError, subprocess.SubprocessError):
        return Code(None)
    parts, left_out = [tracked], []
    for name in filter(None, untracked.decode().split("\0")):
        path = root / name
        if path.is_symlink() or not path.is_file():
            continue
        if path.stat().st_size > MAX_UNTRACKED_BYTES:
            left_out.append(name)
            continue
        # --no-index exits 1 when the files differ, which they always do here.
        parts.append(git(*_DIFF, "--no-index", "--", "/dev/null", name, cwd=root, check=False).stdout)
    return Code(head.stdout.decode().strip(), b"".join(parts), left_out)
