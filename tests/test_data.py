"""Datalists (three layouts, case-355 quirk), IDT masks, synthetic data, transforms and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, CropForegroundd, MapLabelValued, NormalizeIntensityd, Orientationd
from monai.transforms import RandSpatialCropd, SpatialPadd

from dmaf_components.data import (
    BRATS_MODALITIES,
    DMAFDataError,
    build_datalist,
    idt_masks,
    load_datalist,
    missing_rates_of,
)
from dmaf_components.transforms import CheckLabelValuesd, LoadModalitiesd, ModalityDropd


def _copy_tree(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_brats_datalist_with_case_355_quirk(tiny_brats, tmp_path):
    root = _copy_tree(tiny_brats, tmp_path / "brats")
    case = root / "MICCAI_BraTS2020_TrainingData" / "BraTS20_Training_003"
    seg = case / "BraTS20_Training_003_seg.nii.gz"
    nib.save(nib.load(str(seg)), str(case / "W39_1998.09.19_Segm.nii"))  # uncompressed, odd name
    seg.unlink()
    dl = build_datalist(str(root), "brats", split=(3, 1, 2), seed=0)
    entries = dl["training"] + dl["validation"] + dl["testing"]
    assert len(entries) == 6 and [len(dl[k]) for k in ("training", "validation", "testing")] == [3, 1, 2]
    quirk = next(e for e in entries if e["case"] == "BraTS20_Training_003")
    assert quirk["label"].endswith("W39_1998.09.19_Segm.nii") and not os.path.isabs(quirk["label"])
    assert set(quirk["image"]) == set(BRATS_MODALITIES)
    assert all(len(e["modality_mask"]) == 4 and sum(e["modality_mask"]) >= 1 for e in dl["training"])
    assert "modality_mask" not in dl["testing"][0]
    # the same seed gives the same split and masks; paths resolve from the datalist's folder
    assert build_datalist(str(root), "brats", split=(3, 1, 2), seed=0) == dl
    path = root / "datalist.json"
    path.write_text(json.dumps(dl))
    loaded = load_datalist(str(path), "training")
    assert all(os.path.isfile(p) for e in loaded for p in e["image"].values())


def test_default_brats_split_is_the_papers(tmp_path):
    from dmaf_components.data import split_cases

    train, val, test = split_cases(369, (219, 50, 100), seed=3)
    assert (len(train), len(val), len(test)) == (219, 50, 100)
    assert not set(train) & set(val) and not set(val) & set(test)
    assert split_cases(10, (0.6, 0.2, 0.2))[0].__len__() == 6


def test_msd_layout(tiny_brats, tmp_path):
    src = tiny_brats / "MICCAI_BraTS2020_TrainingData"
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for i, case in enumerate(sorted(os.listdir(src))[:4]):
        vols = [nib.load(str(src / case / f"{case}_{m}.nii.gz")) for m in BRATS_MODALITIES]
        data = np.stack([np.asarray(v.dataobj) for v in vols], axis=-1)
        nib.save(nib.Nifti1Image(data, vols[0].affine), str(tmp_path / "imagesTr" / f"BRATS_{i:03d}.nii.gz"))
        shutil.copy(src / case / f"{case}_seg.nii.gz", tmp_path / "labelsTr" / f"BRATS_{i:03d}.nii.gz")
    dl = build_datalist(str(tmp_path), "auto", split=(2, 1, 1))
    assert dl["layout"] == "msd" and dl["training"][0]["image"].startswith("imagesTr/")
    entry = load_datalist_entry(tmp_path, dl, "training")
    img, available = LoadModalitiesd("image", BRATS_MODALITIES).load(entry["image"])
    assert img.shape == (4, 48, 48, 32) and available.all()


def load_datalist_entry(root, dl, section):
    path = root / "dl.json"
    path.write_text(json.dumps(dl))
    return load_datalist(str(path), section)[0]


def test_myops_layout_and_label_merge(tiny_myops):
    dl = build_datalist(str(tiny_myops), "auto")
    assert dl["layout"] == "myops" and dl["modalities"] == ["bssfp", "lge", "t2"]
    assert dl["missing_rates"] == {"bssfp": 0.3, "lge": 0.5, "t2": 0.7}
    entries = dl["training"] + dl["validation"] + dl["testing"]
    assert len(entries) == 5 and all(e["label"].endswith("_gd.nii.gz") for e in entries)
    entry = load_datalist_entry(tiny_myops, dl, "testing")
    from monai.transforms import LoadImaged

    from dmaf_components.data.constants import MYOPS_LABELS

    # the mapping training uses (train_myops.json) against the MyoPS 2020 release's label values: 200 normal
    # myocardium, 500 LV blood pool, 600 RV blood pool, 1220 edema, 2221 scar; edema and scar train as myocardium
    with open(
        os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle", "configs", "train_myops.json"
        )
    ) as f:
        cfg = json.load(f)  # an override of train.json: read its two entries as they are written
    values, targets = cfg["label_values"], cfg["label_targets"]
    released = {
        0: "background",
        200: "myocardium",
        500: "LV blood pool",
        600: "RV blood pool",
        1220: "myocardium",
        2221: "myocardium",
    }
    trained = {name: k for k, name in MYOPS_LABELS.items()}
    want = {raw: trained[name] for raw, name in released.items()}
    assert dict(zip(values, targets)) == want
    raw = LoadImaged("label", ensure_channel_first=True)({"label": entry["label"]})["label"]
    d = MapLabelValued("label", orig_labels=values, target_labels=targets)({"label": raw.clone()})
    assert set(torch.unique(d["label"]).tolist()) == {0, 1, 2, 3}
    for v in torch.unique(raw).tolist():  # every voxel of the loaded file lands in its documented class
        assert (d["label"][raw == v] == want[int(v)]).all(), v


def test_idt_missing_rates_over_1000_cases_and_determinism():
    rates = [0.6, 0.2, 0.4, 0.8]  # flair, t1, t1ce, t2 (the paper's)
    masks = idt_masks(1000, rates, seed=7)
    assert (masks.sum(1) >= 1).all()
    realised = missing_rates_of(masks, BRATS_MODALITIES)
    for got, want in zip(realised.values(), rates):
        assert abs(got - want) < 0.04  # binomial sd at n = 1000 is <= 0.016
    assert np.array_equal(idt_masks(1000, rates, seed=7), masks)
    assert not np.array_equal(idt_masks(1000, rates, seed=8), masks)
    exact = idt_masks(1000, rates, seed=7, exact=True)
    assert (exact.sum(1) >= 1).all() and len(exact) == 1000
    from dmaf_components.data.datalist import conditional_rates

    q = conditional_rates(np.array(rates))
    full = (exact == np.array([1, 1, 1, 1])).all(1).sum()  # P(all present) / (1 - P(none present))
    assert full == round(1000 * np.prod(1 - q) / (1 - np.prod(q)))
    for got, want in zip(missing_rates_of(exact, BRATS_MODALITIES).values(), rates):
        assert abs(got - want) < 0.005  # exact counts: only rounding


def test_synthetic_is_deterministic_and_heterogeneous(tmp_path):
    from dmaf_components.data import brats_case

    a, la = brats_case((64, 64, 40), seed=5)
    b, lb = brats_case((64, 64, 40), seed=5)
    assert np.array_equal(la, lb) and all(np.array_equal(a[m], b[m]) for m in a)
    assert set(np.unique(la)) <= {0, 1, 2, 4} and (la == 2).any() and (la == 4).any()
    mean = {m: {c: a[m][la == c].mean() for c in (2, 4)} for m in a}
    assert mean["flair"][2] > mean["t1"][2] and mean["t2"][2] > mean["t1"][2]  # edema: FLAIR/T2
    assert mean["t1ce"][4] == max(mean[m][4] for m in a)  # enhancing rim: T1ce
    assert np.array_equal(a["t1"][la == 0] == 0, a["flair"][la == 0] == 0)  # skull-stripped, one brain mask


def test_brats_study_profile_hides_one_boundary_per_modality_on_the_same_shapes(monkeypatch):
    """The 3-D study's data (docs/accuracy.md): same labels as the demo profile; with the noise and bias fields off,
    T1ce shows no edema, FLAIR and T2 no enhancing rim, and T1ce shows the rim; skull-stripped."""
    from dmaf_components.data import brats_case, phantoms

    demo, la = brats_case((64, 64, 40), seed=5)
    study, lb = brats_case((64, 64, 40), seed=5, profile="study")
    assert np.array_equal(la, lb)  # the same shapes: only the appearance differs
    assert np.array_equal(study["t1"] == 0, demo["t1"] == 0)  # the same brain mask, zero outside
    monkeypatch.setattr(phantoms, "_BRATS_STUDY_NOISE", 0.0)
    monkeypatch.setattr(phantoms, "_BRATS_STUDY_BIAS", 0.0)
    clean, _ = brats_case((64, 64, 40), seed=5, profile="study")
    mean = {m: {c: clean[m][lb == c].mean() for c in (2, 4)} for m in clean}
    white = clean["t1ce"][(lb == 0) & (clean["t1ce"] > 0.7 * mean["t1ce"][2])].mean()  # white matter and the like
    # equal contrasts up to the per-case tissue jitter (+-8 % each) and partial volume
    assert abs(mean["t1ce"][2] - white) < 0.25 * white  # no whole-tumour boundary in T1ce
    assert mean["t1ce"][4] > 1.3 * mean["t1ce"][2]  # the enhancing rim is visible there
    for m in ("flair", "t2"):  # no ET boundary in FLAIR/T2
        assert abs(mean[m][4] - mean[m][2]) < 0.25 * mean[m][2]
    with pytest.raises(ValueError, match="profile: expected demo or study"):
        brats_case((8, 8, 8), profile="hard")


def test_synthetic_workers_write_the_same_files(tmp_path):
    from dmaf_components.data import synthesize_myops

    one = synthesize_myops(str(tmp_path / "a"), cases=3, shape=(24, 24, 2), profile="study")
    two = synthesize_myops(str(tmp_path / "b"), cases=3, shape=(24, 24, 2), profile="study", workers=2)
    for f1, f2 in zip(one, two):
        assert np.array_equal(nib.load(f1).get_fdata(), nib.load(f2).get_fdata())
        img1 = f1.replace("train25_myops_gd", "train25").replace("_gd.nii.gz", "_DE.nii.gz")
        img2 = f2.replace("train25_myops_gd", "train25").replace("_gd.nii.gz", "_DE.nii.gz")
        assert np.array_equal(nib.load(img1).get_fdata(), nib.load(img2).get_fdata())
    assert not [f for d in ("a", "b") for f in os.listdir(tmp_path / d / "train25") if f.startswith(".")]  # atomic


def _pipeline(mode="idt", roi=(32, 32, 32)):
    return Compose(
        [
            LoadModalitiesd("image", BRATS_MODALITIES, label_keys="label"),
            CheckLabelValuesd("label", (0, 1, 2, 4)),
            Orientationd(["image", "label"], axcodes="RAS"),
            MapLabelValued("label", orig_labels=[0, 1, 2, 4], target_labels=[0, 1, 2, 3]),
            CropForegroundd(["image", "label"], source_key="image"),
            NormalizeIntensityd("image", nonzero=True, channel_wise=True),
            SpatialPadd(["image", "label"], spatial_size=roi),
            RandSpatialCropd(["image", "label"], roi_size=roi, random_size=False),
            ModalityDropd("image", mode=mode),
        ]
    )


def test_transforms_mask_channels_and_write_modality_mask(tiny_brats):
    dl = build_datalist(str(tiny_brats), "brats", split=(4, 1, 1), seed=2)
    path = tiny_brats / "dl_t.json"
    path.write_text(json.dumps(dl))
    entries = load_datalist(str(path), "training")
    entry = dict(entries[0], modality_mask=[1, 0, 1, 0])
    del entry["image"]["t2"]  # a missing file: loaded as zeros, never shown
    out = _pipeline()(entry)
    assert out["image"].shape == (4, 32, 32, 32)
    assert out["modality_mask"].tolist() == [True, False, True, False]
    assert not out["image"][1].any() and not out["image"][3].any() and out["image"][0].any()
    assert set(torch.unique(out["label"]).tolist()) <= {0, 1, 2, 3}
    pdt = _pipeline("pdt")
    pdt.set_random_state(0)
    seen = set()
    for _ in range(40):
        o = pdt(dict(entries[1]))
        mask = o["modality_mask"]
        assert mask.any() and all(not o["image"][i].any() for i in range(4) if not mask[i])
        seen.add(tuple(mask.tolist()))
    assert len(seen) >= 10  # many of the 15 combinations are drawn


# ----------------------------------------------------------------------------------------------- bad input
def _brats_copy(tiny_brats, tmp_path):
    return _copy_tree(tiny_brats, tmp_path / "b")


def _case(root, i=1):
    name = f"BraTS20_Training_{i:03d}"
    return root / "MICCAI_BraTS2020_TrainingData" / name, name


def _case_file(tiny_brats, tmp_path, suffix, case=1):
    """A fresh copy of the dataset and one of its files, loaded for corruption: (folder, name, path, image, data)."""
    folder, name = _case(_brats_copy(tiny_brats, tmp_path), case)
    path = folder / f"{name}_{suffix}.nii.gz"
    img = nib.load(str(path))
    return folder, name, path, img, np.asarray(img.dataobj).copy()


def test_missing_segmentation_names_the_case(tiny_brats, tmp_path):
    root = _brats_copy(tiny_brats, tmp_path)
    folder, name = _case(root, 2)
    (folder / f"{name}_seg.nii.gz").unlink()
    with pytest.raises(DMAFDataError, match=f"{name} has no segmentation file"):
        build_datalist(str(root), "brats")


def test_case_without_any_modality_file(tiny_brats, tmp_path):
    root = _brats_copy(tiny_brats, tmp_path)
    folder, name = _case(root, 4)
    for m in BRATS_MODALITIES:
        (folder / f"{name}_{m}.nii.gz").unlink()
    with pytest.raises(DMAFDataError, match=f"{name} has no modality file"):
        build_datalist(str(root), "brats")
    with pytest.raises(DMAFDataError, match="no modality file at all"):
        LoadModalitiesd("image", BRATS_MODALITIES)({"image": {}, "case": name})


def test_shape_and_affine_mismatch(tiny_brats, tmp_path):
    folder, name, t1, img, data = _case_file(tiny_brats, tmp_path, "t1")
    nib.save(nib.Nifti1Image(data[:40], img.affine), str(t1))
    files = {m: str(folder / f"{name}_{m}.nii.gz") for m in BRATS_MODALITIES}
    with pytest.raises(DMAFDataError, match=rf"{name}_t1.nii.gz: shape \(40, 48, 32\) differs"):
        LoadModalitiesd("image", BRATS_MODALITIES)({"image": files})
    affine = img.affine.copy()
    affine[0, 3] += 5
    nib.save(nib.Nifti1Image(data, affine), str(t1))
    with pytest.raises(DMAFDataError, match=f"{name}_t1.nii.gz: affine differs"):
        LoadModalitiesd("image", BRATS_MODALITIES)({"image": files})


def test_label_values_outside_the_set(tiny_brats, tmp_path):
    folder, name, seg, img, data = _case_file(tiny_brats, tmp_path, "seg")
    data[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(data, img.affine), str(seg))
    from monai.transforms import LoadImaged

    d = LoadImaged("label", ensure_channel_first=True)({"label": str(seg)})
    with pytest.raises(DMAFDataError, match=r"_seg.nii.gz: label values \[3\] outside the expected set"):
        CheckLabelValuesd("label", (0, 1, 2, 4))(d)


def test_nan_voxels_and_truncated_file(tiny_brats, tmp_path):
    folder, name, flair, img, data = _case_file(tiny_brats, tmp_path, "flair")
    data = data.astype(np.float32)
    data[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(flair))
    loader = LoadModalitiesd("image", BRATS_MODALITIES)
    with pytest.raises(DMAFDataError, match=f"{name}_flair.nii.gz: contains NaN voxels"):
        loader({"image": {"flair": str(flair)}})
    t2 = folder / f"{name}_t2.nii.gz"
    raw = t2.read_bytes()
    t2.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DMAFDataError, match=f"{name}_t2.nii.gz: cannot read"):
        loader({"image": {"t2": str(t2)}})
    with pytest.raises(DMAFDataError, match="file not found"):
        loader({"image": {"t1": str(folder / "nope.nii.gz")}})


@pytest.mark.slow
def test_unknown_layout_and_cli_one_line_error(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(DMAFDataError, match="unknown dataset layout"):
        build_datalist(str(tmp_path / "junk"))
    proc = subprocess.run(
        [sys.executable, "-m", "dmaf_components.cli", "datalist", "auto", str(tmp_path / "junk")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown dataset layout" in proc.stderr


@pytest.mark.slow
def test_cli_writes_datalist_and_never_overwrites(tiny_brats, tmp_path):
    out = tmp_path / "dl.json"
    cmd = [
        sys.executable,
        "-m",
        "dmaf_components.cli",
        "datalist",
        "brats",
        str(tiny_brats),
        "--output",
        str(out),
        "--split",
        "4,1,1",
        "--missing_rates",
        "t1=0.2,t1ce=0.4,flair=0.6,t2=0.8",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "realised" in proc.stdout
    before = out.read_text()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "exists already" in proc.stderr and out.read_text() == before


def test_flip_rotation_draws_and_refuses_mismatched_keys():
    """RandFlipRotated flips each axis with flip_prob and rotates with prob (not one for the other), angles within
    their ranges; keys of different spatial shapes are an error naming both."""
    from dmaf_components.transforms import RandFlipRotated

    augment = RandFlipRotated(["image", "label"], flip_prob=0.5, prob=0.2, range_x=0.3, range_y=(0.0, 0.1))
    augment.set_random_state(0)
    flips, rotations, angles = [], [], []
    for _ in range(2000):
        augment.randomize(3)
        flips.append(augment.flips)
        rotations.append(augment._do_transform)
        angles.append(augment.angles)
    flips, angles = np.array(flips), np.array(angles)
    assert np.all(np.abs(flips.mean(0) - 0.5) < 0.04) and abs(np.mean(rotations) - 0.2) < 0.03
    assert -0.3 <= angles[:, 0].min() < -0.25 and 0.25 < angles[:, 0].max() <= 0.3
    assert 0.0 <= angles[:, 1].min() and angles[:, 1].max() <= 0.1 and np.all(angles[:, 2] == 0)
    assert RandFlipRotated("image", range_x=[0.2], range_y=(0.1,)).ranges[:2] == [(-0.2, 0.2), (-0.1, 0.1)]  # MONAI's
    augment.flip_prob = augment.prob = 0.0  # nothing drawn: still checked
    with pytest.raises(ValueError, match="'label' has spatial shape \\(8, 8, 6\\), 'image' has \\(8, 8, 8\\)"):
        augment({"image": torch.zeros(1, 8, 8, 8), "label": torch.zeros(1, 8, 8, 6)})


@pytest.mark.parametrize("config", ["train.json", "train_myops.json"])  # MyoPS: merged over train.json
def test_bundle_flip_rotation_is_monai_flips_then_rotation(config):
    """The bundle's spatial augmentation (RandFlipRotated: flips folded into one float32 resampling) gives what MONAI's
    Flip per drawn axis followed by Rotate in float64 give for the same draws: image within float rounding, labels
    equal, the MetaTensor affine equal (from an oblique, scaled, shifted affine: the order of the product matters);
    with and without the rotation, on a non-cubic volume (an axis mix-up fails)."""
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor
    from monai.transforms import Flip, Rotate

    from dmaf_components.transforms import RandFlipRotated

    parser = ConfigParser()
    parser.read_config(
        [
            os.path.join(os.path.dirname(__file__), "..", "bundle", "configs", c)
            for c in dict.fromkeys(["train.json", config])
        ]
    )
    (augment,) = [t for t in parser.get_parsed_content("train#augmentation") if isinstance(t, RandFlipRotated)]
    shape = (22, 26, 18) if config == "train.json" else (30, 26)
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = torch.tensor([[0.0, -1.2, 0.0], [0.9, 0.0, 0.3], [0.0, 0.2, 2.5]], dtype=torch.float64)
    affine[:3, 3] = torch.tensor([-90.0, 12.5, 40.0], dtype=torch.float64)
    rotated = set()
    for seed in range(8):
        data = {
            "image": MetaTensor(torch.randn(2, *shape), affine=affine),
            "label": MetaTensor(torch.randint(0, 4, (1, *shape)).float(), affine=affine),
        }
        augment.prob = 0.5
        augment.set_random_state(seed)
        out = augment(dict(data))
        rotated.add(augment._do_transform)
        for key, mode in (("image", "bilinear"), ("label", "nearest")):
            ref = data[key]
            for axis, flipped in enumerate(augment.flips):
                if flipped:
                    ref = Flip(spatial_axis=axis)(ref)
            if augment._do_transform:
                angle = augment.angles[0] if len(shape) == 2 else augment.angles
                ref = Rotate(angle, keep_size=True, mode=mode, padding_mode="zeros", dtype=torch.float64)(ref)
            if key == "image":
                torch.testing.assert_close(out[key].as_tensor(), ref.as_tensor(), atol=1e-4, rtol=0)
            else:
                assert torch.equal(out[key].as_tensor(), ref.as_tensor()), (config, seed, augment.flips)
            torch.testing.assert_close(out[key].affine, ref.affine)
    assert rotated == {True, False}
