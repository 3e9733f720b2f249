"""Fashion-MNIST loaded for training: torchvision's dataset over the verified files
(`alexnet/training/datafiles.py` finds and checks them), class-balanced subsets, and batches for the two pipelines.

Fast pipeline: the uint8 images stay on the training device; each batch is gathered, scaled to [0, 1]
and resized there (bilinear, half-pixel centres), which matches the chapter's PIL `Resize` +
`ToTensor` within 1/255. Book pipeline: the chapter's own `DataLoader` over the torchvision dataset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms

from alexnet import UsageError
from alexnet.training import datafiles


def prepare(data_dir: str = ""):
    """The torchvision root holding the verified files: found on disk (`datafiles.prepare`), else
    downloaded by torchvision (it checks its own MD5s), where there is internet."""
    root = datafiles.prepare(data_dir)
    if root is not None:
        return root
    root = datafiles.torchvision_root()
    try:
        torchvision.datasets.FashionMNIST(root, train=True, download=True)
        torchvision.datasets.FashionMNIST(root, train=False, download=True)
    except Exception as e:  # no network, a proxy, a mirror down: all mean the same to the user
        raise UsageError(f"data: Fashion-MNIST not found in {datafiles.searched(data_dir)} and the download failed "
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


def split_train_val(labels: torch.Tensor, val_size: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, validation) indices of the training set: `val_size` images held out, classes as equal
    as possible, drawn at random with `split_seed` alone; the rest, in dataset order, for training.
    `val_size = 0` holds nothing out: every index is a training index, as in the chapter."""
    if val_size <= 0:
        return torch.arange(len(labels)), torch.arange(0)
    shuffled = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    val = shuffled[balanced_subset(labels[shuffled], val_size)].sort().values  # the first k of each class, shuffled
    held_out = torch.zeros(len(labels), dtype=torch.bool)
    held_out[val] = True
    return (~held_out).nonzero().squeeze(1), val


def split_indices(cfg, train_labels: torch.Tensor, test_labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The images a config trains, validates and tests on, as indices into torchvision's training and
    test sets: {"train", "validation", "test"}. The validation split is fixed by (val_size, split_seed)
    and never overlaps the training images; `train_limit` then picks a class-balanced subset of the
    training images that remain (with val_size = 0: exactly the chapter's selection)."""
    train, val = split_train_val(train_labels, cfg.val_size, cfg.split_seed)
    train = train[balanced_subset(train_labels[train], cfg.train_limit)]
    return {"train": train, "validation": val, "test": balanced_subset(test_labels, cfg.test_limit)}


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
    """Some images of a split, held on the device as uint8 (55 MB for the full training set)."""

    def __init__(self, dataset, indices: torch.Tensor, device: torch.device):
        self.images = dataset.data[indices].to(device)
        self.labels = dataset.targets[indices].to(device)

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


def book_loader(dataset, indices: torch.Tensor, batch_size: int, shuffle: torch.Generator | None, num_workers: int):
    """The chapter's `d2l.load_data_fashion_mnist(batch_size, resize)`: a DataLoader over the images
    `indices` of the torchvision dataset built with `book_transform`, PIL Resize + ToTensor in worker
    processes."""
    subset = torch.utils.data.Subset(dataset, indices.tolist())
    # Unshuffled (evaluation) it still gets a generator of its own: the DataLoader would otherwise draw
    # its workers' base seed from the global RNG and shift the dropout masks of every later epoch.
    generator = shuffle if shuffle is not None else torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(subset, batch_size, shuffle=shuffle is not None, generator=generator,
                                       num_workers=num_workers, persistent_workers=False)


def book_transform(resize: int):
    return transforms.Compose([transforms.Resize(resize), transforms.ToTensor()])


class Splits:
    """A config's three splits as batches for either pipeline: `batches("train", epoch)` shuffled for
    that epoch, `batches("validation")` and `batches("test")` in order, at the evaluation batch size.
    The validation images come from the training set; `sizes` says how many images each split has."""

    def __init__(self, cfg, device: torch.device, eval_batch_size: int, channels_last: bool):
        self.cfg, self.eval_batch_size, self.channels_last = cfg, eval_batch_size, channels_last
        self.fast = cfg.pipeline == "fast"
        transform = None if self.fast else book_transform(cfg.resize)
        self.sets = {"train": load(cfg.data_dir, train=True, transform=transform),
                     "test": load(cfg.data_dir, train=False, transform=transform)}
        self.sets["validation"] = self.sets["train"]
        self.indices = split_indices(cfg, self.sets["train"].targets, self.sets["test"].targets)
        self.sizes = {name: len(idx) for name, idx in self.indices.items()}
        if self.fast:
            self.on_device = {name: DeviceData(self.sets[name], idx, device) for name, idx in self.indices.items()}

    def batches(self, split: str, epoch: int | None = None):
        cfg = self.cfg
        shuffle = epoch_generator(cfg.seed, epoch) if split == "train" else None
        batch_size = cfg.batch_size if split == "train" else self.eval_batch_size
        if self.fast:
            return self.on_device[split].batches(batch_size, cfg.resize, shuffle, self.channels_last)
        return book_loader(self.sets[split], self.indices[split], batch_size, shuffle, cfg.num_workers)
