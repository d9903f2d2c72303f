"""Where the model is unsure (issue 26, item 3): the uni-modal decoders at inference without changing the network's
output or its export, the three measures, the map written on the input grid (3-D and 2-D), and the report's
``uncertainty`` summary."""

from __future__ import annotations

import json
import logging
import math
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from dmaf_components.data import BRATS_AFFINE, brats_case
from dmaf_components.networks import DMAFNet
from dmaf_components.uncertainty import (
    DEFAULT_THRESHOLDS,
    UncertaintyNet,
    flip_axes,
    label_disagreement,
    margin_uncertainty,
    modality_probabilities,
    normalized_entropy,
    uncertainty_network,
    uncertainty_summary,
)

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
INFERENCE = os.path.join(BUNDLE, "configs", "inference.json")
INFERENCE_MYOPS = os.path.join(BUNDLE, "configs", "inference_myops.json")
NET = {"channels": (4, 8, 16, 32), "num_layers": 1, "num_heads": 2}
SHAPE = (40, 36, 28)


def _net(spatial_dims: int = 3, modalities: int = 4) -> DMAFNet:
    torch.manual_seed(0)
    return DMAFNet(spatial_dims, modalities, 4, **NET).eval()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_uni_modal_decoders_at_inference_leave_the_output_and_the_export_unchanged(spatial_dims):
    """forward_with_modality_logits: the eval-mode logits bit for bit, D_s's logits as in training mode (zero for a
    missing modality), for a batch-uniform and a mixed mask; the scripted export has no such path and still matches
    the eager output."""
    net = _net(spatial_dims)
    x = torch.randn((2, 4) + (24,) * spatial_dims)
    for mask in (
        torch.tensor([[True, False, True, True]] * 2),
        torch.tensor([[True, False, True, True], [False, True, False, False]]),
    ):
        with torch.no_grad():
            ref = net(x, mask)
            pred = net.forward_with_modality_logits(x, mask)
            net.train()
            train = net(x, mask)
            net.eval()
        assert torch.equal(pred.logits, ref) and torch.equal(pred.modality_mask, mask)
        assert pred.modality_logits.shape == (2, 4, 4) + (24,) * spatial_dims
        assert torch.allclose(pred.modality_logits, train.modality_logits, atol=1e-5)  # instance norm: same in both
        assert torch.all(pred.modality_logits[~mask] == 0) and torch.all(pred.modality_logits[mask].abs().sum() > 0)
    scripted = torch.jit.script(net)
    assert not hasattr(scripted, "forward_with_modality_logits")
    assert set(scripted.state_dict()) == set(net.state_dict())
    mask = torch.tensor([[True, False, True, True]] * 2)
    with torch.no_grad():
        assert torch.allclose(scripted(x, mask), net(x, mask), atol=1e-4)


def test_the_measures_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).reshape(2, 4, 1, 1)
    e = normalized_entropy(logits).reshape(-1)
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0, 0.0]), 0)
    assert e[0].item() == pytest.approx(float(-(p * p.log()).sum() / math.log(4)), abs=1e-6)
    assert e[1].item() == pytest.approx(1.0, abs=1e-6)  # all classes equal
    # margin: 1 - (p_max - p_second); p = softmax(2, 0, 0, 0) = (e², 1, 1, 1) / (e² + 3)
    m = margin_uncertainty(logits).reshape(-1)
    assert m[0].item() == pytest.approx(1 - (math.exp(2) - 1) / (math.exp(2) + 3), abs=1e-6)
    assert m[1].item() == pytest.approx(1.0, abs=1e-6)  # a tie between the two largest
    probs = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]).reshape(2, 4, 1, 1)
    assert label_disagreement(logits, probs).reshape(-1).tolist() == pytest.approx([0.9, 0.75])  # label 0 both
    # modalities: the mean softmax over the present modalities only (a missing modality's zero logits are ignored)
    z = torch.randn(1, 3, 4, 2, 2)
    mask = torch.tensor([[True, False, True]])
    expected = (torch.softmax(z[:, 0], 1) + torch.softmax(z[:, 2], 1)) / 2
    assert torch.allclose(modality_probabilities(z, mask), expected, atol=1e-6)
    one = torch.tensor([[False, True, False]])  # a single present modality: its own decoder's softmax
    assert torch.allclose(modality_probabilities(z, one), torch.softmax(z[:, 1], 1), atol=1e-6)
    assert flip_axes(2) == [(), (2,), (3,), (2, 3)] and len(flip_axes(3)) == 8


