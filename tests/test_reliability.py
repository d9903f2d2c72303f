"""Trustworthy inference inputs and outputs (issue 11 items 1-3 and 6): every bad input is a one-line error naming
the file, one bad study never aborts the batch, no result is ever lost or half-written, checkpoints of either kind
load and a misfit says which override fixes it."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from dmaf_components.data import BRATS_AFFINE, BRATS_MODALITIES, DMAFDataError, brats_case, find_studies

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
INFERENCE = os.path.join(BUNDLE, "configs", "inference.json")
SHAPE = (32, 32, 24)  # one 32^3 sliding window per study
NET = {"channels": (4, 8, 16, 32), "num_layers": 1, "num_heads": 2}
TINY = [
    "--roi_size",
    "[32,32,32]",
    "--channels",
    "[4,8,16,32]",
    "--num_layers",
    "1",
    "--num_heads",
    "2",
    "--num_workers",
    "0",
]


def _volume(seed=0):
    images, _ = brats_case(SHAPE, seed=seed)
    return images


def _study(folder, names, seed=0, corrupt=None):
    """A study folder: ``names`` maps modality -> file name; ``corrupt`` (modality, value) puts one bad voxel."""
    os.makedirs(folder, exist_ok=True)
    images = _volume(seed)
    for modality, name in names.items():
        data = images[modality].astype(np.float32)
        if corrupt and corrupt[0] == modality:
            data[4, 4, 4] = corrupt[1]
        nib.save(nib.Nifti1Image(data, BRATS_AFFINE), os.path.join(folder, name))
    return folder


def _net(**kw):
    from dmaf_components.networks import DMAFNet

    return DMAFNet(3, 4, 4, **{**NET, **kw})


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny randomly initialised network saved as a plain state dict and as a training checkpoint."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    net = _net()
    torch.save(net.state_dict(), root / "model.pt")
    optimizer = torch.optim.AdamW(net.parameters())
    torch.save(
        {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "trainer": {"iteration": 4}},
        root / "checkpoint_final.pt",
    )
    return root


def _workflow(dataset_dir, output_dir, checkpoint, **override):
    """The bundle's inference.json, in this process (num_workers 0)."""
    from monai.bundle import ConfigWorkflow

    params = {
        "roi_size": [32, 32, 32],
        "channels": list(NET["channels"]),
        "num_layers": 1,
        "num_heads": 2,
        "num_workers": 0,
        **override,
    }
    wf = ConfigWorkflow(
        config_file=INFERENCE,
        workflow_type="infer",
        logging_file=False,
        bundle_root=BUNDLE,
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        checkpoint=str(checkpoint),
        **params,
    )
    wf.initialize()
    return wf


# ------------------------------------------------------------------------------------------------ 1. inputs
def test_inf_and_nan_voxels_are_one_line_errors_naming_the_file(tmp_path):
    from dmaf_components.transforms import LoadModalitiesd

    loader = LoadModalitiesd("image", BRATS_MODALITIES)
    for value, word in ((np.inf, "inf"), (-np.inf, "inf"), (np.nan, "NaN")):
        folder = _study(tmp_path / word / str(value), {"flair": "s_flair.nii.gz"}, corrupt=("flair", value))
        path = os.path.join(folder, "s_flair.nii.gz")
        with pytest.raises(DMAFDataError, match=rf"s_flair.nii.gz: contains {word} voxels") as err:
            loader({"image": {"flair": path}})
        assert "\n" not in str(err.value) and path in str(err.value)


def test_two_dimensional_file_is_an_error_naming_the_file(tmp_path):
    from dmaf_components.transforms import LoadModalitiesd

    path = tmp_path / "s_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((32, 32), np.float32), np.eye(4)), str(path))
    with pytest.raises(DMAFDataError, match=r"s_t1.nii.gz: is a 2-D image \(shape \(32, 32\)\), expected a 3-D"):
        LoadModalitiesd("image", BRATS_MODALITIES)({"image": {"t1": str(path)}})


def test_anisotropic_spacing_is_a_warning_naming_the_file(tmp_path, caplog):
    from dmaf_components.transforms import LoadModalitiesd

    path = tmp_path / "thick_t2.nii.gz"
    nib.save(nib.Nifti1Image(_volume()["t2"].astype(np.float32), np.diag([1.0, 1.0, 5.0, 1.0])), str(path))
    with caplog.at_level(logging.WARNING, logger="dmaf_components.data.image_checks"):
        img = LoadModalitiesd("image", BRATS_MODALITIES, anisotropy_ratio=3.0)({"image": {"t2": str(path)}})["image"]
    assert img.shape == (4,) + SHAPE  # the grid as given
    assert any(str(path) in r.getMessage() and "anisotropic" in r.getMessage() for r in caplog.records)


def test_modality_names_of_real_releases_any_case_and_whitespace(tmp_path):
    from dmaf_components.data import modality_of

    expected = {
        "BraTS20_Training_001_t1ce.nii.gz": "t1ce",
        "BraTS2021_00000_T1CE.nii.gz": "t1ce",
        "BraTS-GLI-00000-000-t1n.nii.gz": "t1",
        "BraTS-GLI-00000-000-t1c.nii.gz": "t1ce",
        "BraTS-GLI-00000-000-t2w.nii.gz": "t2",
        "BraTS-GLI-00000-000-t2f.nii.gz": "flair",
        "s1_T1.nii.gz": "t1",
        "s1_t1Gd.nii.gz": "t1ce",
        "s1_t1ce .nii.gz": "t1ce",
        "FLAIR.nii": "flair",
        "p3 T2-FLAIR.NII.GZ": "flair",
        "p3_T2w.nii.gz": "t2",
        "x_T1c.nii.gz": "t1ce",
        "s1_seg.nii.gz": None,
        "s1_dwi.nii.gz": None,
    }
    assert {name: modality_of(name, BRATS_MODALITIES) for name in expected} == expected
    myops = ("bssfp", "lge", "t2")
    assert [modality_of(f"myops_training_101_{s}.nii.gz", myops) for s in ("C0", "de", "T2", "gd")] == [
        "bssfp",
        "lge",
        "t2",
        None,
    ]
    # the study: all four files are used, none silently dropped
    _study(
        tmp_path / "in" / "s1",
        {"t1": "s1_T1.nii.gz", "t1ce": "s1_t1Gd.nii.gz", "flair": " s1_FLAIR .nii.gz", "t2": "s1-t2w.nii.gz"},
    )
    (study,) = find_studies(str(tmp_path / "in"))
    assert sorted(study["image"]) == sorted(BRATS_MODALITIES) and "error" not in study and "notes" not in study


