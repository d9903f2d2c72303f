"""`dmaf check` and the checks of `dmaf datalist`: every problem of a dataset at once, one line each."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dmaf_components.data import (
    BRATS_LABELS,
    MYOPS_RAW_LABEL_VALUES,
    build_datalist,
    check_datalist,
    label_values,
    synthesize_brats,
    synthesize_myops,
    write_datalist,
)

from test_cli import _run  # the dmaf command line run in-process: (exit status, stdout, stderr)

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"


@pytest.fixture(scope="module")
def clean_brats(tmp_path_factory):
    """Four tiny BraTS cases with a datalist (2/1/1: every section has a case; every modality in both training cases,
    so that no modality is untrained)."""
    root = tmp_path_factory.mktemp("clean_brats")
    synthesize_brats(str(root), cases=4, shape=(32, 32, 24))
    datalist = build_datalist(str(root), "brats", split=(2, 1, 1), missing_rates=[0.0] * 4)
    write_datalist(datalist, str(root / "datalist.json"))
    return root


def _file(root: Path, case: int, modality: str) -> Path:
    name = f"BraTS20_Training_{case:03d}"
    return root / "MICCAI_BraTS2020_TrainingData" / name / f"{name}_{modality}.nii.gz"


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, affine), str(path))


@pytest.fixture
def broken_brats(clean_brats, tmp_path):
    """The clean set with one problem per file: {file name: expected message}."""
    root = tmp_path / "broken"
    shutil.copytree(clean_brats, root)
    affine = nib.load(str(_file(root, 1, "t1"))).affine
    shape = (32, 32, 24)
    expected = {}

    raw = _file(root, 1, "t1").read_bytes()
    _file(root, 1, "t1").write_bytes(raw[: len(raw) // 2])
    expected["BraTS20_Training_001_t1.nii.gz"] = "cannot read"

    _file(root, 1, "flair").write_bytes(gzip.compress(b"not a NIfTI file" * 40))  # a renamed non-NIfTI
    expected["BraTS20_Training_001_flair.nii.gz"] = "not a readable NIfTI file (ImageFileError: "

    t2 = np.asarray(nib.load(str(_file(root, 2, "t2"))).dataobj).astype(np.float32)
    t2[5, 5, 5] = np.inf
    _save(t2, affine, _file(root, 2, "t2"))
    expected["BraTS20_Training_002_t2.nii.gz"] = "inf voxels"

    seg = np.asarray(nib.load(str(_file(root, 2, "seg"))).dataobj).copy()
    seg[0, 0, 0] = 3
    _save(seg, affine, _file(root, 2, "seg"))
    expected["BraTS20_Training_002_seg.nii.gz"] = "label values [3] outside the expected set [0, 1, 2, 4]"

    _save(_varied((30, 32, 24)), affine, _file(root, 3, "flair"))
    expected["BraTS20_Training_003_flair.nii.gz"] = "shape (30, 32, 24) differs from"

    shifted = affine.copy()
    shifted[0, 3] += 2.0
    _save(_varied(shape), shifted, _file(root, 3, "t1ce"))
    expected["BraTS20_Training_003_t1ce.nii.gz"] = "affine differs from"

    _save(_varied(shape[:2]), affine, _file(root, 4, "t1"))
    expected["BraTS20_Training_004_t1.nii.gz"] = "is 2-D (shape (32, 32))"

    _save(np.asarray(nib.load(str(_file(root, 1, "seg"))).dataobj), affine, _file(root, 1, "t1ce"))  # a mix-up
    expected["BraTS20_Training_001_t1ce.nii.gz"] = "distinct whole-number values (0, 2, 4): a label map or mask"

    huge = np.asarray(nib.load(str(_file(root, 3, "t2"))).dataobj).astype(np.float64)
    huge[5, 5, 5] = 1e300  # finite in the file, inf once the pipeline reads it as float32
    _save(huge, affine, _file(root, 3, "t2"))
    expected["BraTS20_Training_003_t2.nii.gz"] = "values up to 1e+300 in magnitude exceed float32's range"
    return root, expected


def _varied(shape):
    """An image with many levels and a zero background (a constant one, or one of a few whole-number levels, is
    itself an error; a non-zero background a warning)."""
    values = np.arange(int(np.prod(shape))) % 251
    values[: values.size // 4] = 0
    return values.reshape(shape).astype(np.int16)


def test_check_reports_every_problem_one_line_each(broken_brats, capsys):
    root, expected = broken_brats
    affine = nib.load(str(_file(root, 4, "t1ce"))).affine
    _save(np.zeros((32, 32, 24), np.int16), affine, _file(root, 4, "t1ce"))
    offset = np.asarray(nib.load(str(_file(root, 2, "flair"))).dataobj).astype(np.float32) + 10.0
    _save(offset, affine, _file(root, 2, "flair"))  # a warning: training still runs, BraTS inference refuses it
    code, out, err = _run(["check", str(root)], capsys)
    assert code == 1
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(expected), out
    for name, message in expected.items():
        lines = [line for line in errors if f"{name}: " in line]
        assert len(lines) == 1 and message in lines[0], (name, out)
        assert lines[0].startswith(f"error: {name[:20]}: ")  # names the case
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and "BraTS20_Training_002_flair.nii.gz: only 0.0% of the voxels are 0" in warnings[0]
    assert "BraTS20_Training_004_t1ce.nii.gz: is all zero" in warnings[1]
    assert "9 error(s), 2 warning(s) in 4 case(s)" in out
    assert err.strip().count("\n") == 0 and "9 error(s)" in err


def test_check_clean_sets_exit_0(clean_brats, tmp_path, capsys):
    code, out, _ = _run(["check", str(clean_brats)], capsys)
    assert code == 0 and "checked 4 cases (20 files): no problem found" in out
    # MyoPS: 2-D slices stored as 3-D with few slices, raw label values (0/200/500/600/1220/2221)
    synthesize_myops(str(tmp_path), cases=3, shape=(32, 32, 2))
    datalist = tmp_path / "other" / "dl.json"
    write_datalist(build_datalist(str(tmp_path), "myops", split=(1, 1, 1), missing_rates=[0.0] * 3), str(datalist))
    code, out, _ = _run(["check", str(tmp_path), "--datalist", str(datalist)], capsys)
    assert code == 0 and "checked 3 cases (12 files): no problem found" in out


def test_check_myops_label_values(tmp_path):
    synthesize_myops(str(tmp_path), cases=2, shape=(32, 32, 2))
    gd = tmp_path / "train25_myops_gd" / "myops_training_101_gd.nii.gz"
    label = np.asarray(nib.load(str(gd)).dataobj).copy()
    label[0, 0, 0] = 3  # a trained class index in a raw label file
    _save(label, nib.load(str(gd)).affine, gd)
    report = check_datalist(build_datalist(str(tmp_path), "myops", split=(1, 1, 0)), str(tmp_path), progress=False)
    assert [str(p) for p in report.errors] == [
        "error: myops_training_101: train25_myops_gd/myops_training_101_gd.nii.gz: label values [3] outside the "
        "expected set [0, 200, 500, 600, 1220, 2221]"
    ]


def test_label_sets_match_the_bundle():
    assert json.loads((CONFIGS / "train_myops.json").read_text())["label_values"] == list(MYOPS_RAW_LABEL_VALUES)
    assert json.loads((CONFIGS / "train.json").read_text())["label_values"] == list(BRATS_LABELS)


def test_label_values():
    lab = torch.zeros(4, 5, 6, dtype=torch.uint8)
    lab[0, 0, 0], lab[1, 1, 1] = 4, 2
    assert label_values(lab) == [0, 2, 4]
    assert label_values(lab.float()) == [0, 2, 4]
    assert label_values(torch.tensor([0.0, 0.5, 2.0])) == [0, 0.5, 2]  # non-integral: torch.unique
    assert label_values(torch.tensor([-3, 2221, 0], dtype=torch.int16)) == [-3, 0, 2221]
    assert label_values(torch.tensor([0, 10**6], dtype=torch.int32)) == [0, 10**6]  # wide range: torch.unique
    if hasattr(torch, "uint16"):
        assert label_values(torch.tensor([0, 1220, 2221], dtype=torch.int32).to(torch.uint16)) == [0, 1220, 2221]


def test_datalist_refuses_bad_data_and_no_check_skips(broken_brats, capsys):
    root, expected = broken_brats
    os.remove(root / "datalist.json")
    code, out, err = _run(["datalist", "brats", str(root), "--split", "2,1,1"], capsys)
    assert code == 1 and not (root / "datalist.json").exists()
    assert len([line for line in out.splitlines() if line.startswith("error: ")]) == len(expected)
    assert "not written" in err and "--no_check" in err
    code, out, err = _run(["datalist", "brats", str(root), "--split", "2,1,1", "--no-check"], capsys)
    assert code == 0 and (root / "datalist.json").exists() and "error:" not in out, err