@pytest.mark.parametrize("measure", ["modalities", "flips"])
def test_wrapper_appends_k_probabilities_after_the_network_output(measure):
    from dmaf_components.weight_maps import ModalityWeightsNet

    net = _net()
    x = torch.randn(1, 4, 24, 24, 16)
    mask = torch.tensor([[False, False, True, False]])  # one modality: still defined
    wrapped = UncertaintyNet(net, measure).eval()
    with torch.no_grad():
        out = wrapped(x, mask)
        ref = net(x, mask)
        u = label_disagreement(out[:, :4], out[:, 4:])
    assert out.shape == (1, 8, 24, 24, 16) and torch.equal(out[:, :4], ref)
    assert torch.allclose(out[:, 4:].sum(1), torch.ones(1), atol=1e-5)  # a probability per voxel
    assert torch.isfinite(u).all() and 0 <= float(u.min()) and float(u.max()) <= 1 and float(u.max()) > 0
    assert set(wrapped.state_dict()) == set(net.state_dict())
    # the weight wrapper around it: the uncertainty channels first, then the unflipped input's weights
    with torch.no_grad():
        both = ModalityWeightsNet(wrapped).eval()(x, mask)
        weights = ModalityWeightsNet(net).eval()(x, mask)[:, 4:]
    assert both.shape == (1, 12, 24, 24, 16)
    assert torch.equal(both[:, :8], out) and torch.allclose(both[:, 8:], weights, atol=1e-6)
    assert uncertainty_network(net, False, measure) is net and uncertainty_network(net, True, "entropy") is net
    with pytest.raises(SystemExit, match="uncertainty: expected one of entropy, margin, modalities, flips"):
        uncertainty_network(net, True, "variance")


def test_summary_matches_a_hand_count():
    """A 4 x 3 x 2 label map (BraTS values) with voxels of 2 x 1 x 3 mm (6 mm³) and a hand-made map."""
    label = np.zeros((4, 3, 2), np.uint8)
    label[0, :, 0] = 2  # 3 edema voxels
    label[1, :2, 0] = 1  # 2 necrosis voxels
    label[2, 0, 1] = 4  # 1 enhancing voxel
    u = np.zeros((4, 3, 2), np.float32)
    u[0, 0, 0] = 0.5  # edema, at the threshold: uncertain
    u[0, 1, 0] = 0.49  # edema, below
    u[1, 0, 0] = 0.9  # necrosis
    u[2, 0, 1] = 0.7  # enhancing
    u[3, 2, 1] = 0.8  # background
    affine = np.diag([-2.0, 1.0, 3.0, 1.0])
    regions = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
    s = uncertainty_summary(u[None], label[None], affine, regions, 0.5, label_values=[0, 1, 2, 4])
    assert s["threshold"] == 0.5 and s["voxel_volume_mm3"] == 6.0 and s["measure"] == "margin"
    assert s["uncertain"] == {"voxels": 4, "volume_mm3": 24.0}
    assert s["background"] == {"uncertain_voxels": 1, "uncertain_volume_mm3": 6.0}
    assert s["regions"]["WT"] == {
        "voxels": 6,
        "volume_mm3": 36.0,
        "uncertain_voxels": 3,
        "uncertain_volume_mm3": 18.0,
        "uncertain_fraction": 0.5,
        "mean_uncertainty": pytest.approx((0.5 + 0.49 + 0.9 + 0.7) / 6),
    }
    assert s["regions"]["TC"]["voxels"] == 3 and s["regions"]["TC"]["uncertain_voxels"] == 2
    assert s["regions"]["ET"]["voxels"] == 1 and s["regions"]["ET"]["uncertain_fraction"] == 1.0
    empty = uncertainty_summary(u, np.zeros_like(label), affine, regions, 0.5)
    assert empty["regions"]["ET"]["uncertain_fraction"] is None and empty["regions"]["ET"]["mean_uncertainty"] is None
    assert empty["background"]["uncertain_voxels"] == 4