def test_unused_files_duplicates_and_unusable_folders_are_reported(tmp_path, caplog):
    root = tmp_path / "in"
    _study(root / "a", {"flair": "a_flair.nii.gz", "t2": "a_dwi.nii.gz"})  # a DWI file: no modality of the model
    _study(root / "b", {"t1ce": "b_t1c.nii.gz", "t1": "b_T1CE.nii.gz"})  # two files for T1ce
    (root / "c").mkdir()  # nothing usable
    (root / "c" / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="dmaf_components.data.studies"):
        studies = {s["case"]: s for s in find_studies(str(root))}
    assert set(studies) == {"a", "b", "c"}  # no study folder is skipped
    assert studies["a"]["image"] == {"flair": str(root / "a" / "a_flair.nii.gz")}
    assert any(
        str(root / "a" / "a_dwi.nii.gz") in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records
    )
    assert "a second file for t1ce" in studies["b"]["error"]
    assert studies["c"]["error"].startswith(str(root / "c") + ": no modality file (the folder holds notes.txt")


def test_datalist_uses_the_alias_table(tiny_brats, tmp_path):
    import shutil

    from dmaf_components.data import build_datalist

    root = tmp_path / "b"
    shutil.copytree(tiny_brats, root)
    case = root / "MICCAI_BraTS2020_TrainingData" / "BraTS20_Training_002"
    os.rename(case / "BraTS20_Training_002_t1ce.nii.gz", case / "BraTS20_Training_002_T1CE.nii.gz")
    os.rename(case / "BraTS20_Training_002_flair.nii.gz", case / "BraTS20_Training_002_FLAIR.nii.gz")
    dl = build_datalist(str(root), "brats", split=(4, 1, 1))
    entry = next(e for s in ("training", "validation", "testing") for e in dl[s] if e["case"] == "BraTS20_Training_002")
    assert entry["image"]["t1ce"].endswith("_T1CE.nii.gz") and entry["image"]["flair"].endswith("_FLAIR.nii.gz")


# ------------------------------------------------------------------------------------------------ checkpoints
def test_weights_load_from_a_state_dict_or_a_training_checkpoint(weights, tmp_path):
    from dmaf_components.checkpoints import load_model_weights

    reference = torch.load(weights / "model.pt", weights_only=True)
    torch.save({"model": {f"module.{k}": v for k, v in reference.items()}}, tmp_path / "ddp.pt")
    for path in (weights / "model.pt", weights / "checkpoint_final.pt", tmp_path / "ddp.pt"):
        net = load_model_weights(_net(), str(path), "cpu")
        assert all(torch.equal(v, reference[k]) for k, v in net.state_dict().items())


def test_checkpoint_problems_are_one_line_and_name_the_fix(weights, tmp_path):
    from dmaf_components.checkpoints import load_model_weights

    raw = (weights / "model.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "foreign.nii.gz"))
    os.rename(tmp_path / "foreign.nii.gz", tmp_path / "foreign.pt")  # a NIfTI given as the checkpoint
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other_net.pt")
    torch.save(_net(channels=(8, 16, 32, 64, 128), num_layers=4, num_heads=8).state_dict(), tmp_path / "wide.pt")
    state = torch.load(weights / "model.pt", weights_only=True)
    state["fusions.0.score.weight"] = state["fusions.0.score.weight"] * float("nan")
    torch.save(state, tmp_path / "nan.pt")
    cases = {
        "missing.pt": r"missing.pt: checkpoint not found",
        "truncated.pt": r"truncated.pt: checkpoint is truncated or corrupt",
        "foreign.pt": r"foreign.pt: not a PyTorch checkpoint",
        "other_net.pt": r"other_net.pt: not a weight file of this network",
        "wide.pt": r"wide.pt: checkpoint does not fit the network: channels \[8,16,32,64,128\] in the checkpoint vs "
        r"\[4,8,16,32\] in the network; num_layers 4 in the checkpoint vs 1 in the network; run with "
        r"--channels \"\[8,16,32,64,128\]\" --num_layers 4",
        "nan.pt": r"nan.pt: 1 of \d+ tensors hold NaN/inf values",
    }
    from dmaf_components.errors import DMAFCheckpointError

    for name, message in cases.items():
        with pytest.raises(DMAFCheckpointError, match=message) as err:  # the checkpoint kind of DMAFError
            load_model_weights(_net(), str(tmp_path / name), "cpu")
        assert "\n" not in str(err.value), str(err.value)


def test_evaluate_config_loads_a_training_checkpoint(weights, tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(
        [os.path.join(BUNDLE, "configs", "train.json"), os.path.join(BUNDLE, "configs", "evaluate.json")]
    )
    parser.update(
        {
            "ckpt_path": str(weights / "checkpoint_final.pt"),
            "device": "$torch.device('cpu')",
            "channels": list(NET["channels"]),
            "num_layers": 1,
            "num_heads": 2,
            "bundle_root": str(tmp_path),
        }
    )
    parser.get_parsed_content("load_weights")
    net = parser.get_parsed_content("network")
    reference = torch.load(weights / "model.pt", weights_only=True)
    assert all(torch.equal(v.cpu(), reference[k]) for k, v in net.state_dict().items())


# ------------------------------------------------------------------------------------------------ 2. the batch
@pytest.mark.slow
def test_one_bad_study_does_not_abort_the_batch_and_the_cause_is_the_last_line(weights, tmp_path):
    studies = tmp_path / "studies"
    _study(studies / "a_good", {"flair": "a_good_flair.nii.gz", "t1ce": "a_good_t1ce.nii.gz"})
    _study(studies / "m_bad", {"flair": "m_bad_flair.nii.gz", "t1ce": "m_bad_t1ce.nii.gz"}, corrupt=("t1ce", np.inf))
    _study(studies / "z_good", {"flair": "z_good_FLAIR.nii.gz", "t1": "z_good_T1.nii.gz", "t2": "z_good_dwi.nii.gz"})
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--dataset_dir",
        str(studies),
        "--output_dir",
        str(out),
        "--checkpoint",
        str(weights / "checkpoint_final.pt"),
    ] + TINY
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert sorted(os.listdir(out)) == ["a_good_seg.nii.gz", "z_good_seg.nii.gz"]  # both good studies, nothing else
    for name in ("a_good", "z_good"):
        seg = nib.load(str(out / f"{name}_seg.nii.gz"))
        assert seg.shape == SHAPE and set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 4}
    last = proc.stderr.strip().splitlines()
    assert last[-2] == f"inference finished: 2 segmented, 1 failed (results in {out})"
    assert last[-1] == f"m_bad: {studies / 'm_bad' / 'm_bad_t1ce.nii.gz'}: contains inf voxels (1 of 24576 not finite)"
    assert "Traceback" not in log and "Failed to evaluate" not in log
    assert "study z_good: files for flair, t1; used flair, t1; missing t1ce, t2" in log
    assert f"{studies / 'z_good' / 'z_good_dwi.nii.gz'}: ignored" in log


