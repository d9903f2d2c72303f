"""The picture a person opens first (issue "3-D that learns", item 3): ``--save_snapshot True`` writes
``<study>_snapshot.png`` next to the label map: three orthogonal slices through the predicted tumour's centre, one
row per present modality with the labels overlaid, a row of DMAF's weights when they are saved, a row of the
uncertainty map when it is computed (issue 26), the missing modalities in the title."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch

from dmaf_components.data import BRATS_AFFINE, DMAFDataError, brats_case
from dmaf_components.snapshots import save_figure, snapshot_figure, snapshot_views

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
INFERENCE = os.path.join(BUNDLE, "configs", "inference.json")
MODALITIES = ["flair", "t1", "t1ce", "t2"]
NET = {"channels": (4, 8, 16, 32), "num_layers": 1, "num_heads": 2}
SHAPE = (32, 32, 24)
#: an LPS-stored, anisotropic grid (BraTS files are LPS): the picture must still show R on the left, A and S up
AFFINE = np.diag([-1.0, -1.0, 2.0, 1.0])


def _label(shape=SHAPE):
    """A hand-made label: edema box, enhancing core inside, off-centre (centre of mass (9.5, 20.5, 6.5))."""
    lab = np.zeros(shape, np.uint8)
    lab[6:14, 17:25, 4:10] = 2
    lab[8:12, 19:23, 5:9] = 4
    return lab


def _image(shape=SHAPE):
    rng = np.random.default_rng(0)
    img = np.zeros((4,) + shape, np.float32)
    img[:, 2:-2, 2:-2, 1:-1] = rng.uniform(0.5, 1.0, (4, shape[0] - 4, shape[1] - 4, shape[2] - 2))
    return img


def test_slices_pass_through_the_predicted_foreground_centre_and_the_volume_centre_when_empty():
    views, centre = snapshot_views(_label()[None], AFFINE)
    assert centre == pytest.approx((9.5, 20.5, 6.5))
    assert [(v.name, v.axis, v.index) for v in views] == [("axial", 2, 6), ("coronal", 1, 20), ("sagittal", 0, 10)]
    # every displayed plane cuts the foreground
    assert all(v.plane(_label()).any() for v in views)
    # radiological display of an LPS grid: axial rows run A->P (y grows towards P: no flip), columns R->L
    axial = views[0]
    assert (axial.rows, axial.cols, axial.flip_rows, axial.flip_cols, axial.top, axial.left) == (
        1,
        0,
        False,
        False,
        "A",
        "R",
    )
    assert (views[1].top, views[1].left, views[1].flip_rows) == ("S", "R", True)  # z grows towards S: flipped
    assert (views[2].top, views[2].left) == ("S", "A")
    empty, none = snapshot_views(np.zeros(SHAPE), AFFINE)
    assert none is None and [v.index for v in empty] == [12, 16, 16]  # shape // 2
    # a 2-D model (slice by slice along the axial axis): the slice with the most foreground
    lab = _label()
    lab[:, :, 7] = 0
    lab[0:30, 0:30, 3] = 1
    (one,), _ = snapshot_views(lab, AFFINE, spatial_dims=2)
    assert (one.name, one.axis, one.index) == ("slice", 2, 3)
    (mid,), _ = snapshot_views(np.zeros(SHAPE), AFFINE, spatial_dims=2)
    assert mid.index == SHAPE[2] // 2


def test_panel_layout_title_legend_and_display_orientation():
    img, present = _image(), [True, False, True, False]
    fig = snapshot_figure(img, _label(), AFFINE, MODALITIES, present, label_values=[0, 1, 2, 4], case="s1")
    assert len(fig.axes) == 3 * 2  # three views x (flair, t1ce)
    assert [a.get_label() for a in fig.axes] == [
        "flair/axial",
        "flair/coronal",
        "flair/sagittal",
        "t1ce/axial",
        "t1ce/coronal",
        "t1ce/sagittal",
    ]
    assert [a.get_title() for a in fig.axes[:3]] == ["axial 6/23", "coronal 20/31", "sagittal 10/31"]
    title = fig._suptitle.get_text()
    assert "s1: segmented from flair, t1ce; missing: t1, t2" in title and "no tumour predicted" not in title
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [
        "1 necrotic/non-enhancing core (0 voxels)",
        "2 edema (320 voxels)",
        "4 enhancing tumour (64 voxels)",
    ]
    # the overlay of the axial panel covers the label's plane, in display orientation, with the voxel spacing's aspect
    axial = fig.axes[0]
    overlay = axial.images[1].get_array()
    view = snapshot_views(_label(), AFFINE)[0][0]
    assert np.array_equal(overlay[..., 3] > 0, view.plane(_label()) > 0)
    assert fig.axes[1].get_aspect() == pytest.approx(2.0)  # coronal: 2 mm rows, 1 mm columns
    # the weight row, and a marker at the patient's right-anterior corner shown top-left of the axial panel
    img[:, 2:4, 2:4, :] = 5.0
    weights = np.zeros((4,) + SHAPE, np.float32)
    weights[0], weights[2] = 0.25, 0.75
    fig = snapshot_figure(img, _label(), AFFINE, MODALITIES, present, weights=weights, label_values=[0, 1, 2, 4])
    assert len(fig.axes) == 3 * 3 and [a.get_label() for a in fig.axes[6:]] == [
        "weights/axial",
        "weights/coronal",
        "weights/sagittal",
    ]
    shown = fig.axes[0].images[0].get_array()
    assert shown[2:4, 2:4].min() == 1.0 and shown[-4:-2, -4:-2].max() < 1.0  # window clips the marker at white
    assert [t.get_text() for t in fig.legends[1].get_texts()] == ["flair 0.25", "t1ce 0.75"]
    # the uncertainty row (after the weights), its outline of the uncertain voxels and their count in the legend
    uncertainty = np.zeros((1,) + SHAPE, np.float32)
    uncertainty[0, 10:14, 10:14, :] = 0.8  # 4 x 4 x 24 = 384 voxels at or above 0.5
    uncertainty[0, 20, 20, 3] = 0.3
    fig = snapshot_figure(
        img,
        _label(),
        AFFINE,
        MODALITIES,
        present,
        weights=weights,
        label_values=[0, 1, 2, 4],
        uncertainty=uncertainty,
        uncertainty_threshold=0.5,
        uncertainty_measure="entropy",
    )
    assert len(fig.axes) == 3 * 4 and [a.get_label() for a in fig.axes[9:]] == [
        "uncertainty/axial",
        "uncertainty/coronal",
        "uncertainty/sagittal",
    ]
    assert fig.axes[9].get_ylabel() == "uncertainty (entropy)" and fig.axes[6].get_ylabel() == "DMAF weights a_m"
    shown = fig.axes[9].images[0].get_array()
    assert shown.max() == pytest.approx(0.8) and shown.min() == 0.0
    assert [t.get_text() for t in fig.legends[2].get_texts()] == [">= 0.5: 384 voxels"]
    fig = snapshot_figure(img, _label(), AFFINE, MODALITIES, present, uncertainty=uncertainty[0])  # no weights
    assert [a.get_label() for a in fig.axes[6:]] == ["uncertainty/axial", "uncertainty/coronal", "uncertainty/sagittal"]
    fig = snapshot_figure(img, np.zeros(SHAPE, np.uint8), AFFINE, MODALITIES, present, label_values=[0, 1, 2, 4])
    assert "no tumour predicted" in fig._suptitle.get_text()
    assert [a.get_title() for a in fig.axes[:3]] == ["axial 12/23", "coronal 16/31", "sagittal 16/31"]


def test_planes_of_the_network_input_are_sampled_back_onto_the_input_grid():
    """The bundle draws from the network's input (reoriented to RAS, cropped): only the shown planes are mapped back
    through the two affines. They must equal the input grid's own planes."""
    from monai.data import MetaTensor
    from monai.transforms import CropForeground, Orientation

    img, present = _image(), [True, False, True, False]
    pre = CropForeground()(Orientation(axcodes="RAS")(MetaTensor(torch.as_tensor(img), affine=torch.as_tensor(AFFINE))))
    assert tuple(pre.shape[1:]) == (28, 28, 22)
    direct = snapshot_figure(img, _label(), AFFINE, MODALITIES, present, label_values=[0, 1, 2, 4])
    sampled = snapshot_figure(
        pre, _label(), AFFINE, MODALITIES, present, image_affine=pre.affine, label_values=[0, 1, 2, 4]
    )
    for a, b in zip(direct.axes, sampled.axes):
        # the panels are cropped to the box the network saw plus 2 voxels: here the whole grid
        assert np.allclose(a.images[0].get_array(), b.images[0].get_array(), atol=1e-4)
        assert np.array_equal(a.images[1].get_array(), b.images[1].get_array())
    assert not np.allclose(direct.axes[0].images[0].get_array(), np.flip(direct.axes[0].images[0].get_array(), 0))


