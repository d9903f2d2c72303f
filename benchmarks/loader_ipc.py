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
"""Where a loader worker's time goes: the transforms themselves, and moving the batch between processes.

1. The bundle's random part on cached full-size samples, one thread, in the main process and in 1 or 2 forked
   processes at once (as loader workers run it, without handing anything back): ms per sample, page faults, system
   and user time.
2. Moving a 42 MB BraTS patch (4x128^3 image and label, float32) with no transform: a ``DataLoader`` over a dataset
   that clones a fixed sample, with 0, 1 and 2 worker processes (each batch goes through a new shared-memory
   segment), ms per sample.

    python benchmarks/loader_ipc.py --data data/loader_bench --samples 24
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time

import torch

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")


def _usage() -> tuple[int, float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_stime, r.ru_utime


def _samples(dataset, n: int, seed0: int) -> tuple[float, float, float, float]:
    """ms per sample, page faults, system and user ms per sample of n samples (seeds seed0...)."""
    f0, s0, u0 = _usage()
    start = time.perf_counter()
    for i in range(n):
        dataset[(i % len(dataset), seed0 + i)]
    wall = time.perf_counter() - start
    f1, s1, u1 = _usage()
    return 1000 * wall / n, (f1 - f0) / n, 1000 * (s1 - s0) / n, 1000 * (u1 - u0) / n


def _child(dataset, n: int, seed0: int, queue) -> None:
    torch.set_num_threads(1)
    queue.put(_samples(dataset, n, seed0))


class _Clones(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n
        self.image = torch.randn(4, 128, 128, 128)
        self.label = torch.randint(0, 4, (1, 128, 128, 128)).float()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image.clone(), "label": self.label.clone()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/loader_bench", help="a set made by benchmarks/dataloader.py")
    parser.add_argument("--samples", type=int, default=24)
    args = parser.parse_args()
    from monai.bundle import ConfigParser

    from dmaf_components.data import keep_freed_memory

    keep_freed_memory()  # as the bundle's initialize does, before the cache; forked processes inherit it
    config = ConfigParser()
    config.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    config.update({"dataset_dir": os.path.abspath(args.data), "num_workers": 0, "cache_rate": 1.0})
    dataset = config.get_parsed_content("train#dataloader").dataset  # SeededDataset(CacheDataset)
    torch.set_num_threads(1)
    _samples(dataset, 4, 0)  # warm-up
    print(f"1. the random part, 1 thread, {args.samples} samples each (the same seeds in every row):")
    row = "   {:<34} {:7.1f} ms/sample  faults {:7.0f}  sys {:6.1f} ms  user {:6.1f} ms"
    print(row.format("main process", *_samples(dataset, args.samples, 100)))
    context = mp.get_context("fork")
    for k in (1, 2):
        queue = context.Queue()
        procs = [context.Process(target=_child, args=(dataset, args.samples, 100, queue)) for _ in range(k)]
        for p in procs:
            p.start()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        for r in results:
            print(row.format(f"forked process ({k} at once)", *r))
    print("2. moving a 4x128^3 image + label (42 MB) from the dataset to the consumer, no transform:")
    torch.set_num_threads(2)
    for workers in (0, 1, 2):
        loader = torch.utils.data.DataLoader(
            _Clones(48), batch_size=1, num_workers=workers, persistent_workers=workers > 0
        )
        for epoch in range(2):
            start, n = time.perf_counter(), 0
            for batch in loader:
                n += 1
                float(batch["image"].sum())  # the consumer reads it, as a trainer does
            if epoch == 1:
                print(f"   {workers} worker processes: {1000 * (time.perf_counter() - start) / n:6.1f} ms/sample")


if __name__ == "__main__":
    main()
