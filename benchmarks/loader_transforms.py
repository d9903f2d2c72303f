# Copyright (c) DMAF-Net bundle contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Cost of each random transform of the bundle's training pipeline, one thread, on cached full-size samples; the flips
and rotation of 128^3 patches as release 0.1.7 ran them (MONAI's RandFlipd per axis and RandRotated in float32) vs the
bundle's RandFlipRotated (one resampling), side by side; and one whole training sample in release 0.1.7's pipeline
vs the bundle's (alternating).

    python benchmarks/loader_transforms.py --data data/loader_bench --samples 16
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from machine import machine_line

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/loader_bench", help="a set made by benchmarks/dataloader.py")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--rotations", type=int, default=12, help="patches with the rotation forced")
    parser.add_argument(
        "--random-part-only",
        action="store_true",
        help="only the per-transform cost of the random part (no side-by-side comparisons)",
    )
    args = parser.parse_args()
    from monai.bundle import ConfigParser
    from monai.transforms import Randomizable

    from dmaf_components.data import keep_freed_memory

    keep_freed_memory()  # as every bundle workflow does first
    torch.set_num_threads(1)
    print(machine_line())
    config = ConfigParser()
    config.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    config.update({"dataset_dir": os.path.abspath(args.data), "num_workers": 0, "cache_rate": 1.0})
    cache = config.get_parsed_content("train#dataset")._cache
    augmentation = config.get_parsed_content("train#augmentation")
    first_random = next(i for i, t in enumerate(augmentation) if isinstance(t, Randomizable))
    augmentation = augmentation[first_random:]  # what runs per sample; the rest is in the cache
    cost: dict[str, float] = {}
    for i in range(args.samples):
        d = {k: v.clone() if torch.is_tensor(v) else v for k, v in cache[i % len(cache)].items()}
        for t in augmentation:
            start = time.perf_counter()
            d = t(d)
            name = type(t).__name__
            cost[name] = cost.get(name, 0.0) + time.perf_counter() - start
    print(f"random part, 1 thread, {args.samples} cached samples of {args.data} (ms per sample, summed per type):")
    for name, total in cost.items():
        print(f"  {name:<24} {1000 * total / args.samples:7.1f}")
    print(f"  {'total':<24} {1000 * sum(cost.values()) / args.samples:7.1f}")

    if not args.random_part_only:
        spatial(config, cache, args.samples, args.rotations)
        whole_sample(args.data, args.samples * 3)


def spatial(config, cache, samples: int, rotations: int) -> None:
    """Flips and rotation of cached samples' patches: release 0.1.7's MONAI ``RandFlipd`` per axis and ``RandRotated``
    (float32), the same composed lazily (MONAI's own fusion into one resampling) and the bundle's ``RandFlipRotated``,
    alternating, on the same patches; the rotation forced off and on (the draws differ between the three), then mixed
    at the configured rotation probability."""
    import sys

    from monai.transforms import Compose, RandSpatialCropd

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dataloader import monai_flips_and_rotation

    raw = config["train#augmentation"]
    (i,) = [k for k, t in enumerate(raw) if t["_target_"] == "dmaf_components.transforms.RandFlipRotated"]
    prob = raw[i]["prob"]
    names = ("0.1.7", "lazy", "bundle")
    variants = {}
    for rotation_prob in (0.0, 1.0):
        for name in names:
            transforms = [dict(t) for t in (monai_flips_and_rotation([raw[i]]) if name != "bundle" else [raw[i]])]
            for t in transforms:
                if t["_target_"] != "RandFlipd":
                    t["prob"] = rotation_prob
            config["spatial_probe"] = transforms
            # lazy: MONAI's own fusion of the same transforms into one resampling (lazy resampling, MONAI >= 1.2), in
            # float32 as the others (its pending operations are otherwise applied in float64)
            lazy = {"lazy": True, "overrides": {"dtype": torch.float32}} if name == "lazy" else {}
            variants[(name, rotation_prob)] = Compose(config.get_parsed_content("spatial_probe"), **lazy)
    roi = config.get_parsed_content("roi_size")
    crop = RandSpatialCropd(["image", "label"], roi_size=roi, random_size=False)
    cost = {}
    for rotation_prob, n in ((0.0, samples * 3), (1.0, rotations)):
        total = dict.fromkeys(names, 0.0)
        for j in range(n):
            crop.set_random_state(j)
            patch = crop({k: cache[j % len(cache)][k] for k in ("image", "label")})
            for name in names if j % 2 else names[::-1]:
                transform = variants[(name, rotation_prob)]
                transform.set_random_state(j)
                start = time.perf_counter()
                transform(dict(patch))
                total[name] += time.perf_counter() - start
        for name in total:
            cost[(name, rotation_prob)] = total[name] / n
        old, lazy, new = (1000 * total[k] / n for k in names)
        what = "flips only (rotation off)" if rotation_prob == 0 else "flips + rotation (rotation forced)"
        print(
            f"{'x'.join(map(str, roi))} patch, {what}, {n} patches: MONAI's RandFlipd x3 + RandRotated (0.1.7) "
            f"{old:.1f} ms, the same lazily (MONAI's fused resampling, float32) {lazy:.1f} ms, "
            f"RandFlipRotated {new:.1f} ms ({old / new:.2f}x)"
        )
    old, lazy, new = (1000 * ((1 - prob) * cost[(k, 0.0)] + prob * cost[(k, 1.0)]) for k in names)
    print(
        f"  mixed at the configured rotation probability {prob}: 0.1.7 {old:.1f} ms, lazy {lazy:.1f} ms, "
        f"RandFlipRotated {new:.1f} ms per sample ({old / new:.2f}x)"
    )