# ------------------------------------------------------------------------------------------------ 3. outputs
def test_checkpoint_is_loaded_before_the_output_folder_is_created(weights, tmp_path):
    _study(tmp_path / "in" / "s", {"flair": "s_flair.nii.gz"})
    torch.save(_net(channels=(8, 16, 32, 64, 128), num_layers=4).state_dict(), tmp_path / "wide.pt")
    for checkpoint, message in (
        (tmp_path / "nope.pt", "nope.pt: checkpoint not found"),
        (tmp_path / "wide.pt", '--channels "[8,16,32,64,128]" --num_layers 4'),
    ):
        wf = _workflow(tmp_path / "in", tmp_path / "out", checkpoint)
        with pytest.raises(SystemExit, match=re.escape(message)):
            wf.run()
        assert not (tmp_path / "out").exists()


def test_name_collision_is_detected_before_any_work(weights, tmp_path):
    studies = tmp_path / "in"
    _study(studies / "case001", {"flair": "case001_flair.nii.gz"})
    images = _volume()
    data = np.stack([images[m] for m in BRATS_MODALITIES], -1).astype(np.float32)
    nib.save(nib.Nifti1Image(data, BRATS_AFFINE), str(studies / "case001.nii.gz"))
    wf = _workflow(studies, tmp_path / "out", weights / "model.pt")
    with pytest.raises(SystemExit, match=r"case001/ and .*case001.nii.gz would both be written to .*case001_seg"):
        wf.run()
    assert not (tmp_path / "out").exists()


def test_existing_results_are_kept_unless_overwrite(weights, tmp_path):
    _study(tmp_path / "in" / "s", {"flair": "s_flair.nii.gz"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "s_seg.nii.gz").write_bytes(b"earlier result")
    for keep in (False, "false"):  # "false" as the command line passes it (a truthy string)
        with pytest.raises(SystemExit, match=r"1 result\(s\) exist already \(s_seg.nii.gz\); they are kept"):
            _workflow(tmp_path / "in", out, weights / "model.pt", overwrite=keep).run()
    assert (out / "s_seg.nii.gz").read_bytes() == b"earlier result"
    _workflow(tmp_path / "in", out, weights / "model.pt", overwrite="true").run()
    assert nib.load(str(out / "s_seg.nii.gz")).shape == SHAPE and sorted(os.listdir(out)) == ["s_seg.nii.gz"]


def test_output_folder_must_not_be_an_input_folder(weights, tmp_path):
    studies = tmp_path / "in"
    _study(studies / "s", {"flair": "s_flair.nii.gz"})
    for out, message in ((studies, "is the input folder"), (studies / "s", "holds input")):
        with pytest.raises(SystemExit, match=message):
            _workflow(studies, out, weights / "model.pt").run()
    assert sorted(os.listdir(studies / "s")) == ["s_flair.nii.gz"]


def test_read_only_output_folder_fails_before_any_study(weights, tmp_path, monkeypatch):
    import dmaf_components.inference as inference
    import dmaf_components.outputs as outputs

    _study(tmp_path / "in" / "s", {"flair": "s_flair.nii.gz"})
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root: permissions are not enforced; make the write itself fail the same way

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(outputs.tempfile, "mkstemp", refuse)
    computed = []
    monkeypatch.setattr(inference.StudyEvaluator, "_iteration", lambda self, engine, batch: computed.append(1))
    try:
        with pytest.raises(SystemExit, match=r"ro: not writable \(PermissionError: Permission denied\)"):
            _workflow(tmp_path / "in", ro, weights / "model.pt").run()
    finally:
        ro.chmod(0o755)
    assert computed == [] and os.listdir(ro) == []


def test_results_are_written_atomically(tmp_path, monkeypatch):
    from monai.data import MetaTensor
    from monai.transforms import SaveImaged

    from dmaf_components.inference import AtomicSaveImaged

    saver = AtomicSaveImaged(
        "pred",
        output_dir=str(tmp_path),
        output_postfix="seg",
        output_dtype=np.uint8,
        separate_folder=False,
        print_log=False,
        overwrite=True,
    )
    assert isinstance(saver, SaveImaged)  # MONAI Label's monaibundle app filters it out like any SaveImaged
    pred = MetaTensor(torch.ones((1,) + SHAPE), affine=torch.as_tensor(BRATS_AFFINE))
    final = tmp_path / "s_seg.nii.gz"
    final.write_bytes(b"earlier result")

    def killed(img, filename, *args, **kwargs):  # a crash after part of the file was written
        with open(filename, "wb") as f:
            f.write(b"\x1f\x8b partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", killed)  # what MONAI's NibabelWriter calls
    with pytest.raises(DMAFDataError, match=r"s_seg.nii.gz: cannot write the result \(OSError: \[Errno 28\] No "):
        saver({"pred": pred, "case": "s"})
    assert final.read_bytes() == b"earlier result" and os.listdir(tmp_path) == ["s_seg.nii.gz"]
    monkeypatch.undo()
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    saver({"pred": pred, "case": "s"})
    ((src, dst),) = replaced
    assert os.path.dirname(src) == str(tmp_path) and dst == str(final) and not os.path.exists(src)
    assert nib.load(str(final)).shape == SHAPE
    keep = AtomicSaveImaged("pred", output_dir=str(tmp_path), output_postfix="seg", print_log=False)
    with pytest.raises(DMAFDataError, match="exists already; kept"):
        keep({"pred": pred, "case": "s"})


def test_constant_modality_and_one_file_for_two_modalities_are_errors(tmp_path):
    """Silent wrong answers found by a hostile user: a modality filled with one non-zero value was used as present
    (an all-zero one stays an absent modality), and one file given for two modalities was read twice."""
    from dmaf_components.transforms import LoadModalitiesd

    loader = LoadModalitiesd("image", BRATS_MODALITIES)
    flair = str(tmp_path / "s_flair.nii.gz")
    nib.save(nib.Nifti1Image(_volume()["flair"].astype(np.float32), BRATS_AFFINE), flair)
    for value in (100.0, -3.0):
        path = str(tmp_path / "s_t2.nii.gz")
        nib.save(nib.Nifti1Image(np.full(SHAPE, value, np.float32), BRATS_AFFINE), path)
        with pytest.raises(DMAFDataError, match=rf"^{path}: every voxel is {value:g}: not an image"):
            loader({"image": {"flair": flair, "t2": path}})
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), BRATS_AFFINE), path)
    assert loader({"image": {"flair": flair, "t2": path}})["image_available"].tolist() == [True, False, False, False]
    with pytest.raises(DMAFDataError, match=r"^p1: flair and t2 are the same file .*s_flair.nii.gz$"):
        loader.load({"flair": flair, "t2": os.path.join(str(tmp_path), ".", "s_flair.nii.gz")}, case="p1")


