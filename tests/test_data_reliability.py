"""Bad datalists and data-tool inputs: atomic datalist writes, non-finite rates, leakage, relative folders, entries
of the wrong type, paths leaving the data folder, untrained modalities, and `dmaf synthetic` over real data."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from dmaf_components.data import DMAFDataError, build_datalist, load_datalist, synthesize_brats, synthesize_myops
from dmaf_components.data import write_datalist
from dmaf_components.data.synthetic import SYNTHETIC_RECORD

from test_cli import _run  # the dmaf command line run in-process: (exit status, stdout, stderr)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Four tiny BraTS cases; the datalist (2/1/1) has every modality in both training cases."""
    root = tmp_path_factory.mktemp("tiny")
    synthesize_brats(str(root), cases=4, shape=(16, 16, 8))
    return root


def _datalist(tiny):
    return build_datalist(str(tiny), "brats", split=(2, 1, 1), missing_rates=[0.0] * 4)


def _write(tiny, datalist, name="dl.json"):
    path = tiny / name
    path.write_text(json.dumps(datalist))
    return path


def _tree(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


# ----------------------------------------------------------------------------------------------- a: atomic writes
def test_failed_datalist_write_keeps_the_old_file_byte_identical(tiny, tmp_path, monkeypatch, capsys):
    path = tmp_path / "datalist.json"
    old = _datalist(tiny)
    write_datalist(old, str(path))
    before = path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's private 0600

    def full_disk(obj, f, **kwargs):
        f.write('{"name": "half a dat')  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("dmaf_components.data.datalist.json.dump", full_disk)
    new = dict(old, seed=5)
    with pytest.raises(DMAFDataError) as info:
        write_datalist(new, str(path), overwrite=True)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot write the datalist (OSError: No space left on device)")
    assert "\n" not in message
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["datalist.json"]  # no temporary file left
    code, out, err = _run(
        ["datalist", "brats", str(tiny), "--split", "2,1,1", "--output", str(path), "--overwrite", "--no_check"], capsys
    )
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["datalist.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------- b: rates
@pytest.mark.parametrize("rates", ["t1=nan", "t1=inf", "flair=-inf,t2=0.5", "0.2,nan,0.4,0.8", "t1=1.0", "t1=abc"])
def test_non_finite_or_out_of_range_rates_are_one_line(tiny, tmp_path, rates, capsys):
    out = tmp_path / "dl.json"
    for exact in (["--exact"], []):  # --exact first: before the fix it crashed where the default looped forever
        code, stdout, err = _run(
            ["datalist", "brats", str(tiny), "--missing_rates", rates, "--output", str(out), "--no_check"] + exact,
            capsys,
        )
        assert code == 2 and stdout == "" and err.count("\n") == 1, err
        assert err.startswith("dmaf: error: --missing_rates: ") and "a missing rate must be a number in [0, 1)" in err
        assert not out.exists()


@pytest.mark.slow
def test_library_refuses_nan_rates_instead_of_looping():
    code = (
        "from dmaf_components.data.datalist import idt_masks\n"
        "for exact in (False, True):\n"
        "    try:\n"
        "        idt_masks(5, [float('nan'), 0.2, 0.4, 0.8], exact=exact)\n"
        "    except ValueError as exc:\n"
        "        print(type(exc).__name__, exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("DMAFDataError missing rates must each lie in [0, 1), got [nan, 0.2, 0.4, 0.8]") == 2


# ----------------------------------------------------------------------------------------------- c: leakage
def test_case_in_training_and_testing_is_an_error(tiny, capsys):
    dl = _datalist(tiny)
    dl["testing"].append(dl["training"][0])
    dl["training"].append(dict(dl["training"][1]))
    path = _write(tiny, dl, "leak.json")
    code, out, err = _run(["check", str(tiny), "--datalist", str(path)], capsys)
    first, second = dl["training"][0]["case"], dl["training"][1]["case"]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 1 and sorted(errors) == sorted(
        [
            f"error: {first}: {path}: listed in two sections: training[0] and testing[1] "
            "(a case belongs to one section, once: a case both trained and evaluated on inflates the results)",
            f"error: {second}: {path}: listed twice in training: training[1] and training[2] (a case belongs to one "
            "section, once: a case both trained and evaluated on inflates the results)",
        ]
    ), out
    with pytest.raises(
        DMAFDataError,
        match=rf"leak.json: case {second} listed twice in training: training\[1\] and "
        r"training\[2\]",
    ):
        load_datalist(str(path), "testing")
    dl["training"].pop()
    with pytest.raises(
        DMAFDataError,
        match=rf"leak2.json: case {first} listed in two sections: training\[0\] and "
        r"testing\[1\]",
    ):
        load_datalist(str(_write(tiny, dl, "leak2.json")), "training")


# ----------------------------------------------------------------------------------------------- d: relative folder
def test_check_of_a_relative_folder(tiny, monkeypatch, capsys):
    write_datalist(_datalist(tiny), str(tiny / "datalist.json"), overwrite=True)
    monkeypatch.chdir(tiny.parent)
    code, out, _ = _run(["check", tiny.name], capsys)
    assert code == 0 and out.strip().splitlines()[-1] == "checked 4 cases (20 files): no problem found", out
    monkeypatch.chdir(tiny)
    entries = load_datalist("datalist.json", "training", ".")
    assert all(os.path.isabs(p) and os.path.isfile(p) for e in entries for p in e["image"].values())


# ----------------------------------------------------------------------------------------------- e: wrong types
def test_entries_of_the_wrong_type_are_errors_naming_entry_and_field(tiny, capsys):
    dl = _datalist(tiny)
    good = dl["training"][0]
    dl["training"] += [
        "BraTS20_Training_009",
        dict(good, case="num_image", image=5),
        dict(good, case="short_mask", modality_mask=[1, 1, 0]),
        dict(good, case="empty_mask", modality_mask=[0, 0, 0, 0]),
        dict(good, case="two_mask", modality_mask=[1, 2, 0, 1]),
        dict(good, case="num_label", label=7),
    ]
    path = _write(tiny, dl, "types.json")
    code, out, _ = _run(["check", str(tiny), "--datalist", str(path)], capsys)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 1 and errors == [
        f"error: training[2]: {path}: training[2]: is str 'BraTS20_Training_009'; expected an object with 'image' "
        "(and 'label', 'case')",
        f"error: num_image: {path}: training[3]: image is int 5; expected a path, a list of paths or "
        "{modality: path}",
        f"error: short_mask: {path}: training[4]: modality_mask [1, 1, 0] has 3 flags; expected 4 (flair, t1, "
        "t1ce, t2)",
        f"error: empty_mask: {path}: training[5]: modality_mask [0, 0, 0, 0] marks every modality missing; a case "
        "needs at least one",
        f"error: two_mask: {path}: training[6]: modality_mask is list [1, 2, 0, 1]; expected a list of 0/1 flags, "
        "one per modality (flair, t1, t1ce, t2)",
        f"error: num_label: {path}: training[7]: label is int 7; expected a path",
    ], out
    with pytest.raises(DMAFDataError, match=r"types.json: training\[2\]: is str 'BraTS20_Training_009'"):
        load_datalist(str(path), "validation")


# ----------------------------------------------------------------------------------------------- f: escaping paths
def test_relative_paths_may_not_leave_the_data_folder(tiny, tmp_path, capsys):
    dl = _datalist(tiny)
    entry = dl["training"][0]
    entry["image"]["flair"] = "../../../../etc/passwd"
    outside = tmp_path / "elsewhere_t1.nii.gz"  # an absolute path outside the folder is allowed
    outside.write_bytes((tiny / entry["image"]["t1"]).read_bytes())
    entry["image"]["t1"] = str(outside)
    path = _write(tiny, dl, "escape.json")
    code, out, _ = _run(["check", str(tiny), "--datalist", str(path)], capsys)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 1 and errors == [
        f"error: {entry['case']}: {path}: training[0]: path '../../../../etc/passwd' leaves the data folder {tiny}; "
        "relative paths must stay inside it (give an absolute path to use a file elsewhere)"
    ], out
    with pytest.raises(
        DMAFDataError,
        match=r"escape.json: training\[0\] \(BraTS20_Training_\d+\): path "
        r"'../../../../etc/passwd' leaves the data folder",
    ):
        load_datalist(str(path), "training")
    entry["image"]["flair"] = "MICCAI_BraTS2020_TrainingData/../" + dl["training"][1]["image"]["flair"]  # stays in
    loaded = load_datalist(str(_write(tiny, dl, "inside.json")), "training")
    assert loaded[0]["image"]["t1"] == str(outside) and os.path.isfile(loaded[0]["image"]["flair"])


# ----------------------------------------------------------------------------------------------- g: untrained
def test_modality_in_no_training_case_is_a_warning(tiny, capsys):
    dl = _datalist(tiny)
    for entry in dl["training"]:
        entry["modality_mask"] = [1, 1, 1, 0]
    dl["training"][0]["image"].pop("t1")  # a modality without a file in the one case that keeps it
    dl["training"][1]["modality_mask"] = [1, 0, 1, 0]
    path = _write(tiny, dl, "untrained.json")
    code, out, _ = _run(["check", str(tiny), "--datalist", str(path)], capsys)
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert code == 0 and warnings == [
        f"warning: training: {path}: t1 is missing from every training case (realised missing rate 1.000): the model "
        "is never trained on t1",
        f"warning: training: {path}: t2 is missing from every training case (realised missing rate 1.000): the model "
        "is never trained on t2",
    ], out
    assert "0 error(s), 2 warning(s) (2 about the datalist as a whole)" in out


# ----------------------------------------------------------------------------------------------- h: synthetic
def _real_brats_case(root):
    """A case folder as the real release has it: uncompressed files, case 355's label name."""
    folder = root / "MICCAI_BraTS2020_TrainingData" / "BraTS20_Training_001"
    folder.mkdir(parents=True)
    data = (np.arange(8 * 8 * 8).reshape(8, 8, 8) % 7).astype(np.int16)
    for m in ("flair", "t1", "t1ce", "t2"):
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(folder / f"BraTS20_Training_001_{m}.nii"))
    nib.save(nib.Nifti1Image(data % 3, np.eye(4)), str(folder / "W39_1998.09.19_Segm.nii"))
    return folder


def test_synthetic_refuses_a_real_case_folder_and_writes_nothing(tmp_path, capsys):
    folder = _real_brats_case(tmp_path)
    before = _tree(tmp_path)
    code, out, err = _run(["synthetic", "brats", str(tmp_path), "--cases", "2", "--shape", "8,8,8"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"dmaf: error: {folder}/BraTS20_Training_001_flair.nii: not written by dmaf synthetic")
    assert _tree(tmp_path) == before  # nothing replaced, no case 002, no record
    # files of the names synthetic writes, but no record that it wrote them: kept, also with --overwrite
    for f in folder.iterdir():
        f.unlink()
    for m in ("flair", "t1", "t1ce", "t2"):
        (folder / f"BraTS20_Training_001_{m}.nii.gz").write_bytes(b"real image")
    before = _tree(tmp_path)
    code, _, err = _run(["synthetic", "brats", str(tmp_path), "--cases", "1", "--shape", "8,8,8"], capsys)
    assert (
        code == 2
        and f"{folder}/BraTS20_Training_001_flair.nii.gz: would be overwritten, and there is no record" in err
        and _tree(tmp_path) == before
    )


def test_synthetic_reuses_and_rewrites_its_own_cases(tmp_path, capsys):
    folders = synthesize_brats(str(tmp_path), cases=2, shape=(8, 8, 8))
    record = json.loads((tmp_path / SYNTHETIC_RECORD).read_text())["files"]
    assert len(record) == 10 and all((tmp_path / f).is_file() for f in record)
    before = _tree(tmp_path)
    synthesize_brats(str(tmp_path), cases=2, shape=(8, 8, 8))  # reused: nothing written
    assert _tree(tmp_path) == before
    seg = os.path.join(folders[1], "BraTS20_Training_002_seg.nii.gz")
    os.remove(seg)  # a killed run: the record lists the case, its label is missing
    synthesize_brats(str(tmp_path), cases=2, shape=(8, 8, 8))
    assert _tree(tmp_path) == before
    synthesize_brats(str(tmp_path), cases=2, shape=(8, 8, 8), seed=3, overwrite=True)  # its own files: replaced
    assert _tree(tmp_path) != before and set(_tree(tmp_path)) == set(before)
    # a complete case written before there was a record is reused, never replaced
    os.remove(tmp_path / SYNTHETIC_RECORD)
    before = _tree(tmp_path)
    synthesize_brats(str(tmp_path), cases=2, shape=(8, 8, 8))
    assert _tree(tmp_path) == before
    with pytest.raises(DMAFDataError, match="would be overwritten, and there is no record"):
        synthesize_brats(str(tmp_path), cases=2, shape=(8, 8, 8), overwrite=True)
    assert _tree(tmp_path) == before


def test_synthetic_myops_refuses_files_it_did_not_write(tmp_path):
    synthesize_myops(str(tmp_path), cases=2, shape=(16, 16, 2))
    (tmp_path / "train25" / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    with pytest.raises(DMAFDataError, match=r"train25/notes.txt: not written by dmaf synthetic"):
        synthesize_myops(str(tmp_path), cases=3, shape=(16, 16, 2))  # case 103 would go next to notes.txt
    assert _tree(tmp_path) == before
    synthesize_myops(str(tmp_path), cases=2, shape=(16, 16, 2))  # nothing to write: the two cases are reused
    (tmp_path / "train25" / "notes.txt").unlink()
    (tmp_path / "train25" / "myops_training_103_C0.nii.gz").write_bytes(b"real image")
    before = _tree(tmp_path)
    with pytest.raises(DMAFDataError, match=r"train25/myops_training_103_C0.nii.gz: would be overwritten"):
        synthesize_myops(str(tmp_path), cases=3, shape=(16, 16, 2))
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("cases", ["2.5", "0", "two"])
def test_synthetic_cases_must_be_a_whole_number(tmp_path, cases, capsys):
    code, out, err = _run(["synthetic", "brats", str(tmp_path / "s"), "--cases", cases], capsys)
    assert code == 2 and err.count("\n") == 1 and "--cases: need a whole number of at least 1, got " in err, err
    assert not (tmp_path / "s").exists()
    with pytest.raises(DMAFDataError, match="--cases: need a whole number of at least 1, got 2.5"):
        synthesize_brats(str(tmp_path / "s"), cases=2.5, shape=(8, 8, 8))
    assert not (tmp_path / "s").exists()
