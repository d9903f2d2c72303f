"""The training loader: the deterministic prefix is cached by default, and the random part's cheaper order (crop, then
pad) gives exactly what pad-then-crop gave."""

from __future__ import annotations

import logging
import os

import torch

from test_bundle import BUNDLE, data_dir  # noqa: F401  (module fixture: tiny BraTS set with a datalist)


def test_crop_then_pad_equals_pad_then_crop():
    """train.json crops the random patch before padding it (padding the whole cropped-foreground volume first copied
    ~75 MB per BraTS sample): with the same random state the patch is identical, on axes shorter than the patch too."""
    from monai.transforms import Compose, RandSpatialCropd, SpatialPadd

    roi = (32, 32, 32)
    data = {"image": torch.randn(4, 40, 27, 50), "label": torch.randint(0, 4, (1, 40, 27, 50)).float()}
    pad, crop = SpatialPadd(["image", "label"], roi), RandSpatialCropd(["image", "label"], roi, random_size=False)
    for seed in range(5):
        a = Compose([SpatialPadd(["image", "label"], roi), RandSpatialCropd(["image", "label"], roi, random_size=False)])
        b = Compose([crop, pad])
        a.set_random_state(seed)
        b.set_random_state(seed)
        out_a, out_b = a(dict(data)), b(dict(data))
        assert out_a["image"].shape == out_b["image"].shape == (4, *roi)
        assert torch.equal(out_a["image"].as_tensor(), out_b["image"].as_tensor())
        assert torch.equal(out_a["label"].as_tensor(), out_b["label"].as_tensor())


def test_bundle_caches_the_deterministic_prefix_and_says_how_much(data_dir, caplog):  # noqa: F811
    from monai.bundle import ConfigParser
    from monai.data import CacheDataset

    from dmaf_components.data import log_cache_size

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    parser.update({"dataset_dir": str(data_dir), "num_workers": 0, "device": "$torch.device('cpu')"})
    dataset = parser.get_parsed_content("train#dataset")
    assert isinstance(dataset, CacheDataset) and len(dataset._cache) == len(dataset) == 4
    with caplog.at_level(logging.INFO, logger="dmaf_components"):
        size = log_cache_size(dataset)
    assert size > 4 * 4 * 20**3 * 4  # four cases of four channels, cropped to the foreground
    assert "training cache: 4 of 4 cases in memory" in caplog.text
    assert any("log_cache_size" in step for step in parser["run"])