def test_a_result_never_replaces_an_input_and_bad_data_entries_are_one_line(weights, tmp_path):
    """--separate_folder with the inputs in OUT/<case>/ and --output_postfix flair planned the segmentation onto the
    flair input itself, and --overwrite true replaced it; --data entries without a case or with a list of paths
    ended in a traceback."""
    from dmaf_components.inference import plan_outputs

    out = tmp_path / "out"
    _study(out / "p1", {"flair": "p1_flair.nii.gz"})
    flair = str(out / "p1" / "p1_flair.nii.gz")
    before = (out / "p1" / "p1_flair.nii.gz").read_bytes()
    studies = [{"case": "p1", "image": {"flair": flair}}]
    with pytest.raises(DMAFDataError, match=rf"p1_flair.nii.gz: would overwrite the input {flair}"):
        plan_outputs(studies, str(out), overwrite=True, output_postfix="flair", separate_folder=True)
    assert (out / "p1" / "p1_flair.nii.gz").read_bytes() == before
    for entry, message in (
        ({"image": {"flair": flair}}, r"^data\[0\]: no 'case' name"),
        ({"case": "p1", "image": [flair, flair]}, r"^data\[0\] \(p1\): 'image' must be a path"),
        ("p1", r"^data\[0\]: expected \{'case'"),
    ):
        with pytest.raises(DMAFDataError, match=message):
            plan_outputs([entry], str(tmp_path / "o2"))


def test_inference_refuses_a_non_zero_background_and_a_single_slice(tmp_path):
    """Silent wrong answers found by a hostile user: the model normalises intensities over the non-zero voxels of
    skull-stripped images, so an intensity offset (or a scaled integer file's intercept) made every voxel "brain" and
    changed the segmentation without a word; and a single-slice study came back
    as a 2-D file. The inference config's loader now refuses both in one line naming the file; an all-zero modality
    is still an absent one."""
    from monai.bundle import ConfigParser

    from dmaf_components.transforms import LoadModalitiesd

    config = ConfigParser()
    config.read_config(INFERENCE)
    args = next(t for t in config["preprocessing"]["transforms"] if t["_target_"].endswith("LoadModalitiesd"))
    loader = LoadModalitiesd(
        "image", BRATS_MODALITIES, min_background=args["min_background"], min_axis_size=args["min_axis_size"]
    )
    flair = _volume()["flair"].astype(np.float32)
    for name, data in (("offset", flair - 1000.0), ("intercept", flair + 10.0)):
        path = str(tmp_path / f"{name}_flair.nii.gz")
        nib.save(nib.Nifti1Image(data, BRATS_AFFINE), path)
        with pytest.raises(
            DMAFDataError,
            match=rf"^{path}: only 0.0% of the voxels are 0, expected at least 5%: "
            "the model expects skull-stripped images with a zero background",
        ):
            loader({"image": {"flair": path}})
    good, empty = str(tmp_path / "s_flair.nii.gz"), str(tmp_path / "s_t2.nii.gz")
    nib.save(nib.Nifti1Image(flair, BRATS_AFFINE), good)
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), BRATS_AFFINE), empty)
    assert loader({"image": {"flair": good, "t2": empty}})["image_available"].tolist() == [True, False, False, False]
    one = str(tmp_path / "one_flair.nii.gz")
    nib.save(nib.Nifti1Image(flair[:, :, 10:11], BRATS_AFFINE), one)
    with pytest.raises(DMAFDataError, match=rf"^{one}: shape \(32, 32, 1\) has an axis shorter than 2"):
        loader({"image": {"flair": one}})