def _study(tmp_path, modalities=("flair", "t1ce"), affine=None):
    images, _ = brats_case(SHAPE, seed=5)
    study = tmp_path / "in" / "s1"
    study.mkdir(parents=True)
    for m in modalities:
        nib.save(nib.Nifti1Image(images[m].astype(np.float32), affine), str(study / f"s1_{m}.nii.gz"))
    torch.save(_net().state_dict(), tmp_path / "model.pt")


def _run(tmp_path, config=INFERENCE, roi=(32, 32, 32), **override):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=config,
        workflow_type="infer",
        logging_file=False,
        bundle_root=BUNDLE,
        dataset_dir=str(tmp_path / "in"),
        output_dir=str(tmp_path / "out"),
        checkpoint=str(tmp_path / "model.pt"),
        roi_size=list(roi),
        channels=list(NET["channels"]),
        num_layers=1,
        num_heads=2,
        num_workers=0,
        **override,
    )
    wf.initialize()
    return wf.run()


def _check_map_and_report(out, case, label_values, regions, threshold, measure="margin"):
    seg = nib.load(str(out / f"{case}_seg.nii.gz"))
    umap = nib.load(str(out / f"{case}_uncertainty.nii.gz"))
    assert umap.shape == seg.shape and np.allclose(umap.affine, seg.affine, atol=1e-5)
    assert umap.get_data_dtype() == np.float32
    u = np.asarray(umap.dataobj)
    assert np.isfinite(u).all() and u.min() >= 0 and u.max() <= 1 and u.max() > 0
    report = json.loads((out / f"{case}_report.json").read_text())
    assert report["expected"] is None  # no quality table: the report is written for the uncertainty all the same
    expected = uncertainty_summary(u, np.asarray(seg.dataobj), seg.affine, regions, threshold, label_values, measure)
    got = dict(report["uncertainty"])
    assert got.pop("map") == f"{case}_uncertainty.nii.gz"
    assert got == json.loads(json.dumps(expected))
    return u, np.asarray(seg.dataobj), report


