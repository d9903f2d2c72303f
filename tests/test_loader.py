"""The training loader: the deterministic prefix (with the pad) is cached by default and the random part reads the
cache without copying it, pad-then-crop gives exactly what crop-then-pad gave, and the loader thread's errors reach
the training loop."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from test_bundle import BUNDLE, data_dir  # noqa: F401  (module fixture: tiny BraTS set with a datalist)


def test_crop_then_pad_equals_pad_then_crop():
    """train.json pads the volume to the patch size in the cached prefix and crops the random patch from it (release
    0.1.6 padded every cropped patch, a 33 MB copy per BraTS sample): with the same random state the patch is
    identical, on axes shorter than the patch too."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, Randomizable, RandSpatialCropd, SpatialPadd

    roi = (32, 32, 32)
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    parser.update({"roi_size": list(roi), "patch_sampling": "uniform"})
    steps = parser.get_parsed_content("train#preprocessing").transforms
    first_random = next(i for i, t in enumerate(steps) if isinstance(t, Randomizable))
    # CacheDataset caches up to the first random transform: the pad is the last cached step, the crop the first random
    pad, crop = steps[first_random - 1], steps[first_random]
    assert isinstance(pad, SpatialPadd) and isinstance(crop, RandSpatialCropd)
    data = {"image": torch.randn(4, 40, 27, 50), "label": torch.randint(0, 4, (1, 40, 27, 50)).float()}
    for seed in range(5):
        a = Compose([pad, crop])  # train.json's order
        b = Compose(
            [RandSpatialCropd(["image", "label"], roi, random_size=False), SpatialPadd(["image", "label"], roi)]
        )
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


@pytest.mark.slow
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


def _train_loader(data_dir, configs, datalist, prob=None):  # noqa: F811  (a dataset root, not the fixture)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(BUNDLE, "configs", c) for c in configs])
    parser.update(
        {
            "dataset_dir": str(data_dir),
            "datalist": str(datalist),
            "train_num_workers": 0,
            "device": "$torch.device('cpu')",
        }
    )
    if configs == ["train.json"]:
        parser["roi_size"] = [16, 16, 16]
    else:  # MyoPS: 2-D patches from the 3-slice synthetic cases
        parser.update({"roi_size": [32, 32], "crop_size": [48, 48, -1]})
    if prob is not None:  # every random transform always (1.0) or never (0.0) applied
        for t in parser["train#augmentation"]:
            for key in ("prob", "flip_prob"):
                if key in t:
                    t[key] = prob
    return parser.get_parsed_content("train#dataloader")


def test_random_part_never_writes_into_the_cache(data_dir, tiny_myops, tmp_path):  # noqa: F811
    """train#dataset reads the cached volumes without a deep copy per sample (copy_cache false; release 0.1.6 copied
    each whole cached volume per sample, docs/performance.md). That is safe only while no random transform writes into
    its input's data and the batch never shares memory with the cache: checked for BraTS (train.json) and MyoPS
    (train_myops.json), with every transform applied and with none (then the crop is a view of the cache), while the
    consumer overwrites each batch in place. (MONAI's spatial transforms do update the cached metadata's pixdim array
    in place; the bundle drops the metadata at EnsureTyped and never reads it.)"""
    from dmaf_components.data import CheckedThreadDataLoader, build_datalist, write_datalist

    myops_list = tmp_path / "myops.json"
    write_datalist(build_datalist(str(tiny_myops), "myops", split=(4, 1, 0), seed=0), str(myops_list))
    cases = [
        (data_dir, ["train.json"], data_dir / "datalist.json"),
        (tiny_myops, ["train.json", "train_myops.json"], myops_list),
    ]
    for root, configs, datalist in cases:
        for prob in (1.0, 0.0):
            loader = _train_loader(root, configs, datalist, prob)
            assert isinstance(loader, CheckedThreadDataLoader) and loader.dataset.dataset.copy_cache is False
            cache = loader.dataset.dataset._cache
            before = [{k: v.clone() for k, v in item.items() if torch.is_tensor(v)} for item in cache]
            for epoch in range(2):
                loader.sampler.set_epoch(epoch)
                for batch in loader:
                    batch["image"].fill_(7.0)
                    batch["label"].fill_(7.0)
            for item, saved in zip(cache, before):
                for key, value in saved.items():
                    assert torch.equal(torch.as_tensor(item[key]), torch.as_tensor(value)), (configs, prob, key)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # MONAI's thread dies (below)