def whole_sample(data: str, samples: int) -> None:
    """One sample of train#dataset, the cache read included, in release 0.1.7's pipeline (MONAI's flips and rotation)
    and the bundle's, alternating, with the same sample seeds (the same crops; other flip and rotation draws). The
    rotated and the other samples are timed apart and mixed at the configured rotation probability."""
    import sys

    from monai.bundle import ConfigParser

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dataloader import previous_pipeline

    datasets = {}
    for name in ("0.1.7", "bundle"):
        config = ConfigParser()
        config.read_config(os.path.join(BUNDLE, "configs", "train.json"))
        config.update({"dataset_dir": os.path.abspath(data), "num_workers": 0, "cache_rate": 1.0})
        if name == "0.1.7":
            previous_pipeline(config, "0.1.7")
        datasets[name] = config.get_parsed_content("train#dataloader").dataset  # SeededDataset(CacheDataset)
    rotations = {}  # the pipeline's rotating transform: was this sample rotated?
    for name, dataset in datasets.items():
        (rotations[name],) = [
            t for t in dataset.dataset.transform.transforms if type(t).__name__ in ("RandRotated", "RandFlipRotated")
        ]
    prob = rotations["bundle"].prob
    times: dict[tuple[str, bool], list[float]] = {}
    n = len(datasets["bundle"])
    for i in range(samples):
        for name in list(datasets) if i % 2 else list(datasets)[::-1]:
            start = time.perf_counter()
            datasets[name][(i % n, 1000 + i)]
            elapsed = time.perf_counter() - start
            times.setdefault((name, bool(rotations[name]._do_transform)), []).append(elapsed)
    # the draws differ between the pipelines, so each is weighted by the configured rotation probability (a plain
    # mean would carry the binomial noise of how many samples each happened to rotate: about 0.3 s each)
    cost = {}
    for name in datasets:
        plain, rotated = (np.mean(times.get((name, r), [np.nan])) for r in (False, True))
        cost[name] = (1 - prob) * plain + prob * rotated
        print(
            f"  {name:>6}: {len(times.get((name, False), []))} samples not rotated {1000 * plain:.1f} ms, "
            f"{len(times.get((name, True), []))} rotated {1000 * rotated:.1f} ms"
        )
    old, new = (1000 * cost[k] for k in ("0.1.7", "bundle"))
    print(
        f"one training sample (cache read + random part), 1 thread, {samples} samples, the same seeds, weighted by "
        f"the rotation probability {prob}: 0.1.7 pipeline {old:.1f} ms, bundle {new:.1f} ms ({old / new:.2f}x)"
    )


if __name__ == "__main__":
    main()