def test_inference_resamples_to_the_training_spacing_and_back(tmp_path):
    """The model was trained on 1 mm voxels (BraTS) and has never seen another scale: a 2 mm study was segmented on
    its own grid, every structure at half the size the network knows, without a word. The inference preprocessing
    now resamples each study to ``spacing`` (1 mm) and Invertd brings the label map back to the input's grid; a
    study already at 1 mm is not touched (its voxels are what the network saw before)."""
    from monai.bundle import ConfigParser
    from monai.transforms import Invertd

    from monai.transforms import Compose

    config = ConfigParser()
    config.read_config(INFERENCE)
    preprocessing = config.get_parsed_content("preprocessing")
    before = Compose([t for t in preprocessing.transforms if type(t).__name__ != "StudySpacingd"])  # 0.1.9's
    assert len(before.transforms) == len(preprocessing.transforms) - 1
    flair = _volume()["flair"].astype(np.float32)
    for name, affine in (("coarse", np.diag([2.0, 2.0, 2.0, 1.0])), ("native", BRATS_AFFINE)):
        path = str(tmp_path / f"{name}_flair.nii.gz")
        nib.save(nib.Nifti1Image(flair, affine), path)
        data = preprocessing({"case": name, "image": {"flair": path}})
        assert np.allclose(data["image"].pixdim, [1.0, 1.0, 1.0])
        assert data["image_available"].tolist() == [True, False, False, False]
        if name == "native":  # no resampling: exactly what the network saw before the step was added
            assert torch.equal(data["image"], before({"case": name, "image": {"flair": path}})["image"])
        else:  # twice as many voxels along every axis inside the brain's box
            assert all(n >= 2 * m - 2 for n, m in zip(data["image"].shape[1:], np.ptp(np.argwhere(flair), 0) + 1))
        data["pred"] = (data["image"][:1] > 0).to(torch.uint8)
        inverted = Invertd("pred", preprocessing, orig_keys="image", nearest_interp=True)(data)["pred"]
        assert tuple(inverted.shape[1:]) == SHAPE and np.allclose(inverted.affine, affine)


