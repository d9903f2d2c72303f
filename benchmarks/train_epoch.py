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
"""Real training epochs of the bundle at full BraTS size: wall time, loader wait and GPU utilisation per epoch.

Builds (or reuses) a synthetic BraTS2020-layout set at 240x240x155 (gzip NIfTI), then runs the bundle's own
``configs/train.json`` (its defaults: cache, workers, AMP on a GPU, DTM, ...) for a few epochs without validation, as
``monai.bundle run training`` does, with one handler added that times the engine's events:
- cache fill: building ``train#dataset`` (the deterministic prefix of every case, once);
- per epoch: wall time, the time the trainer waited for the loader (Ignite's ``GET_BATCH_STARTED`` to
  ``GET_BATCH_COMPLETED``), its share of the epoch and the first batch's part of it;
- GPU utilisation (NVML, sampled every 0.1 s during the epoch) when a GPU is used.

    python benchmarks/train_epoch.py --data data/epoch_bench --cases 20 --epochs 2 --gen-workers 16
    python benchmarks/train_epoch.py --data /tmp/tiny --cases 3 --shape 48 48 32 --epochs 2 roi_size=[32,32,32]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

import torch

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")


class _GPUSampler:
    """Mean GPU utilisation (%) between start() and stop(), from NVML (None when NVML is unavailable)."""

    def __init__(self, period: float = 0.1) -> None:
        self.period, self.samples, self._stop = period, [], threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self._read = lambda: pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
        except Exception:  # noqa: BLE001  (no NVML: no utilisation figure)
            self._read = None

    def start(self) -> None:
        self.samples, self._stop = [], threading.Event()
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._read())
            time.sleep(self.period)

    def stop(self) -> float | None:
        self._stop.set()
        if self._read is None:
            return None
        self._thread.join()
        return sum(self.samples) / max(len(self.samples), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/epoch_bench", help="synthetic set (created when missing)")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--gen-workers", type=int, default=1, help="processes writing the synthetic set")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help="further bundle overrides, key=value (JSON values)")
    args = parser.parse_args()

    from ignite.engine import Events
    from monai.bundle import ConfigParser

    from dmaf_components.data import build_datalist, cache_bytes, synthesize_brats, write_datalist

    start = time.perf_counter()
    synthesize_brats(args.data, cases=args.cases, shape=args.shape, seed=0, workers=args.gen_workers)
    datalist = os.path.join(args.data, f"datalist_train{args.cases}.json")
    if not os.path.exists(datalist):
        write_datalist(build_datalist(args.data, "brats", split=(args.cases, 0, 0), seed=0), datalist)
    print(
        f"data: {args.cases} cases {'x'.join(map(str, args.shape))} in {args.data} "
        f"({time.perf_counter() - start:.0f} s to write or find)",
        flush=True,
    )

    work = tempfile.mkdtemp(prefix="dmaf_epoch_")
    config = ConfigParser()
    config.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    updates = {
        "bundle_root": work,
        "dataset_dir": os.path.abspath(args.data),
        "datalist": datalist,
        "epochs": args.epochs,
        "val_interval": args.epochs + 1,
    }
    for item in args.overrides:
        key, _, value = item.partition("=")
        updates[key] = json.loads(value)
    config.update(updates)
    config.get_parsed_content("initialize")
    t = time.perf_counter()
    dataset = config.get_parsed_content("train#dataset")
    fill = time.perf_counter() - t
    trainer = config.get_parsed_content("train#trainer")
    device = config.get_parsed_content("device")
    gpu = device.type == "cuda"
    sampler = _GPUSampler() if gpu else None
    epochs: list[dict] = []
    state = {"wait": 0.0, "batches": 0}

    @trainer.on(Events.EPOCH_STARTED)
    def _epoch_started(engine) -> None:
        state.update(start=time.perf_counter(), wait=0.0, batches=0)
        if sampler:
            sampler.start()

    @trainer.on(Events.GET_BATCH_STARTED)
    def _get_started(engine) -> None:
        state["get"] = time.perf_counter()

    @trainer.on(Events.GET_BATCH_COMPLETED)
    def _get_completed(engine) -> None:
        now = time.perf_counter()
        # the first batch is timed from the epoch's start: Ignite makes the loader's iterator (and starts workers
        # that are not kept) between EPOCH_STARTED and the first GET_BATCH_STARTED in epoch 1, after it later on
        wait = now - (state["start"] if state["batches"] == 0 else state["get"])
        if state["batches"] == 0:
            state["first"] = wait
        state["wait"] += wait
        state["batches"] += 1

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch_completed(engine) -> None:
        if gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - state["start"]
        util = sampler.stop() if sampler else None
        epochs.append(
            {
                "epoch": engine.state.epoch,
                "wall_s": wall,
                "loader_wait_s": state["wait"],
                "first_batch_wait_s": state.get("first", 0.0),
                "loader_wait_pct": 100 * state["wait"] / wall,
                "iterations": state["batches"],
                "gpu_util_pct": util,
            }
        )

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    config.get_parsed_content("run")
    peak = torch.cuda.max_memory_allocated() / 1024**3 if gpu else None
    name = torch.cuda.get_device_name() if gpu else "cpu"
    workers = config.get_parsed_content("train_num_workers")  # 0: the loader thread
    print(
        f"bundle training, {name}, torch {torch.__version__}, amp {config.get_parsed_content('amp')}, "
        f"{workers} loader worker processes (0: the loader thread), "
        f"cache_rate {config.get_parsed_content('cache_rate')}, "
        f"roi {config.get_parsed_content('roi_size')}, {os.cpu_count()} CPUs"
    )
    print(f"cache fill: {fill:.1f} s for {len(dataset)} cases ({cache_bytes(dataset) / 1024**3:.2f} GB in memory)")
    for e in epochs:
        util = f", GPU utilisation {e['gpu_util_pct']:.0f} %" if e["gpu_util_pct"] is not None else ""
        print(
            f"epoch {e['epoch']}: {e['wall_s']:.1f} s for {e['iterations']} iterations "
            f"({e['wall_s'] / max(e['iterations'], 1):.3f} s/iteration), loader wait {e['loader_wait_s']:.1f} s "
            f"= {e['loader_wait_pct']:.1f} % of the epoch (first batch {e['first_batch_wait_s']:.2f} s){util}"
        )
    if peak is not None:
        print(f"peak GPU memory: {peak:.2f} GB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": name,
                    "torch": torch.__version__,
                    "workers": workers,
                    "cache_fill_s": fill,
                    "cache_gb": cache_bytes(dataset) / 1024**3,
                    "epochs": epochs,
                    "peak_gpu_gb": peak,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
