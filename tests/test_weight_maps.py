"""DMAF's modality weights a_m as an inference output (issue 12 F): a wrapper that leaves the network and its
checkpoint unchanged, stitched by the sliding-window inferer, written as a 4-D NIfTI on the input grid with a
per-region JSON summary."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from dmaf_components.data import BRATS_AFFINE, brats_case
from dmaf_components.networks import DMAFNet
from dmaf_components.weight_maps import ModalityWeightsNet, modality_weights_network

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
INFERENCE = os.path.join(BUNDLE, "configs", "inference.json")
NET = {"channels": (4, 8, 16, 32), "num_layers": 1, "num_heads": 2}
SHAPE = (40, 36, 28)


def _net(**kw):
    torch.manual_seed(0)
    return DMAFNet(3, 4, 4, **{**NET, **kw}).eval()


def test_wrapper_returns_the_network_logits_and_level_weights_and_leaves_the_network_unchanged():
    net = _net()
    x = torch.randn(1, 4, 24, 24, 16)
    mask = torch.tensor([[True, False, True, True]])
    wrapped = ModalityWeightsNet(net).eval()
    with torch.no_grad():
        out = wrapped(x, mask)
        ref = net(x, mask)
    assert out.shape == (1, 4 + 4, 24, 24, 16)
    assert torch.equal(out[:, :4], ref)  # the network's own output, bit for bit
    w = out[:, 4:]
    assert torch.allclose(w.sum(1), torch.ones(1, 24, 24, 16), atol=1e-5) and bool((w[:, 1] == 0).all())
    assert bool((w >= 0).all())
    # the same a_m as the first DMAF module computes (full resolution)
    with torch.no_grad():
        feats = net.encode(x * mask[:, :, None, None, None], mask)
        assert torch.allclose(w, net.fusions[0].spatial_weights(feats[0], mask), atol=1e-5)
    assert all(not f._forward_hooks for f in net.fusions)  # hooks removed after each call
    assert list(wrapped.state_dict()) == list(net.state_dict())  # the checkpoint format is the network's
    with torch.no_grad():
        mean = ModalityWeightsNet(net, level="mean")(x, mask)[:, 4:]
    assert torch.allclose(mean.sum(1), torch.ones(1, 24, 24, 16), atol=1e-5) and bool((mean[:, 1] == 0).all())
    assert modality_weights_network(net, "false") is net
    with pytest.raises(SystemExit, match="modality weights exist only with fusion 'dmaf'"):
        modality_weights_network(_net(fusion="mean"), True)
    with pytest.raises(SystemExit, match="weights_level: expected a level 0..3 or 'mean', got 7"):
        modality_weights_network(net, True, 7)


def test_sliding_window_stitches_weights_that_still_sum_to_one():
    from dmaf_components.inferers import ModalitySlidingWindowInferer

    net = ModalityWeightsNet(_net()).eval()
    x = torch.randn(1, 4, 40, 36, 20)
    x[:, 2] = 0  # t1ce missing
    inferer = ModalitySlidingWindowInferer(roi_size=(24, 24, 16), sw_batch_size=2, overlap=0.5, mode="gaussian")
    with torch.no_grad():
        out = inferer(x, net)
    w = out[:, 4:]
    assert out.shape == (1, 8, 40, 36, 20)
    assert torch.allclose(w.sum(1), torch.ones(1, 40, 36, 20), atol=1e-4) and bool((w[:, 2] == 0).all())


def test_bundle_writes_weight_maps_on_the_input_grid_and_a_region_summary(tmp_path):
    from monai.bundle import ConfigWorkflow

    images, _ = brats_case(SHAPE, seed=5)
    study = tmp_path / "in" / "s1"
    study.mkdir(parents=True)
    affine = BRATS_AFFINE.copy()
    affine[:3, :3] = np.diag([-1.0, 1.2, 2.0])  # not RAS, anisotropic: the maps must come back to this grid
    affine[:3, 3] = [30.0, -12.0, 4.0]
    for m, name in (("flair", "s1_flair.nii.gz"), ("t1ce", "s1_T1Gd.nii.gz")):
        nib.save(nib.Nifti1Image(images[m].astype(np.float32), affine), str(study / name))
    torch.save(_net().state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"
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
        save_weights="true",
    )
    wf.initialize()
    wf.run()
    assert sorted(os.listdir(out)) == ["s1_modality_weights.json", "s1_modality_weights.nii.gz", "s1_seg.nii.gz"]
    maps = nib.load(str(out / "s1_modality_weights.nii.gz"))
    seg = nib.load(str(out / "s1_seg.nii.gz"))
    assert maps.shape == SHAPE + (4,) and np.allclose(maps.affine, affine, atol=1e-4)
    assert np.allclose(seg.affine, affine, atol=1e-4)
    w = np.asarray(maps.dataobj)
    assert np.all(w[..., 1] == 0) and np.all(w[..., 3] == 0)  # t1 and t2 are missing
    # inside the box the network saw (CropForegroundd: any channel > 0) the weights sum to 1; outside they are 0.
    # The study was resampled to 1 mm and the maps back by nearest neighbour: every voxel carries weights the network
    # produced (no blend with the zeros outside), and the box's edge may move by one input voxel
    nz = np.nonzero((images["flair"] > 0) | (images["t1ce"] > 0))
    box, grown = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    box[tuple(slice(i.min(), i.max() + 1) for i in nz)] = True
    grown[tuple(slice(max(i.min() - 1, 0), i.max() + 2) for i in nz)] = True
    total = w.sum(-1)
    assert np.allclose(total[np.isclose(total, 0, atol=1e-4) == 0], 1.0, atol=1e-4)  # 0 or 1, nothing between
    assert np.allclose(total[box], 1.0, atol=1e-4) and np.all(total[~grown] == 0)
    summary = json.loads((out / "s1_modality_weights.json").read_text())
    assert summary["present"] == ["flair", "t1ce"] and summary["missing"] == ["t1", "t2"]
    assert summary["segmentation"] == "s1_seg.nii.gz" and summary["channels"] == ["flair", "t1", "t1ce", "t2"]
    labels = np.asarray(seg.dataobj)
    for region, values in (("WT", (1, 2, 4)), ("TC", (1, 4)), ("ET", (4,))):
        entry = summary["regions"][region]
        inside = np.isin(labels, values)
        assert entry["voxels"] == int(inside.sum())
        assert set(entry["mean_weight"]) == {"flair", "t1ce"}  # a value per present modality and region
        if entry["voxels"]:
            for i, m in ((0, "flair"), (2, "t1ce")):
                assert entry["mean_weight"][m] == pytest.approx(float(w[..., i][inside].mean()), abs=1e-5)
        else:
            assert set(entry["mean_weight"].values()) == {None}
    assert summary["regions"]["WT"]["voxels"] > 0
    # a rerun keeps every result unless --overwrite true
    with pytest.raises(SystemExit, match=r"3 result\(s\) exist already"):
        wf.run()
