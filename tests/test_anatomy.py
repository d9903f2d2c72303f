"""The anatomy phantoms (dmaf_components.data.anatomy): the sequences' signal equations by hand, contrast that follows
from the physics, deterministic cases on a template, and `dmaf synthetic brats --profile anatomy` in the BraTS
layout. A small hand-made template stands in for the MNI one (the real one needs nilearn)."""

from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np
import pytest

from dmaf_components.data.anatomy import (
    SEQUENCES,
    TISSUES,
    anatomy_case,
    find_template_dir,
    load_template,
    signal,
)
from dmaf_components.data.constants import DMAFDataError


def test_signal_equations_by_hand():
    wm = TISSUES["wm"]
    t2 = SEQUENCES["t2"]  # spin echo TR 4000, TE 100
    assert float(signal(t2, *wm)) == pytest.approx(0.70 * (1 - math.exp(-4000 / 884)) * math.exp(-100 / 72))
    t1 = SEQUENCES["t1"]  # inversion recovery TI 800, TR 2000, TE 4
    assert float(signal(t1, *wm)) == pytest.approx(
        0.70 * abs(1 - 2 * math.exp(-800 / 884) + math.exp(-2000 / 884)) * math.exp(-4 / 72)
    )
    # FLAIR's inversion time is the one that nulls CSF: CSF gives no signal, free of any picked intensity
    assert float(signal(SEQUENCES["flair"], *TISSUES["csf"])) == pytest.approx(0.0, abs=1e-12)


def test_contrast_follows_from_relaxation():
    s = {m: {t: float(signal(seq, *TISSUES[t])) for t in TISSUES} for m, seq in SEQUENCES.items()}
    assert s["flair"]["edema"] > 2 * s["flair"]["wm"]  # edema bright in FLAIR
    assert s["t2"]["csf"] > s["t2"]["edema"] > s["t2"]["gm"] > s["t2"]["wm"]  # T2: water bright
    assert s["t1"]["wm"] > s["t1"]["gm"] > s["t1"]["edema"] > s["t1"]["necrosis"]  # T1: water dark
    assert s["t1"]["necrosis"] < s["t1"]["csf"] * 2 and s["t2"]["necrosis"] > s["t2"]["edema"]


def test_cases_on_a_template(template_dir):
    tpl = load_template(template_dir, spacing=2.0, margin_mm=4)
    assert tpl.wm.shape == tpl.gm.shape == tpl.csf.shape and tpl.spacing == 2.0
    assert 0.5 < float(tpl.csf.max()) <= 1.0  # the ventricles, filled in as CSF
    images, label = anatomy_case(tpl, seed=3)
    again, label_again = anatomy_case(tpl, seed=3)
    other, label_other = anatomy_case(tpl, seed=4)
    assert np.array_equal(label, label_again) and all(np.array_equal(images[m], again[m]) for m in images)
    assert not np.array_equal(label, label_other)
    assert set(np.unique(label)) <= {0, 1, 2, 4} and (label == 2).any()
    brain = images["t1"] > 0
    assert all(np.array_equal(images[m] > 0, brain) for m in images)  # zero background, skull-stripped
    assert (label[~brain] == 0).all()
    # gadolinium makes the enhancing rim brighter in T1ce than in T1 (the only difference between the two)
    rim = label == 4
    assert rim.sum() > 5
    assert float(np.median(images["t1ce"][rim])) > 1.5 * float(np.median(images["t1"][rim]))
    edema = label == 2
    assert float(np.median(images["flair"][edema])) > float(np.median(images["flair"][brain & (label == 0)]))


def test_synthetic_anatomy_profile_writes_the_brats_layout(template_dir, tmp_path):
    from dmaf_components.data import synthesize_brats

    folders = synthesize_brats(
        str(tmp_path / "set"), cases=2, seed=1, profile="anatomy", spacing=2.0, template_dir=template_dir
    )
    case = os.path.basename(folders[0])
    seg = nib.load(os.path.join(folders[0], f"{case}_seg.nii.gz"))
    flair = nib.load(os.path.join(folders[0], f"{case}_flair.nii.gz"))
    assert np.allclose(np.diag(seg.affine)[:3], 2.0) and np.allclose(flair.affine, seg.affine)
    assert flair.shape == seg.shape and flair.get_data_dtype() == np.float32


def test_missing_template_is_one_line_and_writes_nothing(tmp_path):
    from dmaf_components.data import synthesize_brats

    with pytest.raises(DMAFDataError, match="missing template file"):
        find_template_dir(str(tmp_path))
    with pytest.raises(DMAFDataError, match="missing template file"):
        synthesize_brats(str(tmp_path / "out"), cases=1, profile="anatomy", template_dir=str(tmp_path))
    assert not (tmp_path / "out").exists()