def test_loader_thread_gives_the_plain_loaders_batches_and_raises_its_errors():
    """The bundle's CheckedThreadDataLoader yields what a DataLoader with the same sampler yields, in order. A sample
    that raises in its background thread stops the epoch with that error. MONAI's own ThreadDataLoader only ends the
    iteration (the thread's traceback goes to stderr, no exception reaches the loop, and Ignite restarts the loader to
    fill the epoch)."""
    import pytest
    from monai.data import DataLoader, ThreadDataLoader

    from dmaf_components.data import CheckedThreadDataLoader

    class Cases(torch.utils.data.Dataset):
        def __init__(self, bad=None):
            self.bad = bad

        def __len__(self):
            return 7

        def __getitem__(self, i):
            if i == self.bad:
                raise ValueError(f"case{i}.nii.gz: label value 9 not allowed")
            return {"image": torch.full((2, 3), float(i)), "case": f"case{i}"}

    def batches(cls, dataset):
        loader = cls(dataset, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(3))
        return [(b["image"].clone(), b["case"]) for epoch in range(2) for b in loader]

    threaded, plain = batches(CheckedThreadDataLoader, Cases()), batches(DataLoader, Cases())
    assert len(threaded) == len(plain) == 8
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(threaded, plain))
    assert len(batches(ThreadDataLoader, Cases(bad=5))) < 8  # MONAI's: no error, fewer batches
    with pytest.raises(ValueError, match="case5.nii.gz: label value 9"):
        batches(CheckedThreadDataLoader, Cases(bad=5))
    with pytest.raises(ValueError, match="use_thread_workers"):
        CheckedThreadDataLoader(Cases(), num_workers=2, use_thread_workers=True)
    with pytest.raises(ValueError, match="repeats must be 1"):
        CheckedThreadDataLoader(Cases(), repeats=2)


def test_training_loader_uses_its_thread_on_two_cores():
    """train.json's train_num_workers: the background thread (0) where worker processes would take the transforms'
    CPU to move batches between processes (at most 2 CPUs), else num_workers worker processes as before;
    num_workers (cache-filling threads, validation and evaluation loaders) keeps min(4, CPUs)."""
    from monai.bundle import ConfigParser

    from dmaf_components.data import available_cpus, train_loader_workers

    assert [train_loader_workers(4, c) for c in (1, 2, 3, 16)] == [0, 0, 4, 4]
    assert train_loader_workers(0, 16) == 0 and train_loader_workers(2, 2) == 0
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    assert parser.get_parsed_content("num_workers") == min(4, available_cpus())
    assert parser.get_parsed_content("train_num_workers") == train_loader_workers(min(4, available_cpus()))
    assert parser["train#dataloader"]["num_workers"] == "@train_num_workers"


def test_a_label_off_its_images_grid_is_a_one_line_error_naming_the_case_and_both_files(tmp_path):
    """The bundle's loader compares a label's shape and affine with its study's, as ``dmaf check`` does (same
    messages, same 1e-3 tolerance): a label one voxel short, or mirrored (an axis of its affine flipped), used to be
    trained on and scored without a word."""
    import nibabel as nib
    import numpy as np

    from dmaf_components.data import DMAFDataError
    from dmaf_components.transforms import LoadModalitiesd

    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    image = np.random.default_rng(0).random((8, 9, 10)).astype(np.float32)
    label = np.zeros((8, 9, 10), np.uint8)
    label[2:5, 3:6, 4:7] = 1
    for name in ("s_flair", "s_t1"):
        nib.save(nib.Nifti1Image(image, affine), str(tmp_path / f"{name}.nii.gz"))
    mirrored = affine.copy()
    mirrored[0, 0], mirrored[0, 3] = -1.0, 7.0
    nudged = affine.copy()
    nudged[1, 3] = 5e-4  # within the tolerance
    files = {"short": (label[:, :, :-1], affine), "mirrored": (label, mirrored), "nudged": (label, nudged)}
    for name, (array, aff) in files.items():
        nib.save(nib.Nifti1Image(array, aff), str(tmp_path / f"{name}_seg.nii.gz"))
    loader = LoadModalitiesd("image", ("flair", "t1", "t1ce", "t2"), label_keys="label")
    study = {"flair": str(tmp_path / "s_flair.nii.gz"), "t1": str(tmp_path / "s_t1.nii.gz")}

    def load(name, image=study):
        return loader({"case": "s", "image": image, "label": str(tmp_path / f"{name}_seg.nii.gz")})

    short = str(tmp_path / "short_seg.nii.gz")
    with pytest.raises(
        DMAFDataError, match=f"^s: {short}: shape \\(8, 9, 9\\) differs from s_flair.nii.gz \\(8, 9, 10\\)$"
    ):
        load("short")
    mirrored = str(tmp_path / "mirrored_seg.nii.gz")
    with pytest.raises(
        DMAFDataError, match=f"^s: {mirrored}: affine differs from s_flair.nii.gz \\(largest difference 7\\)$"
    ):
        load("mirrored")
    with pytest.raises(DMAFDataError, match="affine differs from s_t1.nii.gz"):  # the first file present
        load("mirrored", {"t1": study["t1"]})
    out = load("nudged")
    assert out["label"].shape == (1, 8, 9, 10) and out["image"].shape == (4, 8, 9, 10)
