"""The evaluation's metrics against answers worked out by hand (not against the code's own aggregation): Dice and
HD95 of small masks, anisotropic voxels, every empty-region case under the BraTS rule and MyoPS's diagonal, each
BraTS region's label set, and the ET post-processing threshold."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.handlers import from_engine

from dmaf_components.evaluation import RegionDice, RegionHausdorffDistance, suppress_small_et

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")


def _mask(shape, *voxels, spacing=(1.0, 1.0, 1.0)):
    """One-region map ``(1, *shape)`` with the given voxels set, as a MetaTensor with that voxel spacing."""
    m = torch.zeros(1, *shape)
    for v in voxels:
        m[(0, *v)] = 1
    return MetaTensor(m, affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))


def _score(metric, pairs):
    """Run ``metric`` over ``(pred, label)`` pairs with an Ignite engine; return ``(per-pair values, details)``."""
    engine = Engine(lambda e, batch: batch)
    metric.attach(engine, "m")
    engine.run([{"pred": [p], "label": [g]} for p, g in pairs], max_epochs=1)
    return engine.state.metric_details["m"], engine.state.metric_details


def test_dice_by_hand_and_both_empty_is_one():
    cube = [(x, y, z) for x in (1, 2) for y in (1, 2) for z in (1, 2)]  # 8 voxels
    shifted = [(x, y, z) for x in (1, 2) for y in (1, 2) for z in (2, 3)]  # 8 voxels, 4 shared with cube
    empty = _mask((6, 6, 6))
    values, _ = _score(
        RegionDice(output_transform=from_engine(["pred", "label"])),
        [
            (_mask((6, 6, 6), *cube), _mask((6, 6, 6), *shifted)),  # 2 * 4 / (8 + 8)
            (empty, empty),  # nothing to find, nothing found: 1 (BraTS), not NaN (ignore_empty=True would say NaN)
            (empty, _mask((6, 6, 6), *cube)),  # missed everything: 0
            (_mask((6, 6, 6), *cube), empty),  # found something that is not there: 0
        ],
    )
    assert values[:, 0].tolist() == pytest.approx([0.5, 1.0, 0.0, 0.0])


def test_hd95_uses_the_voxel_spacing():
    # one voxel each, 3 voxels apart along x (2 mm voxels) and 4 along y (1 mm): sqrt(6^2 + 4^2) mm, whatever the
    # percentile; without the spacing it would be 5 voxels
    sp = (2.0, 1.0, 1.0)
    values, _ = _score(
        RegionHausdorffDistance(output_transform=from_engine(["pred", "label"])),
        [
            (_mask((8, 10, 4), (2, 2, 1), spacing=sp), _mask((8, 10, 4), (5, 6, 1), spacing=sp)),
        ],
    )
    assert float(values[0, 0]) == pytest.approx(math.sqrt(52.0), abs=1e-4)


def test_hd95_is_the_larger_directed_95th_percentile():
    # ground truth: a line of 21 voxels along x; prediction: its first voxel only. Directed prediction -> truth: 0;
    # truth -> prediction: distances 0..20, whose 95th percentile is 19 (numpy's linear interpolation); MONAI's
    # undirected HD95 is the larger of the two
    gt = _mask((24, 3, 3), *[(x, 1, 1) for x in range(21)])
    values, _ = _score(
        RegionHausdorffDistance(output_transform=from_engine(["pred", "label"])),
        [
            (_mask((24, 3, 3), (0, 1, 1)), gt),
        ],
    )
    assert float(values[0, 0]) == pytest.approx(19.0)


@pytest.mark.parametrize("empty_distance, one_empty", [(373.13, 373.13), ("diagonal", math.sqrt(9**2 + 12**2))])
def test_every_empty_region_case(empty_distance, one_empty):
    """BraTS: 373.13 mm when exactly one side is empty, 0 when both are; MyoPS: the image's diagonal (a 2-D slice
    of 9 x 8 voxels at 1 x 1.5 mm spans 9 by 12 mm: 15 mm)."""
    sp = (1.0, 1.5)

    def m2(*voxels):
        m = torch.zeros(1, 9, 8)
        for v in voxels:
            m[(0, *v)] = 1
        return MetaTensor(m, affine=torch.diag(torch.tensor([*sp, 1.0, 1.0], dtype=torch.float64)))

    metric = RegionHausdorffDistance(empty_distance=empty_distance, output_transform=from_engine(["pred", "label"]))
    values, details = _score(
        metric,
        [
            (m2(), m2((3, 3))),  # prediction empty
            (m2((3, 3)), m2()),  # ground truth empty
            (m2(), m2()),  # both empty
            (m2((3, 3)), m2((3, 3))),  # both present and equal
        ],
    )
    assert values[:, 0].tolist() == pytest.approx([one_empty, one_empty, 0.0, 0.0])
    assert details["m_empty"][:, 0].tolist() == [1, 2, 3, 0]


def test_empty_regions_left_out_only_on_request():
    values, _ = _score(
        RegionHausdorffDistance(empty_distance=None, output_transform=from_engine(["pred", "label"])),
        [(_mask((4, 4, 4)), _mask((4, 4, 4), (1, 1, 1)))],
    )
    assert math.isnan(float(values[0, 0]))
    with pytest.raises(ValueError, match="empty_distance"):
        RegionHausdorffDistance(empty_distance=-1)


def test_evaluate_config_scores_empty_regions_by_the_brats_rule():
    from monai.bundle import ConfigParser

    for dataset, expected in (("brats", 373.13), ("myops", "diagonal")):
        parser = ConfigParser()
        parser.read_config([os.path.join(BUNDLE, "configs", c) for c in ("train.json", "evaluate.json")])
        parser["dataset_name"] = dataset
        assert parser.get_parsed_content("hd95_empty_distance") == expected
        for name in ("hd95", "hd95_et_postprocessed"):
            assert parser[f"evaluation#additional_metrics#{name}#empty_distance"] == "@hd95_empty_distance"
    assert json.load(open(os.path.join(BUNDLE, "configs", "evaluate.json")))["et_min_voxels"] == 500


def test_brats_regions_are_the_challenges_label_sets():
    """Trained classes 1 necrosis, 2 edema, 3 enhancing tumour: WT = {1, 2, 3}, TC = {1, 3}, ET = {3}, counted on a
    map with 1, 2 and 4 voxels of each."""
    from monai.bundle import ConfigParser

    from dmaf_components.transforms import LabelToRegionsd

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    regions = parser.get_parsed_content("regions")
    label = torch.zeros(1, 4, 4, 4)
    label[0, 0, 0, 0] = 1
    label[0, 1, 0, :2] = 2
    label[0, 2, 0, :] = 3
    out = LabelToRegionsd("label", regions)({"label": label})["label"]
    assert list(regions) == ["WT", "TC", "ET"]
    assert out.flatten(1).sum(1).tolist() == [7.0, 5.0, 4.0]


def test_small_enhancing_tumour_becomes_necrosis_below_500_voxels():
    label = torch.zeros(1, 20, 20, 20, dtype=torch.long)
    label.view(-1)[:499] = 3  # 499 ET voxels: below the threshold, relabelled necrosis (1), not edema (2)
    out = suppress_small_et(label)
    assert int((out == 3).sum()) == 0 and int((out == 1).sum()) == 499
    label.view(-1)[:500] = 3  # 500: kept
    assert int((suppress_small_et(label) == 3).sum()) == 500
