"""Clinical formats through ITK (issue 12 E): DICOM series, NRRD and MetaImage studies are found, read with MONAI's
ITKReader and segmented on the input's grid and orientation, written as NIfTI by default and NRRD on request."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from dmaf_components.data import DMAFDataError, brats_case, find_studies

itk = pytest.importorskip("itk")
pytestmark = pytest.mark.filterwarnings("ignore:builtin type (Swig|swig)")

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
INFERENCE = os.path.join(BUNDLE, "configs", "inference.json")
SHAPE = (40, 36, 20)  # x, y, z: smaller than one 32^3 window after foreground cropping in z, larger in x/y
SPACING = (0.9, 1.1, 2.5)
ORIGIN = np.array([-10.0, 20.0, 5.0])
_T = np.deg2rad(20.0)
DIRECTION = np.array([[np.cos(_T), -np.sin(_T), 0.0], [np.sin(_T), np.cos(_T), 0.0], [0.0, 0.0, 1.0]])  # oblique
NET = {"channels": (4, 8, 16, 32), "num_layers": 1, "num_heads": 2}


def _itk_image(volume: np.ndarray, dtype=np.float32):
    """An ITK image of a (x, y, z) array with the test geometry."""
    img = itk.image_from_array(np.ascontiguousarray(np.transpose(volume, (2, 1, 0)).astype(dtype)))
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN.tolist())
    img.SetDirection(itk.matrix_from_array(DIRECTION))
    return img


def write_dicom_series(folder: str, volume: np.ndarray, description: str, uid: str) -> None:
    """One DICOM file per slice (int16, MR) with position, orientation, spacing, series UID and description."""
    os.makedirs(folder, exist_ok=True)
    arr = np.transpose(volume, (2, 1, 0)).astype(np.int16)
    for k in range(arr.shape[0]):
        sl = itk.image_from_array(np.ascontiguousarray(arr[k : k + 1]))
        sl.SetSpacing(SPACING)
        sl.SetDirection(itk.matrix_from_array(DIRECTION))
        sl.SetOrigin((ORIGIN + k * SPACING[2] * DIRECTION[:, 2]).tolist())
        meta = sl.GetMetaDataDictionary()
        for tag, value in (
            ("0020|000e", uid),
            ("0008|103e", description),
            ("0020|0013", str(k + 1)),
            ("0008|0060", "MR"),
            ("0020|000d", "1.2.826.0.1.3680043.8.498.7"),
        ):
            meta[tag] = value
        io = itk.GDCMImageIO.New()
        io.SetKeepOriginalUID(True)
        itk.imwrite(sl, os.path.join(folder, f"{uid}_{k:04d}.dcm"), imageio=io)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """``dcm``: FLAIR and T1ce as DICOM series (FLAIR's files in the study folder, named by its description; T1ce in
    a sub-folder ``t1ce/`` whose description names nothing) and T2 as NRRD; ``mha``: FLAIR as MetaImage, T1 as NRRD."""
    root = tmp_path_factory.mktemp("formats") / "in"
    images, _ = brats_case(SHAPE, seed=3)
    vol = {m: (images[m] * 100).astype(np.float32) for m in images}
    write_dicom_series(str(root / "dcm"), vol["flair"], "AX T2 FLAIR", "1.2.826.0.1.3680043.8.498.11")
    write_dicom_series(str(root / "dcm"), vol["t1"], "localizer", "1.2.826.0.1.3680043.8.498.12")  # not a modality
    write_dicom_series(str(root / "dcm" / "t1ce"), vol["t1ce"], "MPRAGE post", "1.2.826.0.1.3680043.8.498.13")
    itk.imwrite(_itk_image(vol["t2"]), str(root / "dcm" / "dcm_t2.nrrd"))
    (root / "mha").mkdir()
    itk.imwrite(_itk_image(vol["flair"]), str(root / "mha" / "mha_FLAIR.mha"))
    itk.imwrite(_itk_image(vol["t1"]), str(root / "mha" / "mha_t1.nrrd"))
    return root, vol


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from dmaf_components.networks import DMAFNet

    path = tmp_path_factory.mktemp("w") / "model.pt"
    torch.manual_seed(0)
    torch.save(DMAFNet(3, 4, 4, **NET).state_dict(), path)
    return path


def _run(dataset_dir, output_dir, checkpoint, **override):
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
    return wf.run()


def _geometry(img):
    return (
        tuple(itk.size(img)),
        np.array(itk.spacing(img)),
        np.array(itk.origin(img)),
        itk.array_from_matrix(img.GetDirection()),
    )


def _same_geometry(a, b, atol=1e-4):
    (sa, pa, oa, da), (sb, pb, ob, db) = _geometry(a), _geometry(b)
    assert sa == sb, (sa, sb)
    assert np.allclose(pa, pb, atol=atol) and np.allclose(oa, ob, atol=atol) and np.allclose(da, db, atol=atol), (
        _geometry(a),
        _geometry(b),
    )


def test_dicom_series_are_found_by_description_or_folder_name(studies, caplog):
    root, _ = studies
    found = {s["case"]: s for s in find_studies(str(root))}
    dcm = found["dcm"]
    assert dcm["image"] == {
        "flair": str(root / "dcm"),
        "t1ce": str(root / "dcm" / "t1ce"),
        "t2": str(root / "dcm" / "dcm_t2.nrrd"),
    }
    assert set(dcm["image_series"]) == {"flair", "t1ce"} and "error" not in dcm
    assert any("DICOM series 'localizer'" in n and "ignored" in n for n in dcm["notes"])  # reported, not dropped
    assert found["mha"]["image"] == {
        "flair": str(root / "mha" / "mha_FLAIR.mha"),
        "t1": str(root / "mha" / "mha_t1.nrrd"),
    }
    # given explicitly: a description the alias table does not know
    mapped = {s["case"]: s for s in find_studies(str(root), modality_map={"Localizer": "t1"})}
    assert mapped["dcm"]["image"]["t1"] == str(root / "dcm") and "notes" not in mapped["dcm"]


def test_loaded_dicom_and_nrrd_match_the_written_voxels_and_share_one_affine(studies):
    from dmaf_components.transforms import LoadModalitiesd

    root, vol = studies
    (study,) = [s for s in find_studies(str(root), log=False) if s["case"] == "dcm"]
    out = LoadModalitiesd("image", ("flair", "t1", "t1ce", "t2"))({k: v for k, v in study.items() if k != "notes"})
    img = out["image"]
    assert tuple(img.shape) == (4,) + SHAPE and out["image_available"].tolist() == [True, False, True, True]
    assert np.array_equal(img[0].numpy(), vol["flair"].astype(np.int16))
    assert np.array_equal(img[2].numpy(), vol["t1ce"].astype(np.int16))
    assert np.allclose(img[3].numpy(), vol["t2"])
    ras = np.diag([-1.0, -1.0, 1.0]) @ DIRECTION @ np.diag(SPACING)  # ITK's LPS geometry as a RAS affine
    assert np.allclose(img.affine[:3, :3].numpy(), ras, atol=1e-5)
    assert np.allclose(img.affine[:3, 3].numpy(), ORIGIN * [-1, -1, 1], atol=1e-5)


def test_inference_on_dicom_nrrd_and_mha_keeps_the_input_geometry(studies, weights, tmp_path):
    root, _ = studies
    reference = itk.imread(str(root / "dcm" / "t1ce"))  # the DICOM series' own geometry
    out = tmp_path / "nifti"
    result = _run(root, out, weights)
    assert sorted(result[0]["segmented"]) == ["dcm", "mha"]
    assert sorted(os.listdir(out)) == ["dcm_seg.nii.gz", "mha_seg.nii.gz"]
    for name in ("dcm", "mha"):
        seg = itk.imread(str(out / f"{name}_seg.nii.gz"))
        _same_geometry(seg, reference)
        assert set(np.unique(itk.array_view_from_image(seg)).tolist()) <= {0, 1, 2, 4}
    nii = nib.load(str(out / "dcm_seg.nii.gz"))
    assert nii.shape == SHAPE and nii.get_data_dtype() == np.uint8
    # NRRD on request: the same labels, written by ITK with the series' direction, origin and spacing
    out_nrrd = tmp_path / "nrrd"
    _run(root, out_nrrd, weights, output_ext=".nrrd")
    assert sorted(os.listdir(out_nrrd)) == ["dcm_seg.nrrd", "mha_seg.nrrd"]
    seg = itk.imread(str(out_nrrd / "dcm_seg.nrrd"))
    _same_geometry(seg, reference, atol=1e-6)
    assert np.array_equal(itk.array_view_from_image(seg), np.asarray(nii.dataobj).T)


def test_unreadable_itk_inputs_are_one_line_and_do_not_stop_the_others(studies, weights, tmp_path):
    root, _ = studies
    data = tmp_path / "in"
    (data / "trunc").mkdir(parents=True)
    raw = (root / "dcm" / "dcm_t2.nrrd").read_bytes()
    (data / "trunc" / "trunc_t2.nrrd").write_bytes(raw[: len(raw) // 2])
    (data / "two_series").mkdir()
    for i, sub in enumerate(("a", "b")):  # two series in one folder, neither named by its description
        write_dicom_series(
            str(data / "two_series" / "flair"),
            np.ones(SHAPE, np.float32) * (i + 1),
            f"series {sub}",
            f"1.2.826.0.1.3680043.8.498.2{i}",
        )
    volume = np.random.default_rng(0).uniform(1, 500, SHAPE)
    write_dicom_series(str(data / "gap" / "flair"), volume, "AX FLAIR", "1.2.826.0.1.3680043.8.498.30")
    os.remove(data / "gap" / "flair" / "1.2.826.0.1.3680043.8.498.30_0007.dcm")  # a slice lost in transfer
    os.symlink(root / "mha", data / "mha")
    with pytest.raises(SystemExit) as exc:
        _run(data, tmp_path / "out", weights, separate_folder=True)
    lines = str(exc.value).splitlines()
    assert lines[0] == f"inference finished: 1 segmented, 3 failed (results in {tmp_path / 'out'})"
    failed = dict(line.split(": ", 1) for line in lines[1:])
    assert "trunc_t2.nrrd: not a readable image file (ITK: Read: Error reading" in failed["trunc"]
    assert "fread got only" in failed["trunc"]
    assert failed["two_series"].startswith(f"{data / 'two_series'}: no modality file")
    # ITK would stack the 19 slices evenly (a 5 mm gap read as 2.5 mm): refused, naming the series and the gap
    assert failed["gap"] == (
        f"{data / 'gap' / 'flair'} (DICOM series 'AX FLAIR', 19 files): missing slices: "
        "1.2.826.0.1.3680043.8.498.30_0008.dcm is 5 mm from 1.2.826.0.1.3680043.8.498.30_0006.dcm, the median gap is "
        "2.5 mm; ITK would stack the slices evenly and distort the volume: export the complete series"
    )
    assert os.listdir(tmp_path / "out") == ["mha"] and os.listdir(tmp_path / "out" / "mha") == ["mha_seg.nii.gz"]


def test_a_dicom_series_with_two_slices_at_each_position_is_refused(tmp_path):
    """Two echoes exported under one SeriesInstanceUID: ITK stacks them as one volume of twice the slices. The
    loader names the first pair at one position (not 'missing slices', as a median gap of 0 would say)."""
    from dmaf_components.transforms import LoadModalitiesd

    folder = tmp_path / "flair"
    write_dicom_series(str(folder), np.random.default_rng(1).uniform(1, 500, SHAPE), "AX FLAIR", "1.2.3.9")
    for name in sorted(os.listdir(folder)):  # a second echo: the same positions
        (folder / name.replace(".dcm", "_e2.dcm")).write_bytes((folder / name).read_bytes())
    with pytest.raises(
        DMAFDataError,
        match=rf"^{folder} \(DICOM series 'AX FLAIR', 40 files\): two slices at one "
        r"position \(1.2.3.9_0000.dcm and 1.2.3.9_0000_e2.dcm; 20 such pairs\): a "
        "repeated or multi-echo acquisition in one series",
    ):
        LoadModalitiesd("image", ("flair", "t1", "t1ce", "t2"))({"image": {"flair": str(folder)}})


def test_output_format_is_checked_before_any_work(studies, weights, tmp_path):
    root, _ = studies
    with pytest.raises(SystemExit, match=r"output_ext '.png': not a supported output format; use .nii.gz"):
        _run(root, tmp_path / "out", weights, output_ext=".png")
    assert not (tmp_path / "out").exists()
    json.dumps(find_studies(str(root), log=False))  # study entries stay JSON (a datalist can list DICOM series)
