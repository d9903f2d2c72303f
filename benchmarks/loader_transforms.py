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
"""Cost of each random transform of the bundle's training pipeline, one thread, on cached full-size samples; the
random rotation of a 4 x 128^3 patch resampled in float64 (MONAI's default) vs float32 (train.json), side by side; and
one whole training sample in release 0.1.6's pipeline vs the bundle's (the same patches, alternating).

    python benchmarks/loader_transforms.py --data data/loader_bench --samples 16
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/loader_bench", help="a set made by benchmarks/dataloader.py")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--rotations", type=int, default=4)
    args = parser.parse_args()
    from monai.bundle import ConfigParser
    from monai.transforms import Randomizable, RandRotated

    from dmaf_components.data import keep_freed_memory

    keep_freed_memory()  # as every bundle workflow does first
    torch.set_num_threads(1)
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

    data = {"image": torch.randn(4, 128, 128, 128), "label": torch.randint(0, 4, (1, 128, 128, 128)).float()}
    out, times = {}, {}
    for dtype in (np.float64, np.float32):  # interleaved
        times[dtype.__name__] = []
    for _ in range(args.rotations + 1):
        for dtype in (np.float64, np.float32):
            rotate = RandRotated(["image", "label"], range_x=0.17, range_y=0.17, range_z=0.17, prob=1.0,
                                 mode=["bilinear", "nearest"], padding_mode="zeros", dtype=dtype)
            rotate.set_random_state(3)
            start = time.perf_counter()
            out[dtype.__name__] = rotate(dict(data))
            times[dtype.__name__].append(time.perf_counter() - start)
    f64, f32 = (np.mean(times[k][1:]) for k in ("float64", "float32"))  # the first of each is a warm-up
    diff = (out["float64"]["image"] - out["float32"]["image"]).abs().max().item()
    labels_differ = int((out["float64"]["label"] != out["float32"]["label"]).sum())
    print(f"rotation of a 4x128^3 patch + label: float64 {f64:.3f} s, float32 {f32:.3f} s ({f64 / f32:.2f}x); "
          f"image max difference {diff:.2e}, labels differing {labels_differ} of {out['float32']['label'].numel()} "
          "voxels (nearest-neighbour ties)")
    whole_sample(args.data, args.samples * 3)


def whole_sample(data: str, samples: int) -> None:
    """One sample of train#dataset, the cache read included, in release 0.1.6's pipeline (cached volume deep-copied
    per sample, pad after the crop) and the bundle's, alternating, with the same sample seeds (the same patches)."""
    import sys

    from monai.bundle import ConfigParser

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dataloader import previous_pipeline

    datasets = {}
    for name in ("0.1.6", "bundle"):
        config = ConfigParser()
        config.read_config(os.path.join(BUNDLE, "configs", "train.json"))
        config.update({"dataset_dir": os.path.abspath(data), "num_workers": 0, "cache_rate": 1.0})
        if name == "0.1.6":
            previous_pipeline(config)
        datasets[name] = config.get_parsed_content("train#dataloader").dataset  # SeededDataset(CacheDataset)
    total = dict.fromkeys(datasets, 0.0)
    n = len(datasets["bundle"])
    for i in range(samples):
        order = list(datasets) if i % 2 else list(datasets)[::-1]
        out = {}
        for name in order:
            start = time.perf_counter()
            out[name] = datasets[name][(i % n, 1000 + i)]
            total[name] += time.perf_counter() - start
        same = all(torch.equal(torch.as_tensor(out["0.1.6"][k]), torch.as_tensor(out["bundle"][k]))
                   for k in ("image", "label"))
        if not same:
            raise RuntimeError(f"sample {i}: the two pipelines gave different patches")
    old, new = (1000 * total[k] / samples for k in ("0.1.6", "bundle"))
    print(f"one training sample (cache read + random part), 1 thread, {samples} samples, the same patches: "
          f"0.1.6 pipeline {old:.1f} ms, bundle {new:.1f} ms ({old / new:.2f}x)")


if __name__ == "__main__":
    main()
