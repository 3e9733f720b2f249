"""Real Fashion-MNIST, found, verified and loaded; batches for the two pipelines.

Where the four IDX files come from, first match wins:
  1. the config's `data_dir`, 2. `$ALEXNET_DATA_DIR`, 3. Debian's `/usr/share/datasets/fashion-mnist`
  (package `dataset-fashion-mnist`), 4. torchvision's download, where there is internet.
Each file is checked: a `.gz` against torchvision's MD5 (`FashionMNIST.resources`) or, since Debian
recompresses the same bytes, its content against the MD5 of the original uncompressed file. The
verified files are unpacked once into the torchvision layout under `$ALEXNET_CACHE_DIR` (default
`~/.cache/alexnet`), where `torchvision.datasets.FashionMNIST` reads them.

Fast pipeline: the uint8 images stay on the training device; each batch is gathered, scaled to [0, 1]
and resized there (bilinear, half-pixel centres), which matches the chapter's PIL `Resize` +
`ToTensor` within 1/255. Book pipeline: the chapter's own `DataLoader` over the torchvision dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms

from alexnet import UsageError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
GZ_MD5 = {url.removesuffix(".gz"): md5 for url, md5 in torchvision.datasets.FashionMNIST.resources}
RAW_MD5 = {  # the uncompressed files inside torchvision's archives
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
FIX = "reinstall it (apt-get install --reinstall dataset-fashion-mnist) or point data_dir / ALEXNET_DATA_DIR at good copies"


def cache_dir() -> Path:
    return Path(os.environ.get("ALEXNET_CACHE_DIR") or Path.home() / ".cache" / "alexnet")


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz", folder / "FashionMNIST" / "raw" / name,
                      folder / "FashionMNIST" / "raw" / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _verified_bytes(path: Path, name: str) -> bytes:
    """The uncompressed content of `path`, or a UsageError naming the file and the fix."""
    data = path.read_bytes()
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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def source_dirs(data_dir: str = "") -> list[tuple[str, Path]]:
    """The places searched, in order, as (what, folder)."""
    dirs = []
    if data_dir:
        dirs.append(("data_dir", Path(data_dir).expanduser()))
    if os.environ.get("ALEXNET_DATA_DIR"):
        dirs.append(("$ALEXNET_DATA_DIR", Path(os.environ["ALEXNET_DATA_DIR"]).expanduser()))
    dirs.append(("Debian's dataset-fashion-mnist", DEBIAN_DIR))
    return dirs


def prepare(data_dir: str = "") -> Path:
    """Find and verify the four files; return a torchvision root holding them in `FashionMNIST/raw/`."""
    root = cache_dir() / "fashion-mnist"
    raw = root / "FashionMNIST" / "raw"
    for what, folder in source_dirs(data_dir):
        found = {name: _find(folder, name) for name in FILES}
        if not any(found.values()):
            continue
        for name, path in found.items():
            if path is None:
                raise UsageError(f"data: {name}(.gz) is missing from {folder} ({what}): {FIX}")
        for name, path in found.items():
            target = raw / name
            if target.is_file() and target.stat().st_mtime >= path.stat().st_mtime \
                    and _md5(target.read_bytes()) == RAW_MD5[name]:
                continue
            content = _verified_bytes(path, name)
            raw.mkdir(parents=True, exist_ok=True)
            _write_atomic(target, content)
        return root
    # Nothing on disk: torchvision's download (checks its own MD5s), where there is internet.
    try:
        torchvision.datasets.FashionMNIST(root, train=True, download=True)
        torchvision.datasets.FashionMNIST(root, train=False, download=True)
    except Exception as e:  # no network, a proxy, a mirror down: all mean the same to the user
        searched = ", ".join(str(f) for _, f in source_dirs(data_dir))
        raise UsageError(f"data: Fashion-MNIST not found in {searched} and the download failed "
                         f"({type(e).__name__}): apt-get install dataset-fashion-mnist, or set ALEXNET_DATA_DIR") from None
    return root


def load(data_dir: str = "", train: bool = True, transform=None) -> torchvision.datasets.FashionMNIST:
    """torchvision's FashionMNIST over the verified files (`.data` uint8 Nx28x28, `.targets` int64)."""
    return torchvision.datasets.FashionMNIST(prepare(data_dir), train=train, transform=transform, download=False)


def balanced_subset(labels: torch.Tensor, limit: int) -> torch.Tensor:
    """Indices of `limit` examples, classes as equal as possible, deterministic (no seed): the k-th
    example of each class, in dataset order, for k = 0, 1, ... until `limit` are taken."""
    if limit <= 0 or limit >= len(labels):
        return torch.arange(len(labels))
    rank = torch.empty_like(labels)
    for c in labels.unique():
        where = (labels == c).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    order = torch.argsort(rank * 100 + labels, stable=True)  # by rank within class, then class
    return order[:limit].sort().values


def resize_batch(images_u8: torch.Tensor, resize: int) -> torch.Tensor:
    """uint8 Bx28x28 -> float Bx1xRxR in [0, 1]: `ToTensor` scaling, then bilinear like PIL `Resize`."""
    x = images_u8.unsqueeze(1).float().div_(255)
    if resize != x.shape[-1]:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False, antialias=False)
    return x


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Shuffling depends on (seed, epoch) alone, so a resumed run sees the same order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class DeviceData:
    """A split held on the device as uint8 (55 MB for the full training set)."""

    def __init__(self, dataset, limit: int, device: torch.device):
        idx = balanced_subset(dataset.targets, limit)
        self.images = dataset.data[idx].to(device)
        self.labels = dataset.targets[idx].to(device)

    def __len__(self):
        return len(self.labels)

    def batches(self, batch_size: int, resize: int, shuffle: torch.Generator | None = None,
                channels_last: bool = False):
        n = len(self.labels)
        order = None
        if shuffle is not None:
            # The book's DataLoader draws its workers' base seed from the generator, then its sampler a
            # permutation: drawing the same, both pipelines visit the same examples in the same order.
            torch.empty((), dtype=torch.int64).random_(generator=shuffle)
            order = torch.randperm(n, generator=shuffle).to(self.images.device)
        for start in range(0, n, batch_size):  # the last batch may be short, as with DataLoader
            idx = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
            x = resize_batch(self.images[idx], resize)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


def book_loader(dataset, limit: int, batch_size: int, shuffle: torch.Generator | None, num_workers: int):
    """The chapter's `d2l.load_data_fashion_mnist(batch_size, resize)`: a DataLoader over the
    torchvision dataset built with `book_transform`, PIL Resize + ToTensor in worker processes."""
    subset = torch.utils.data.Subset(dataset, balanced_subset(dataset.targets, limit).tolist())
    # Unshuffled (evaluation) it still gets a generator of its own: the DataLoader would otherwise draw
    # its workers' base seed from the global RNG and shift the dropout masks of every later epoch.
    generator = shuffle if shuffle is not None else torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(subset, batch_size, shuffle=shuffle is not None, generator=generator,
                                       num_workers=num_workers, persistent_workers=False)


def book_transform(resize: int):
    return transforms.Compose([transforms.Resize(resize), transforms.ToTensor()])