def test_a_label_map_or_an_out_of_range_file_is_not_taken_for_an_image(tmp_path):
    """Two silent wrong answers: a segmentation saved under a modality's name (a mix-up of exports) was segmented as
    if it were an MR image; a float64 file with values beyond float32's range read as 'inf voxels'. Both are now one
    line naming the file; a label loaded as a label is not checked as an image."""
    from dmaf_components.transforms import LoadModalitiesd

    images, label = brats_case(SHAPE, seed=0)
    mixed = str(tmp_path / "s_t1ce.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), BRATS_AFFINE), mixed)
    values = np.unique(label).astype(int).tolist()
    assert len(values) >= 3  # background, edema and more: a real label map
    loader = LoadModalitiesd("image", BRATS_MODALITIES, label_keys="label")
    shown = re.escape(", ".join(str(v) for v in values))
    with pytest.raises(
        DMAFDataError,
        match=rf"^{mixed}: holds only {len(values)} distinct whole-number values "
        rf"\({shown}\): a label map or mask, not an MR image$",
    ):
        loader({"image": {"t1ce": mixed}})
    big = str(tmp_path / "big_t1ce.nii.gz")  # over 2 x 65536 voxels: a strided sample decides first, then all
    nib.save(nib.Nifti1Image(np.tile(label, (2, 2, 2)).astype(np.int16), BRATS_AFFINE), big)
    with pytest.raises(DMAFDataError, match=rf"^{big}: holds only {len(values)} distinct whole-number values"):
        loader({"image": {"t1ce": big}})
    flair = str(tmp_path / "s_flair.nii.gz")
    nib.save(nib.Nifti1Image(images["flair"].astype(np.float32), BRATS_AFFINE), flair)
    assert loader({"image": {"flair": flair}, "label": mixed})["label"].unique().tolist() == values
    huge = images["t2"].astype(np.float64)
    huge[4, 4, 4] = 1e300
    path = str(tmp_path / "s_t2.nii.gz")
    nib.save(nib.Nifti1Image(huge, BRATS_AFFINE), path)
    with pytest.raises(
        DMAFDataError,
        match=rf"^{path}: contains inf voxels \(or beyond float32's range, in this "
        r"float64 file\) \(1 of ",
    ):
        loader({"image": {"t2": path}})


def test_myops_inference_segments_the_release_layout_with_myops_label_values(tmp_path):
    """The README pointed MyoPS users at inference with `--dataset_name myops`, a path that did not exist: the
    inference config is 3-D BraTS, and the MyoPS release keeps every case's files in one flat folder. The overlay
    configs/inference_myops.json runs the 2-D network slice by slice with the MyoPS training preprocessing, the flat
    folder is grouped into one study per case, and the label map carries MyoPS's own values (LV 500, RV 600,
    myocardium 200): before, uint8 output would have wrapped 500 to 244 without a word."""
    from monai.bundle import ConfigWorkflow

    from dmaf_components.data import synthesize_myops
    from dmaf_components.networks import DMAFNet

    synthesize_myops(str(tmp_path), cases=2, shape=(40, 44, 3))
    torch.manual_seed(0)
    torch.save(DMAFNet(2, 3, 4, **NET).state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"
    wf = ConfigWorkflow(
        config_file=[INFERENCE, os.path.join(BUNDLE, "configs", "inference_myops.json")],
        workflow_type="infer",
        logging_file=False,
        bundle_root=BUNDLE,
        dataset_dir=str(tmp_path / "train25"),
        output_dir=str(out),
        checkpoint=str(tmp_path / "model.pt"),
        roi_size=[32, 32],
        channels=list(NET["channels"]),
        num_layers=1,
        num_heads=2,
        num_workers=0,
        save_weights="true",
    )
    wf.initialize()
    wf.run()
    cases = ("myops_training_101", "myops_training_102")
    assert sorted(os.listdir(out)) == sorted(
        f"{c}_{s}" for c in cases for s in ("seg.nii.gz", "modality_weights.nii.gz", "modality_weights.json")
    )
    source = nib.load(str(tmp_path / "train25" / "myops_training_101_C0.nii.gz"))
    seg = nib.load(str(out / "myops_training_101_seg.nii.gz"))
    assert seg.shape == source.shape == (40, 44, 3) and np.allclose(seg.affine, source.affine, atol=1e-4)
    values = set(np.unique(np.asarray(seg.dataobj)).tolist())
    assert values <= {0, 200, 500, 600} and len(values) > 1
    # the region summary counts MyoPS's regions on those values
    summary = json.loads((out / "myops_training_101_modality_weights.json").read_text())
    assert summary["present"] == ["bssfp", "lge", "t2"]
    labels = np.asarray(seg.dataobj)
    for region, value in (("LVB", 500), ("RVB", 600), ("MYO", 200)):
        assert summary["regions"][region]["voxels"] == int((labels == value).sum())


def test_a_flat_folder_of_modality_files_is_grouped_into_studies(tmp_path):
    """Modality files directly in the input folder (MyoPS's release, a flat BraTS export) used to be taken for 4-D
    studies and fail with 'has 1 channel(s)'; they are grouped by the rest of their name, a duplicate fails its
    study in one line, and a 4-D file without a modality name is still a 4-D study."""
    images = _volume()
    for name, modality in (
        ("p1_flair.nii.gz", "flair"),
        ("p1_T1.nii.gz", "t1"),
        ("p2_FLAIR.nii.gz", "flair"),
        ("p2_flair.nii", "flair"),
    ):
        nib.save(nib.Nifti1Image(images[modality].astype(np.float32), BRATS_AFFINE), str(tmp_path / name))
    nib.save(nib.Nifti1Image(images["t2"].astype(np.float32), BRATS_AFFINE), str(tmp_path / "p1_dwi.nii.gz"))
    four = np.stack([images[m] for m in BRATS_MODALITIES], -1).astype(np.float32)
    nib.save(nib.Nifti1Image(four, BRATS_AFFINE), str(tmp_path / "BRATS_003.nii.gz"))
    studies = {s["case"]: s for s in find_studies(str(tmp_path), BRATS_MODALITIES)}
    assert sorted(studies) == ["BRATS_003", "p1", "p2"]  # p1_dwi is another sequence of p1, not a 4-D study
    assert studies["p1"]["image"] == {"flair": str(tmp_path / "p1_flair.nii.gz"), "t1": str(tmp_path / "p1_T1.nii.gz")}
    assert studies["p1"]["notes"] == [
        f"{tmp_path / 'p1_dwi.nii.gz'}: ignored (no modality name; modality files end with _flair/t1/t1ce/t2, any case)"
    ]
    assert studies["p2"]["error"] == (
        f"{tmp_path / 'p2_flair.nii'}: a second file for flair (also {tmp_path / 'p2_FLAIR.nii.gz'})"
    )
    assert studies["BRATS_003"]["image"] == str(tmp_path / "BRATS_003.nii.gz")


# ------------------------------------------------------------------------------------------------ round 3
def _earlier(out, names):
    """Earlier results in ``out``: ``{name: bytes}``, to be compared byte for byte after a failed run."""
    out.mkdir(parents=True, exist_ok=True)
    earlier = {}
    for i, name in enumerate(names):
        earlier[name] = f"earlier result {i}".encode()
        (out / name).write_bytes(earlier[name])
    return earlier


def test_a_full_disk_fails_the_study_and_keeps_every_earlier_result(weights, tmp_path, monkeypatch):
    """nibabel's OSError(ENOSPC) was logged at INFO by MONAI's SaveImage, which then wrote the file with ITK (on a
    full disk: truncated, no error) and the truncated file replaced the earlier result, exit 0. Now the writer's
    error fails the study in one line naming the file and the cause, and --overwrite true keeps every earlier file
    byte for byte, the weight maps included."""
    real_save = nib.save
    _study(tmp_path / "in" / "s", {"flair": "s_flair.nii.gz", "t1ce": "s_t1ce.nii.gz"})
    out = tmp_path / "out"
    earlier = _earlier(out, ["s_seg.nii.gz", "s_modality_weights.nii.gz", "s_modality_weights.json"])

    def full_disk(only):
        def save(img, filename, *args, **kwargs):
            if only not in os.path.basename(str(filename)):
                return real_save(img, filename, *args, **kwargs)
            with open(filename, "wb") as f:  # part of the file, then the disk is full
                f.write(b"\x1f\x8b\x08 partial")
            raise OSError(28, "No space left on device")

        return save

    for failing in ("_seg", "modality_weights"):
        monkeypatch.setattr(nib, "save", full_disk(failing))
        wf = _workflow(tmp_path / "in", out, weights / "model.pt", overwrite="true", save_weights=True)
        with pytest.raises(SystemExit) as err:
            wf.run()
        target = out / ("s_seg.nii.gz" if failing == "_seg" else "s_modality_weights.nii.gz")
        assert str(err.value).splitlines()[-2:] == [
            f"inference finished: 0 segmented, 1 failed (results in {out})",
            f"s: {target}: cannot write the result (OSError: [Errno 28] No space left on device)",
        ]
        assert sorted(os.listdir(out)) == sorted(earlier)  # no temporary file left
        kept = [n for n in earlier if failing == "_seg" or "modality_weights" in n]
        assert all((out / n).read_bytes() == earlier[n] for n in kept)
    # the second run wrote the segmentation (complete) before its weight map failed
    assert nib.load(str(out / "s_seg.nii.gz")).shape == SHAPE


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_a_writer_that_truncates_without_raising_is_caught_by_reading_the_file_back(tmp_path, monkeypatch, ext):
    """A writer that truncates the file on a full disk without raising (ITK did for .nii.gz) no longer gets its
    file renamed into place: the temporary file is read back in full before the rename."""
    import itk
    from monai.data import MetaTensor

    from dmaf_components.inference import AtomicSaveImaged

    saver = AtomicSaveImaged(
        "pred",
        output_dir=str(tmp_path),
        output_postfix="seg",
        output_ext=ext,
        output_dtype=np.uint8,
        print_log=False,
        overwrite=True,
    )
    pred = MetaTensor(torch.randint(0, 5, (1,) + SHAPE).float(), affine=torch.as_tensor(BRATS_AFFINE))
    final = tmp_path / f"s_seg{ext}"
    final.write_bytes(b"earlier result")
    module, name = (nib, "save") if ext == ".nii.gz" else (itk, "imwrite")
    real = getattr(module, name)

    def truncating(img, filename, *args, **kwargs):
        real(img, filename, *args, **kwargs)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)

    monkeypatch.setattr(module, name, truncating)
    with pytest.raises(
        DMAFDataError,
        match=rf"^{re.escape(str(final))}: cannot write the result \(the file written "
        r"does not read back: .+\)$",
    ):
        saver({"pred": pred, "case": "s"})
    assert final.read_bytes() == b"earlier result" and os.listdir(tmp_path) == [final.name]
    monkeypatch.undo()
    saver({"pred": pred, "case": "s"})  # the same saver, without the fault: written and read back
    assert final.stat().st_size > 100


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_tmpfs_fails_the_study_and_keeps_the_earlier_result(tmp_path):
    """The same on a real full file system: a 32 KiB tmpfs, a result that does not fit."""
    import gc
    import shutil

    from monai.data import MetaTensor

    from dmaf_components.inference import AtomicSaveImaged

    disk = tmp_path / "tiny"
    disk.mkdir()
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        for ext in (".nii.gz", ".nrrd"):
            final = disk / f"s_seg{ext}"
            final.write_bytes(b"earlier result")
            saver = AtomicSaveImaged(
                "pred",
                output_dir=str(disk),
                output_postfix="seg",
                output_ext=ext,
                output_dtype=np.uint8,
                print_log=False,
                overwrite=True,
            )
            pred = MetaTensor(torch.randint(0, 5, (1, 64, 64, 48)).float(), affine=torch.as_tensor(BRATS_AFFINE))
            with pytest.raises(
                DMAFDataError,
                match=rf"^{re.escape(str(final))}: cannot write the result \(.*"
                r"(No space left on device|fwrite wrote only)",
            ):
                saver({"pred": pred, "case": "s"})
            assert final.read_bytes() == b"earlier result" and os.listdir(disk) == [final.name]
            final.unlink()
    finally:
        gc.collect()  # a file object the failed gzip write left open keeps the mount busy
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_dangling_links_and_link_loops_are_failed_studies_naming_the_link(weights, tmp_path):
    """A study folder or a modality file that was a dangling symbolic link or a loop was dropped without a word
    (the run said "1 segmented" and never named the study)."""
    studies = tmp_path / "in"
    _study(studies / "good", {"flair": "good_flair.nii.gz"})
    os.symlink(tmp_path / "gone", studies / "moved")  # a study folder moved away
    os.symlink(studies / "loop", studies / "loop")  # a study folder linking to itself
    _study(studies / "part", {"flair": "part_flair.nii.gz"})
    os.symlink(tmp_path / "gone_t2.nii.gz", studies / "part" / "part_t2.nii.gz")
    _study(studies / "cycle", {"flair": "cycle_flair.nii.gz"})
    os.symlink(studies / "cycle" / "cycle_t1.nii.gz", studies / "cycle" / "cycle_t1.nii.gz")
    os.symlink(tmp_path / "gone.txt", studies / "good" / "report.txt")  # no modality: noted, the study goes on
    found = {s["case"]: s for s in find_studies(str(studies), log=False)}
    assert found["moved"]["error"] == (
        f"{studies / 'moved'}: a dangling symbolic link (its target {tmp_path / 'gone'} does not exist)"
    )
    assert found["loop"]["error"] == f"{studies / 'loop'}: a symbolic link loop (-> {studies / 'loop'})"
    assert found["part"]["error"] == (
        f"{studies / 'part' / 'part_t2.nii.gz'}: a dangling symbolic link (its target "
        f"{tmp_path / 'gone_t2.nii.gz'} does not exist); it names t2"
    )
    assert found["cycle"]["error"].startswith(f"{studies / 'cycle' / 'cycle_t1.nii.gz'}: a symbolic link loop")
    assert "error" not in found["good"] and found["good"]["notes"] == [
        f"{studies / 'good' / 'report.txt'}: a dangling symbolic link (its target {tmp_path / 'gone.txt'} does not "
        "exist): ignored"
    ]
    with pytest.raises(SystemExit) as err:
        _workflow(studies, tmp_path / "out", weights / "model.pt").run()
    lines = str(err.value).splitlines()
    assert lines[0] == f"inference finished: 1 segmented, 4 failed (results in {tmp_path / 'out'})"
    assert sorted(lines[1:]) == sorted(f"{case}: {found[case]['error']}" for case in ("moved", "loop", "part", "cycle"))
    # flat layout: a dangling modality file directly in the input folder fails its case
    flat = tmp_path / "flat"
    flat.mkdir()
    nib.save(nib.Nifti1Image(_volume()["flair"].astype(np.float32), BRATS_AFFINE), str(flat / "p1_flair.nii.gz"))
    os.symlink(tmp_path / "gone.nii.gz", flat / "p1_t2.nii.gz")
    os.symlink(tmp_path / "gone4d.nii.gz", flat / "BRATS_009.nii.gz")
    found = {s["case"]: s for s in find_studies(str(flat), log=False)}
    assert found["p1"]["error"].startswith(f"{flat / 'p1_t2.nii.gz'}: a dangling symbolic link")
    assert found["BRATS_009"]["error"].startswith(f"{flat / 'BRATS_009.nii.gz'}: a dangling symbolic link")


def test_a_hard_link_is_the_same_file(tmp_path):
    """A hard link from T2 to the FLAIR file passed the same-file check, which compared real paths."""
    from dmaf_components.transforms import LoadModalitiesd

    flair = tmp_path / "p1_flair.nii.gz"
    nib.save(nib.Nifti1Image(_volume()["flair"].astype(np.float32), BRATS_AFFINE), str(flair))
    os.link(flair, tmp_path / "p1_t2.nii.gz")
    loader = LoadModalitiesd("image", BRATS_MODALITIES)
    with pytest.raises(DMAFDataError, match=rf"^p1: flair and t2 are the same file {re.escape(str(tmp_path))}"):
        loader.load({"flair": str(flair), "t2": str(tmp_path / "p1_t2.nii.gz")}, case="p1")
    os.symlink(flair, tmp_path / "p1_t1.nii.gz")  # a symbolic link, as before
    with pytest.raises(DMAFDataError, match=r"^p1: flair and t1 are the same file"):
        loader.load({"flair": str(flair), "t1": str(tmp_path / "p1_t1.nii.gz")}, case="p1")
    (tmp_path / "p1_t1ce.nii.gz").write_bytes(flair.read_bytes())  # a copy is another file: it is read
    image, available = loader.load({"flair": str(flair), "t1ce": str(tmp_path / "p1_t1ce.nii.gz")}, case="p1")
    assert available.tolist() == [True, False, True, False]


def test_bids_names_with_a_contrast_entity(tmp_path):
    """``sub-01_ce-gadolinium_T1w`` (BIDS: ce- is the contrast agent) was read as the native T1."""
    from dmaf_components.data.names import case_of, modality_of

    expected = {
        "sub-01_T1w.nii.gz": ("t1", "sub-01"),
        "sub-01_T2w.nii.gz": ("t2", "sub-01"),
        "sub-01_FLAIR.nii.gz": ("flair", "sub-01"),
        "sub-01_ce-gadolinium_T1w.nii.gz": ("t1ce", "sub-01"),
        "sub-01_ce-Gd_T2w.nii.gz": ("t2", "sub-01"),
        "sub-01_ce-gadolinium_FLAIR.nii.gz": ("flair", "sub-01"),
        "sub-01_ses-1_acq-mprage_ce-gd_run-1_T1w.nii.gz": ("t1ce", "sub-01_ses-1_acq-mprage_run-1"),
        "sub-01_acq-ce_T1w.nii.gz": ("t1", "sub-01_acq-ce"),  # acq-ce is an acquisition label, not the ce entity
        "s1_t1-ce.nii.gz": ("t1ce", "s1"),
        "s1_T1.nii.gz": ("t1", "s1"),
        "x_ce-t1.nii.gz": ("t1", "x_ce"),
    }
    assert {n: (modality_of(n, BRATS_MODALITIES), case_of(n, BRATS_MODALITIES)) for n in expected} == expected
    # a model without T1ce never takes a contrast-enhanced T1 for a native one
    assert modality_of("sub-01_ce-gd_T1w.nii.gz", ("flair", "t1", "t2")) is None
    # a flat BIDS anat folder is one study with T1 and T1ce
    images = _volume()
    for name, modality in (
        ("sub-01_T1w.nii.gz", "t1"),
        ("sub-01_ce-gadolinium_T1w.nii.gz", "t1ce"),
        ("sub-01_FLAIR.nii.gz", "flair"),
    ):
        nib.save(nib.Nifti1Image(images[modality].astype(np.float32), BRATS_AFFINE), str(tmp_path / name))
    (study,) = find_studies(str(tmp_path), log=False)
    assert study["case"] == "sub-01" and study["image"] == {
        "t1": str(tmp_path / "sub-01_T1w.nii.gz"),
        "t1ce": str(tmp_path / "sub-01_ce-gadolinium_T1w.nii.gz"),
        "flair": str(tmp_path / "sub-01_FLAIR.nii.gz"),
    }


def test_a_modality_never_trained_is_refused_alone_and_not_used_beside_others(weights, tmp_path, caplog):
    """A checkpoint whose DTM never saw T2 in training segmented a T2-only study with exit 0 and no warning."""
    from dmaf_components.inference import untrained_modalities

    state = torch.load(weights / "model.pt", weights_only=True)
    dtm = {
        "ema_relation": torch.zeros(4, dtype=torch.float64),
        "ema_prototype": torch.zeros(4, dtype=torch.float64),
        "seen": torch.tensor([True, True, True, False]),
        "prev_grads": [None] * 4,
    }
    torch.save({"model": state, "dtm": dtm, "trainer": {"iteration": 4}}, tmp_path / "no_t2.pt")
    assert untrained_modalities(str(tmp_path / "no_t2.pt"), BRATS_MODALITIES) == ["t2"]
    assert untrained_modalities(str(weights / "model.pt"), BRATS_MODALITIES) is None  # a plain state dict
    assert untrained_modalities(str(weights / "checkpoint_final.pt"), BRATS_MODALITIES) is None  # no DTM state
    studies = tmp_path / "in"
    _study(studies / "t2_only", {"t2": "t2_only_t2.nii.gz"})
    _study(studies / "mixed", {"flair": "mixed_flair.nii.gz", "t2": "mixed_t2.nii.gz"})
    _study(studies / "flair_only", {"flair": "flair_only_flair.nii.gz"})  # the same FLAIR as mixed
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="dmaf_components.inference"):
        with pytest.raises(SystemExit) as err:
            _workflow(studies, out, tmp_path / "no_t2.pt").run()
    assert str(err.value).splitlines() == [
        f"inference finished: 2 segmented, 1 failed (results in {out})",
        f"t2_only: only t2 present, never seen in training (the checkpoint {tmp_path / 'no_t2.pt'} records no "
        "training iteration with it): refused, the result would come from untrained weights",
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if w.startswith("study mixed:")] == [
        f"study mixed: t2 never seen in training (the checkpoint {tmp_path / 'no_t2.pt'} records no training "
        "iteration with it): not used"
    ]
    mixed = np.asarray(nib.load(str(out / "mixed_seg.nii.gz")).dataobj)
    assert np.array_equal(mixed, np.asarray(nib.load(str(out / "flair_only_seg.nii.gz")).dataobj))
    assert sorted(os.listdir(out)) == ["flair_only_seg.nii.gz", "mixed_seg.nii.gz"]