def test_the_picture_is_written_atomically_and_never_replaces_a_result(tmp_path):
    fig = snapshot_figure(_image(), _label(), AFFINE, MODALITIES, label_values=[0, 1, 2, 4])
    target = str(tmp_path / "s1_snapshot.png")
    save_figure(fig, target)
    with pytest.raises(DMAFDataError, match="exists already; kept"):
        save_figure(fig, target)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    before = open(target, "rb").read()
    fig.savefig = broken
    with pytest.raises(DMAFDataError, match="cannot write the snapshot .*No space left"):
        save_figure(fig, target, overwrite=True)
    assert os.listdir(tmp_path) == ["s1_snapshot.png"] and open(target, "rb").read() == before


def test_bundle_inference_writes_the_snapshot_beside_the_label_map(tmp_path):
    """End to end through configs/inference.json (tiny random network): a FLAIR + T1ce study."""
    import matplotlib.image as mpimg
    from monai.bundle import ConfigWorkflow

    from dmaf_components.networks import DMAFNet

    images, _ = brats_case(SHAPE, seed=5)
    study = tmp_path / "in" / "s1"
    study.mkdir(parents=True)
    affine = BRATS_AFFINE.copy()
    affine[2, 2] = 1.5  # anisotropic: resampled to 1 mm for the network, shown on the input grid
    for m, name in (("flair", "s1_flair.nii.gz"), ("t1ce", "s1_t1ce.nii.gz")):
        nib.save(nib.Nifti1Image(images[m].astype(np.float32), affine), str(study / name))
    torch.manual_seed(0)
    torch.save(DMAFNet(3, 4, 4, **NET).state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"

    def run(**override):
        wf = ConfigWorkflow(
            config_file=INFERENCE,
            workflow_type="infer",
            logging_file=False,
            bundle_root=BUNDLE,
            dataset_dir=str(tmp_path / "in"),
            output_dir=str(out),
            checkpoint=str(tmp_path / "model.pt"),
            roi_size=[32, 32, 32],
            channels=list(NET["channels"]),
            num_layers=1,
            num_heads=2,
            num_workers=0,
            **override,
        )
        wf.initialize()
        wf.run()

    run()  # off by default
    assert sorted(os.listdir(out)) == ["s1_seg.nii.gz"]
    run(save_snapshot="true", save_weights=True, save_uncertainty=True, overwrite=True)
    assert sorted(os.listdir(out)) == [
        "s1_modality_weights.json",
        "s1_modality_weights.nii.gz",
        "s1_report.json",
        "s1_seg.nii.gz",
        "s1_snapshot.png",
        "s1_uncertainty.nii.gz",
    ]
    png = mpimg.imread(str(out / "s1_snapshot.png"))
    assert png.ndim == 3 and png.shape[2] in (3, 4)
    assert 1000 <= png.shape[0] <= 2000 and 500 <= png.shape[1] <= 1500  # 4 rows of 3 panels, a title, legends
    assert float(png[..., :3].std()) > 0.05  # not a blank page
    with pytest.raises(SystemExit, match=r"result\(s\) exist already \(s1_seg.nii.gz, s1_snapshot.png\)"):
        run(save_snapshot=True)


def test_myops_inference_writes_the_picture_of_the_segmented_slice(tmp_path):
    import matplotlib.image as mpimg
    from monai.bundle import ConfigWorkflow

    from dmaf_components.data import synthesize_myops
    from dmaf_components.networks import DMAFNet

    synthesize_myops(str(tmp_path), cases=1, shape=(40, 44, 3))
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
        save_snapshot=True,
    )
    wf.initialize()
    wf.run()
    assert sorted(os.listdir(out)) == ["myops_training_101_seg.nii.gz", "myops_training_101_snapshot.png"]
    png = mpimg.imread(str(out / "myops_training_101_snapshot.png"))
    assert 400 <= png.shape[0] <= 1500 and 150 <= png.shape[1] <= 800  # one column: the slice, one row per modality
