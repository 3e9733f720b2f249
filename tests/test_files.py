"""alexnet/files.py: a file is replaced whole or not at all, and no temporary file is left either way."""

import pytest

from alexnet import files


def test_write_bytes_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    files.write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_an_error_mid_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), files.atomic_open(path) as fh:
        fh.write(b"half of the new")
        assert len(list(tmp_path.glob(".a.bin.*.tmp"))) == 1  # written beside it, under a hidden name
        raise RuntimeError("killed")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_replacing_gives_a_path_with_the_suffix_a_writer_needs(tmp_path):
    path = tmp_path / "curves.png"
    with files.replacing(path, suffix=".png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".curves.png.") and tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    assert path.read_bytes() == b"png" and not list(tmp_path.glob(".*"))
