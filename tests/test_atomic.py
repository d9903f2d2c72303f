"""Files replaced whole or not at all: the one implementation behind every writer (data/atomic.py)."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from dmaf_components.data.atomic import atomic_replace
from dmaf_components.data.constants import DMAFDataError
from dmaf_components.outputs import atomic_write


def _full_disk(kind: str):
    """A writer of the given kind that writes part of the file, then finds the disk full."""

    def write(target) -> None:
        if kind == "path":
            with open(target, "wb") as f:
                f.write(b"\x1f\x8b partial")
        else:
            target.write(b"partial" if kind == "binary" else "partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


@pytest.mark.parametrize("kind", ["text", "binary", "path"])
def test_a_failed_write_keeps_the_earlier_file_and_leaves_no_temporary_file(tmp_path, kind):
    target = tmp_path / "result.nii.gz"
    target.write_bytes(b"earlier")
    target.chmod(0o640)
    with pytest.raises(OSError, match="No space left on device"):
        atomic_replace(str(target), _full_disk(kind), binary=kind == "binary", by_path=kind == "path")
    assert target.read_bytes() == b"earlier" and os.listdir(tmp_path) == ["result.nii.gz"]
    seen = []

    def write(path) -> None:  # by name: the temporary file is hidden, beside the target, with its extension
        seen.append(os.path.basename(path))
        with open(path, "wb") as f:
            f.write(b"new")

    atomic_replace(str(target), write, by_path=True)
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["result.nii.gz"]
    assert seen[0].startswith(".result.nii.gz.tmp") and seen[0].endswith(".nii.gz")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # a replaced file keeps its mode


def test_a_new_file_gets_the_mode_of_any_new_file_and_errors_name_it(tmp_path):
    mask = os.umask(0o022)
    try:
        path = atomic_replace(str(tmp_path / "sub" / "record.json"), lambda f: f.write("{}"))
    finally:
        os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # not mkstemp's private 0600
    with pytest.raises(DMAFDataError) as info:
        atomic_write(path, _full_disk("text"), what="the record")
    assert str(info.value) == f"{path}: cannot write the record (No space left on device)"
    assert open(path).read() == "{}" and os.listdir(tmp_path / "sub") == ["record.json"]
    with pytest.raises(DMAFDataError, match="exists already; kept"):
        atomic_write(path, lambda f: f.write("[]"), overwrite=False)
