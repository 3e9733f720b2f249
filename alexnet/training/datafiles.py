"""The real Fashion-MNIST files: where they are looked for, their checksums, and the verified copy the
loaders read. Torch-free, so the sweep launcher can check the data before a run exists without
loading torch.

Where the four IDX files come from, first match wins:
  1. the config's `data_dir`, 2. `$ALEXNET_DATA_DIR`: a folder the user names must hold the files (it
  is never silently replaced by another source); 3. Debian's `/usr/share/datasets/fashion-mnist`
  (package `dataset-fashion-mnist`); 4. torchvision's download, where there is internet
  (`alexnet/training/data.py`).
Each file is checked: a `.gz` against torchvision's MD5 (`FashionMNIST.resources`) or, since Debian
recompresses the same bytes, its content against the MD5 of the original uncompressed file. The verified
files are unpacked once into the torchvision layout under `$ALEXNET_CACHE_DIR` (default
`~/.cache/alexnet`), where `torchvision.datasets.FashionMNIST` reads them.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

from alexnet import UsageError, files

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
GZ_MD5 = {  # torchvision.datasets.FashionMNIST.resources (tests/test_data.py checks they agree)
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
RAW_MD5 = {  # the uncompressed files inside torchvision's archives
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # torchvision's FashionMNIST.mirrors
FIX = "reinstall it (apt-get install --reinstall dataset-fashion-mnist) or point data_dir / ALEXNET_DATA_DIR at good copies"


def cache_dir() -> Path:
    return Path(os.environ.get("ALEXNET_CACHE_DIR") or Path.home() / ".cache" / "alexnet")


def torchvision_root() -> Path:
    """The folder torchvision's FashionMNIST reads (`FashionMNIST/raw/` inside it)."""
    return cache_dir() / "fashion-mnist"


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


_MD5_SEEN: dict[tuple[str, int, int], str] = {}


def file_md5(path: Path) -> str:
    """A file's MD5, remembered by this process while the file keeps its size and modification time:
    one run checks its data several times (before the run, loading each split, recording it)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _MD5_SEEN:
        _MD5_SEEN[key] = _md5(path.read_bytes())
    return _MD5_SEEN[key]


def checksums(root: Path) -> dict[str, str]:
    """The MD5 of each of the four files the loaders read under `root` (a torchvision root, as
    `prepare` returns it), by file name."""
    return {name: file_md5(root / "FashionMNIST" / "raw" / name) for name in FILES}


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz", folder / "FashionMNIST" / "raw" / name,
                      folder / "FashionMNIST" / "raw" / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _verified_bytes(path: Path, name: str) -> bytes:
    """The uncompressed content of `path`, or a UsageError naming the file and the fix."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"data: cannot read {path} ({e.strerror}): {FIX}") from None
    if path.suffix == ".gz":
        if _md5(data) == GZ_MD5[name]:
            return gzip.decompress(data)
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:
            raise UsageError(f"data: {path} is corrupt ({e}): {FIX}") from None
    if _md5(data) != RAW_MD5[name]:
        raise UsageError(f"data: {path} is corrupt (MD5 {_md5(data)}, expected {RAW_MD5[name]}): {FIX}")
    return data


def source_dirs(data_dir: str = "") -> list[tuple[str, Path, bool]]:
    """The places searched, in order, as (what, folder, named by the user)."""
    dirs = []
    if data_dir:
        dirs.append(("data_dir", Path(data_dir).expanduser(), True))
    if os.environ.get("ALEXNET_DATA_DIR"):
        dirs.append(("$ALEXNET_DATA_DIR", Path(os.environ["ALEXNET_DATA_DIR"]).expanduser(), True))
    dirs.append(("Debian's dataset-fashion-mnist", DEBIAN_DIR, False))
    return dirs


def prepare(data_dir: str = "") -> Path | None:
    """Find and verify the four files; return the torchvision root holding them in `FashionMNIST/raw/`,
    or None where no folder holds them (then only torchvision's download is left). A folder the user
    named (`data_dir`, `$ALEXNET_DATA_DIR`) must hold them: its absence is an error, not a fallback."""
    root = torchvision_root()
    raw = root / "FashionMNIST" / "raw"
    for what, folder, named in source_dirs(data_dir):
        found = {name: _find(folder, name) for name in FILES}
        if not any(found.values()):
            if named:
                state = "holds no Fashion-MNIST files" if folder.is_dir() else "does not exist"
                raise UsageError(f"data: {folder} ({what}) {state} (want {FILES[0]}[.gz] and the other three): "
                                 f"fix {what}, or leave it empty to use Debian's dataset-fashion-mnist")
            continue
        for name, path in found.items():
            if path is None:
                raise UsageError(f"data: {name}(.gz) is missing from {folder} ({what}): {FIX}")
        for name, path in found.items():
            # The copy stands for this very source file (path, size, mtime), verified when it was made:
            # a source replaced, even by an older or damaged file, is verified again, never passed over.
            target, stamp_file = raw / name, raw / f".{name}.source"
            info = path.stat()
            stamp = f"{path.resolve()}\n{info.st_size}\n{info.st_mtime_ns}\n"
            if target.is_file() and stamp_file.is_file() and stamp_file.read_text(errors="replace") == stamp \
                    and file_md5(target) == RAW_MD5[name]:
                continue
            content = _verified_bytes(path, name)
            try:
                raw.mkdir(parents=True, exist_ok=True)
                files.write_bytes(target, content)
                files.write_bytes(stamp_file, stamp.encode())
            except OSError as e:
                raise UsageError(f"data: cannot write the verified copy to {raw} ({e.strerror}): "
                                 f"set ALEXNET_CACHE_DIR to a writable folder") from None
        return root
    return None


def origin(data_dir: str = "") -> str:
    """Where the files `prepare` uses come from: the first folder that holds them, else the download."""
    for _, folder, _ in source_dirs(data_dir):
        if any(_find(folder, name) for name in FILES):
            return str(folder.resolve())
    return DOWNLOAD_URL


def searched(data_dir: str = "") -> str:
    return ", ".join(str(folder) for _, folder, _ in source_dirs(data_dir))