def test_bundle_writes_the_map_on_the_input_grid_and_the_reports_summary(tmp_path, caplog):
    """3-D: a non-RAS, anisotropic study with FLAIR + T1ce, margin (the default measure); a server's setting
    (``--save_uncertainty_map False``) writes no map and reports the same summary with ``map`` null."""
    affine = BRATS_AFFINE.copy()
    affine[:3, :3] = np.diag([-1.0, 1.2, 2.0])
    affine[:3, 3] = [30.0, -12.0, 4.0]
    _study(tmp_path, affine=affine)
    _run(tmp_path)  # off by default: nothing more than the label map
    assert sorted(os.listdir(tmp_path / "out")) == ["s1_seg.nii.gz"]
    with caplog.at_level(logging.INFO):
        _run(tmp_path, save_uncertainty="true", uncertainty_threshold=0.3, overwrite=True)
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["s1_report.json", "s1_seg.nii.gz", "s1_uncertainty.nii.gz"]
    u, seg, report = _check_map_and_report(out, "s1", [0, 1, 2, 4], {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}, 0.3)
    assert report["uncertainty"]["measure"] == "margin" and report["uncertainty"]["threshold"] == 0.3
    assert np.allclose(nib.load(str(out / "s1_uncertainty.nii.gz")).affine, affine, atol=1e-4)
    lines = [r.getMessage() for r in caplog.records if "uncertainty (margin >= 0.3)" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith("s1_uncertainty.nii.gz")
    with pytest.raises(SystemExit, match=r"result\(s\) exist already"):
        _run(tmp_path, save_uncertainty=True)
    os.remove(out / "s1_uncertainty.nii.gz")
    _run(tmp_path, save_uncertainty=True, uncertainty_threshold=0.3, save_uncertainty_map=False, overwrite=True)
    assert sorted(os.listdir(out)) == ["s1_report.json", "s1_seg.nii.gz"]
    again = json.loads((out / "s1_report.json").read_text())["uncertainty"]
    assert again.pop("map") is None and again == {k: v for k, v in report["uncertainty"].items() if k != "map"}


def test_a_single_modality_study_gets_its_report_with_the_modality_measure(tmp_path):
    """One present modality: the disagreement between the fused prediction and that modality's own decoder is still
    defined (two decoders on the same features), and the report and the map are written."""
    _study(tmp_path, modalities=("t2",), affine=BRATS_AFFINE)
    _run(tmp_path, save_uncertainty=True, uncertainty="modalities", save_weights=True)
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == [
        "s1_modality_weights.json",
        "s1_modality_weights.nii.gz",
        "s1_report.json",
        "s1_seg.nii.gz",
        "s1_uncertainty.nii.gz",
    ]
    _, _, report = _check_map_and_report(
        out,
        "s1",
        [0, 1, 2, 4],
        {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
        DEFAULT_THRESHOLDS["modalities"],
        "modalities",
    )
    assert report["modalities_used"] == ["t2"]
    weights = np.asarray(nib.load(str(out / "s1_modality_weights.nii.gz")).dataobj)
    assert set(np.unique(weights[..., 3]).tolist()) <= {0.0, 1.0}  # the one modality's weight: the weights follow


def test_myops_inference_writes_the_map_on_the_input_grid(tmp_path):
    """2-D (slice by slice, centre crop), test-time flips: the map comes back on the 3-D input grid, 0 outside the
    crop."""
    from dmaf_components.data import synthesize_myops

    synthesize_myops(str(tmp_path), cases=1, shape=(40, 44, 3))
    torch.save(_net(2, 3).state_dict(), tmp_path / "model.pt")
    os.rename(tmp_path / "train25", tmp_path / "in")
    _run(
        tmp_path,
        config=[INFERENCE, INFERENCE_MYOPS],
        roi=(32, 32),
        crop_size=[36, 36, -1],
        save_uncertainty=True,
        uncertainty="flips",
        save_snapshot=True,
    )
    out = tmp_path / "out"
    case = "myops_training_101"
    assert sorted(os.listdir(out)) == [
        f"{case}_{p}" for p in ("report.json", "seg.nii.gz", "snapshot.png", "uncertainty.nii.gz")
    ]
    u, _, report = _check_map_and_report(
        out, case, [0, 500, 600, 200], {"LVB": (1,), "RVB": (2,), "MYO": (3,)}, DEFAULT_THRESHOLDS["flips"], "flips"
    )
    assert u.shape == (40, 44, 3)
    assert np.all(u[:2] == 0) and np.all(u[-2:] == 0)  # outside the 36 x 36 centre crop the network never saw


def test_a_bad_measure_or_threshold_stops_the_run_before_any_study(tmp_path):
    _study(tmp_path, affine=BRATS_AFFINE)
    with pytest.raises(SystemExit, match="expected one of entropy, margin, modalities, flips, got 'variance'"):
        _run(tmp_path, save_uncertainty=True, uncertainty="variance")
    with pytest.raises(SystemExit, match=r"uncertainty_threshold: expected a number in \(0, 1\], got 1.5"):
        _run(tmp_path, save_uncertainty=True, uncertainty_threshold=1.5)
    assert not (tmp_path / "out").exists()
    _run(tmp_path, uncertainty="variance", uncertainty_threshold=1.5)  # not checked while the uncertainty is off
    assert sorted(os.listdir(tmp_path / "out")) == ["s1_seg.nii.gz"]
