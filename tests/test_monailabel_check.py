"""scripts/monailabel_check.py --work DIR deleted DIR (shutil.rmtree) before checking anything: it now empties only a
folder it made (its marker, or an earlier version's layout) and refuses any other non-empty folder, touching
nothing (the end-to-end check itself needs MONAI Label's environment: ``make monailabel-check``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "monailabel_check.py")


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("monailabel_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


@pytest.mark.slow
def test_a_folder_the_check_did_not_make_is_refused_and_kept(check, tmp_path):
    work = tmp_path / "data"
    (work / "studies").mkdir(parents=True)
    (work / "studies" / "patient1_flair.nii.gz").write_bytes(b"someone's data")
    (work / "notes.txt").write_text("keep me")
    before = _tree(work)
    with pytest.raises(
        ValueError,
        match=rf"^--work {work}: holds files this check did not make \(notes.txt, "
        r"studies\) and no \.dmaf_monailabel_check marker; nothing was deleted",
    ):
        check.prepare_work_dir(str(work))
    assert _tree(work) == before and (work / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        check.prepare_work_dir(str(tmp_path / "file"))
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--monailabel-python", str(tmp_path / "none" / "python"), "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"monailabel_check: error: --work {work}: holds files this check did not make (notes.txt, studies) and no "
        ".dmaf_monailabel_check marker; nothing was deleted: give a new or empty folder"
    ]
    assert _tree(work) == before


def test_a_new_empty_or_marked_folder_is_used_and_only_its_own_content_removed(check, tmp_path):
    work = tmp_path / "new" / "work"
    check.prepare_work_dir(str(work))
    assert os.listdir(work) == [check.WORK_MARKER]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    (work / "studies").mkdir()
    (work / "studies" / "s.nii.gz").write_bytes(b"x")
    os.symlink(outside, work / "link")  # a link inside is removed, never followed
    check.prepare_work_dir(str(work))  # the second run empties the marked folder
    assert os.listdir(work) == [check.WORK_MARKER] and _tree(outside) == ["precious.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    check.prepare_work_dir(str(empty))
    assert os.listdir(empty) == [check.WORK_MARKER]
    earlier = tmp_path / "earlier"  # made by the check before the marker existed
    (earlier / "apps" / "monaibundle").mkdir(parents=True)
    (earlier / "studies").mkdir()
    (earlier / "server.log").write_text("log")
    check.prepare_work_dir(str(earlier))
    assert os.listdir(earlier) == [check.WORK_MARKER]
    (earlier / "mine.txt").write_text("x")
    os.remove(earlier / check.WORK_MARKER)
    (earlier / "apps" / "monaibundle").mkdir(parents=True)
    (earlier / "studies").mkdir()
    with pytest.raises(ValueError, match=r"holds files this check did not make \(apps, mine.txt, studies\)"):
        check.prepare_work_dir(str(earlier))
    assert (earlier / "mine.txt").exists()
