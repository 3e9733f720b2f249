"""Real Fashion-MNIST: found, MD5-verified, loaded; subsets; resize parity with the chapter's pipeline.
The real files come from wherever this machine has them: `$ALEXNET_DATA_DIR`, else Debian's package."""

import gzip
import os
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision import transforms

from alexnet import UsageError
from alexnet.training import data, datafiles

DEBIAN = datafiles.DEBIAN_DIR
SOURCE = Path(os.environ.get("ALEXNET_DATA_DIR") or DEBIAN)  # the real files, as this machine has them


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALEXNET_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def copy_dir(tmp_path):
    """The four real files, gzipped, in a folder of the test's own."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in datafiles.FILES:
        found = datafiles._find(SOURCE, name)
        content = found.read_bytes()
        (folder / f"{name}.gz").write_bytes(content if found.suffix == ".gz" else gzip.compress(content))
    return folder


def test_real_data_loads_with_the_known_first_labels(cache):
    train = data.load(train=True)
    test = data.load(train=False)
    assert tuple(train.data.shape) == (60000, 28, 28) and train.data.dtype == torch.uint8
    assert tuple(test.data.shape) == (10000, 28, 28)
    assert train.targets[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert torch.bincount(train.targets).tolist() == [6000] * 10


def test_data_dir_wins_and_uncompressed_files_are_accepted(cache, tmp_path, copy_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in datafiles.FILES:
        (raw / name).write_bytes(gzip.decompress((copy_dir / f"{name}.gz").read_bytes()))
    assert [what for what, _, _ in datafiles.source_dirs(str(raw))][0] == "data_dir"
    assert len(data.load(str(raw), train=False)) == 10000


def test_env_var_is_searched_before_debian(cache, copy_dir, monkeypatch):
    monkeypatch.setenv("ALEXNET_DATA_DIR", str(copy_dir))
    assert [(f, named) for _, f, named in datafiles.source_dirs()] == [(copy_dir, True), (DEBIAN, False)]


@pytest.mark.parametrize("state", ["empty", "missing"])
def test_a_named_folder_without_the_data_is_an_error_not_a_fallback(cache, tmp_path, monkeypatch, state):
    """A data_dir (or $ALEXNET_DATA_DIR) the user names is never silently replaced by another source."""
    folder = tmp_path / "nothing-here"
    if state == "empty":
        folder.mkdir()
    with pytest.raises(UsageError, match=f"data: {folder} \\(data_dir\\) " +
                       ("holds no Fashion-MNIST files" if state == "empty" else "does not exist")):
        data.load(str(folder))
    monkeypatch.setenv("ALEXNET_DATA_DIR", str(folder))
    with pytest.raises(UsageError, match=r"\(\$ALEXNET_DATA_DIR\)"):
        datafiles.prepare()


def test_the_md5_table_is_torchvisions():
    assert datafiles.GZ_MD5 == {url.removesuffix(".gz"): md5 for url, md5 in torchvision.datasets.FashionMNIST.resources}


def test_a_truncated_file_is_refused_naming_the_file_and_the_fix(cache, copy_dir):
    path = copy_dir / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: 100_000])
    with pytest.raises(UsageError) as e:
        data.load(str(copy_dir), train=False)
    message = str(e.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "corrupt" in message and "reinstall" in message
    assert "\n" not in message


def test_a_changed_byte_fails_the_md5_check(cache, tmp_path, copy_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in datafiles.FILES:
        (raw / name).write_bytes(gzip.decompress((copy_dir / f"{name}.gz").read_bytes()))
    labels = bytearray((raw / "train-labels-idx1-ubyte").read_bytes())
    labels[100] = (labels[100] + 1) % 10
    (raw / "train-labels-idx1-ubyte").write_bytes(bytes(labels))
    with pytest.raises(UsageError, match=r"train-labels-idx1-ubyte is corrupt \(MD5"):
        data.load(str(raw))


def test_a_source_file_replaced_by_an_older_damaged_one_is_checked_again_not_passed_over(cache, copy_dir):
    """The verified copy in the cache is newer than the damaged file now in the named folder: still refused."""
    assert data.load(str(copy_dir), train=False).targets[:3].tolist() == [9, 2, 1]
    path = copy_dir / "t10k-labels-idx1-ubyte.gz"
    labels = bytearray(gzip.decompress(path.read_bytes()))
    labels[100] = (labels[100] + 1) % 10
    path.write_bytes(gzip.compress(bytes(labels)))
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # 2001: older than the copy in the cache
    with pytest.raises(UsageError, match=r"t10k-labels-idx1-ubyte.gz is corrupt \(MD5"):
        data.load(str(copy_dir), train=False)


def test_a_missing_file_is_named(cache, copy_dir):
    (copy_dir / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UsageError, match="train-labels-idx1-ubyte.*missing"):
        data.load(str(copy_dir))


def test_a_corrupt_cache_is_rebuilt_from_the_source(cache):
    data.load(train=False)
    cached = cache / "fashion-mnist" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    cached.write_bytes(b"garbage")
    assert data.load(train=False).targets[:3].tolist() == [9, 2, 1]


def test_balanced_subset_is_deterministic_and_class_balanced():
    labels = data.load(train=True).targets
    idx = data.balanced_subset(labels, 1005)
    assert len(idx) == 1005 and torch.equal(idx, data.balanced_subset(labels, 1005))
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert len(idx.unique()) == 1005
    assert torch.equal(data.balanced_subset(labels, 0), torch.arange(60000))


@pytest.mark.parametrize("resize", [224, 67])
def test_device_resize_matches_the_chapters_resize_totensor_within_1_255(resize):
    """The chapter's d2l.load_data_fashion_mnist: transforms.Resize(resize) then ToTensor on PIL images."""
    test = data.load(train=False)
    chapter = transforms.Compose([transforms.Resize(resize), transforms.ToTensor()])
    images = test.data[:200]
    ours = data.resize_batch(images, resize)
    theirs = torch.stack([chapter(transforms.functional.to_pil_image(img)) for img in images])
    assert ours.shape == theirs.shape == (200, 1, resize, resize)
    assert (ours - theirs).abs().max().item() <= 1 / 255 + 1e-6


def test_device_batches_cover_the_subset_once_per_epoch():
    test = data.load(train=False)
    split = data.DeviceData(test, data.balanced_subset(test.targets, 300), torch.device("cpu"))
    seen = torch.cat([y for _, y in split.batches(128, 67, data.epoch_generator(0, 1))])
    assert len(seen) == 300 and torch.equal(seen.sort().values, split.labels.sort().values)
    first = [y for _, y in split.batches(128, 67, data.epoch_generator(0, 1))][0]
    again = [y for _, y in split.batches(128, 67, data.epoch_generator(0, 1))][0]
    other = [y for _, y in split.batches(128, 67, data.epoch_generator(0, 2))][0]
    assert torch.equal(first, again) and not torch.equal(first, other)
