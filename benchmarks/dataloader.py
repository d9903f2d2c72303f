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
"""The bundle's training loader at full BraTS size: samples/s per epoch, first and steady state, by cache setting and
number of workers.

Builds (or reuses) a synthetic BraTS2020-layout set at 240x240x155 (gzip NIfTI, 4 modalities), then builds
``train#dataset`` and ``train#dataloader`` from ``bundle/configs/train.json`` exactly as the bundle does (with
``--cache_rate`` as given, the bundle's default first), and iterates it for a few epochs. The first epoch of a
cached dataset includes filling the cache (done when the dataset is built); the steady state is the mean of the later
epochs. Prints the cache's size in memory.

    python benchmarks/dataloader.py                                  # 8 cases, 3 epochs, workers 1 2 4
    python benchmarks/dataloader.py --cache-rates 1.0 0.0 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")


def measure(data_dir: str, cache_rate: float | None, workers: int, epochs: int) -> dict:
    from monai.bundle import ConfigParser

    from dmaf_components.data import cache_bytes

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    updates = {"dataset_dir": data_dir, "num_workers": workers, "device": "$torch.device('cpu')"}
    if cache_rate is not None:
        updates["cache_rate"] = cache_rate
    parser.update(updates)
    start = time.perf_counter()
    dataset = parser.get_parsed_content("train#dataset")
    build = time.perf_counter() - start
    loader = parser.get_parsed_content("train#dataloader")
    rates = []
    for epoch in range(epochs):
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        t = time.perf_counter()
        n = sum(int(batch["image"].shape[0]) for batch in loader)
        elapsed = time.perf_counter() - t + (build if epoch == 0 else 0.0)
        rates.append(n / elapsed)
    return {"cache_rate": parser.get_parsed_content("cache_rate"), "workers": workers, "rates": rates,
            "cache_gb": cache_bytes(dataset) / 1024**3, "build_s": build}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/loader_bench", help="synthetic set (created when missing)")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--gen-workers", type=int, default=1, help="processes writing the synthetic set")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cache-rates", type=float, nargs="+", default=None,
                        help="cache rates to compare (default: the bundle's default, then 0)")
    args = parser.parse_args()
    from dmaf_components.data import build_datalist, synthesize_brats, write_datalist

    synthesize_brats(args.data, cases=args.cases, seed=0, workers=args.gen_workers)
    datalist = os.path.join(args.data, "datalist.json")
    if not os.path.exists(datalist):
        write_datalist(build_datalist(args.data, "brats", split=(args.cases, 0, 0), seed=0), datalist)
    default = json.load(open(os.path.join(BUNDLE, "configs", "train.json")))["cache_rate"]
    rates = args.cache_rates or [default, 0.0]
    print(f"full-size BraTS loader: {args.cases} cases 240x240x155, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; bundle default cache_rate {default}")
    print(f"{'cache_rate':>10} {'workers':>7} {'first epoch':>12} {'steady':>9} {'cache':>9}")
    for rate in rates:
        for workers in args.workers:
            r = measure(args.data, rate, workers, args.epochs)
            steady = sum(r["rates"][1:]) / max(len(r["rates"]) - 1, 1)
            print(f"{r['cache_rate']:>10} {workers:>7} {r['rates'][0]:>8.2f} s/s {steady:>5.2f} s/s "
                  f"{r['cache_gb']:>6.2f} GB   (samples/s; first epoch includes the cache fill, {r['build_s']:.0f} s)")


if __name__ == "__main__":
    main()
