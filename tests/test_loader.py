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


_FAULTS = r"""
import ctypes, json, resource, sys, torch
from dmaf_components.data import keep_freed_memory

ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB page faults whatever the kernel's THP policy

def faults():  # minor page faults of 5 rounds of a 4 x 96^3 x 10 float32 array (35 MB, above glibc's mmap threshold)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        x = torch.empty(40, 96, 96, 96)
        x.fill_(1.0)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

class Rounds(torch.utils.data.Dataset):  # a data-loader worker forked after the setting: each item is faults()
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return faults()


if __name__ == "__main__":
    default = faults()
    applied = keep_freed_memory()
    faults()  # the heap grows once
    kept = faults()
    worker = [int(n) for n in torch.utils.data.DataLoader(Rounds(), num_workers=1, batch_size=None)]
    print(json.dumps({"default": default, "applied": applied, "kept": kept, "worker": worker}))
"""


def test_keep_freed_memory_stops_the_page_faults_of_large_arrays(tmp_path):
    """Arrays above glibc's mmap threshold are unmapped at free, so each new one page-faults all its pages again
    (the cost behind the loader's and the CPU inference's time, docs/performance.md); after keep_freed_memory() a
    freed block is reused, in the process and in the loader workers it forks. Run in a fresh process: the setting is
    process-wide."""
    import json
    import subprocess
    import sys

    import pytest

    script = tmp_path / "faults.py"
    script.write_text(_FAULTS)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    if not r["applied"]:
        pytest.skip("not glibc: keep_freed_memory() changes nothing here")
    pages = 40 * 96**3 * 4 // 4096
    assert r["default"] > 4 * pages  # glibc as it comes (huge pages off for the probe): every round faults all
    # glibc as it comes: every round faults the whole array in again; kept: the rounds reuse the same mapped pages
    assert r["kept"] * 20 < r["default"]
    assert r["worker"][1] * 20 < r["default"]  # a loader worker forked afterwards inherits it (after its first item)


def test_bundle_configs_keep_freed_memory_first_and_can_be_turned_off():
    """Every workflow config calls keep_freed_memory() before anything else (before the cache is filled and the
    workers are forked), and `--keep_freed_memory False` leaves the allocator alone."""
    import json
    from unittest import mock

    import pytest
    from monai.bundle import ConfigParser

    for name in ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json", "multi_gpu_evaluate.json"):
        with open(os.path.join(BUNDLE, "configs", name)) as f:
            first = json.load(f)["initialize"][0]
        assert first == "$dmaf_components.data.keep_freed_memory(@keep_freed_memory)", name
    from dmaf_components.data import keep_freed_memory

    assert keep_freed_memory(False) is False  # off: nothing is set (this process is left alone)
    with pytest.raises(TypeError, match="keep_freed_memory must be True or False"):
        keep_freed_memory("false")
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "inference.json"))
    with mock.patch("dmaf_components.data.keep_freed_memory", return_value=True) as keep:
        parser.get_parsed_content("initialize#0")
    keep.assert_called_once_with(True)  # the bundle's default
