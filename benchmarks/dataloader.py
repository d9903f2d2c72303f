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
cached dataset includes filling the cache (done when the dataset is built); the steady state is the rate over the later
epochs (their samples over their time). Prints the cache's size in memory.

    python benchmarks/dataloader.py                                  # 8 cases, 3 epochs, workers 1 2 4
    python benchmarks/dataloader.py --cache-rates 1.0 0.0 --workers 2
    python benchmarks/dataloader.py --cache-rates 1.0 --workers 0 2 --augmentation bundle crop
    python benchmarks/dataloader.py --cache-rates 1.0 --workers 0 2 --heap off main workers --epochs 7 --rounds 2
    python benchmarks/dataloader.py --cache-rates 1.0 --workers 0 2 --pipeline 0.1.7 bundle --cases 24 --rounds 2
    python benchmarks/dataloader.py --cache-rates 1.0 --workers 0 2 --step-s 0.12 --cases 16

``--augmentation crop`` keeps only the bundle's patch crop (``RandSpatialCropd``, ``SpatialPadd``, ``EnsureTyped``)
of ``train#augmentation``: what moving a sample costs without the random augmentation (the floor the transforms sit
on: cache read, crop copy, collation, and with workers the transfer between processes). ``--workers 0`` runs the
same pipeline in the main process (since release 0.1.7 in the bundle's loader thread; each configuration is
measured in a fresh process): the transforms' own cost with no transfer. ``--heap`` says where glibc's malloc is
told to keep freed memory (``dmaf_components.data.keep_freed_memory``; no page faults per 33 MB patch): ``main``
as the bundle does (first in ``initialize``: the main process, inherited by the workers), ``workers`` in the workers
only, ``off`` nowhere (glibc's default, before release 0.1.6). "worker RSS" is the largest peak resident memory
among the workers. ``--pipeline 0.1.7`` measures release 0.1.7's pipeline side by side with the bundle's (MONAI's
``RandFlipd`` per axis and ``RandRotated``, each resampling on its own, where the bundle has ``RandFlipRotated``: the
same distribution of patches, other draws); ``0.1.6`` adds the cached volume deep-copied for every sample, the pad
after the crop and a plain ``DataLoader`` (records made before release 0.1.8 call it ``previous``). ``--step-s``
follows each batch with a sleep standing in for a GPU step and prints the share of the epoch the consumer waited for
batches; ``--buffer-sizes`` compares how many batches the loader thread makes ahead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from machine import machine_line

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")


CROP_ONLY = ("RandSpatialCropd", "SpatialPadd", "EnsureTyped")


def worker_peak_rss_gb() -> float:
    """Largest peak resident memory (VmHWM) among this process's live children (the loader's workers), in GB."""
    pid, peak = os.getpid(), 0
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except OSError:
        return float("nan")
    for child in children:
        try:
            with open(f"/proc/{child}/status") as f:
                peak = max([peak] + [int(line.split()[1]) for line in f if line.startswith("VmHWM:")])
        except OSError:
            continue
    return peak / 1024**2


def monai_flips_and_rotation(augmentation: list[dict], spatial_dims: int = 3) -> list[dict]:
    """``train#augmentation`` with ``RandFlipRotated`` replaced by what it stands for, as releases up to 0.1.7 ran it:
    MONAI's ``RandFlipd`` per spatial axis, then ``RandRotated`` (float32, the same angles and probability)."""
    out = []
    for t in augmentation:
        if t["_target_"] != "dmaf_components.transforms.RandFlipRotated":
            out.append(t)
            continue
        keys = t["keys"]
        out += [
            {"_target_": "RandFlipd", "keys": keys, "prob": t["flip_prob"], "spatial_axis": a}
            for a in range(spatial_dims)
        ]
        rotate = {k: v for k, v in t.items() if k not in ("_target_", "flip_prob")}
        out.append({"_target_": "RandRotated", **rotate, "dtype": "$torch.float32"})
    return out


def previous_pipeline(parser, release: str = "0.1.6") -> None:
    """An earlier release's training pipeline: ``0.1.7``: MONAI's flips and rotation, resampled separately, in place
    of ``RandFlipRotated``, and the loader thread one batch ahead; ``0.1.6``: that, the cached volume deep-copied for
    every sample (``copy_cache``) and the patch padded after the crop, in a plain ``DataLoader``."""
    augmentation = monai_flips_and_rotation(parser["train#augmentation"])
    parser["train#dataloader#buffer_size"] = 1  # MONAI's default, 0.1.7's
    if release == "0.1.6":
        pad = next(t for t in augmentation if t["_target_"] == "SpatialPadd")
        augmentation = [t for t in augmentation if t["_target_"] != "SpatialPadd"]
        crop = next(i for i, t in enumerate(augmentation) if t["_target_"] == "RandSpatialCropd")
        augmentation = augmentation[: crop + 1] + [pad] + augmentation[crop + 1 :]
        parser["train#dataset#copy_cache"] = True
        parser["train#dataloader#_target_"] = "DataLoader"
        parser["train#dataloader"].pop("buffer_size")
    parser["train#augmentation"] = augmentation


def measure(
    data_dir: str,
    cache_rate: float | None,
    workers: int,
    epochs: int,
    augmentation: str = "bundle",
    heap: str = "main",
    pipeline: str = "bundle",
    step_s: float = 0.0,
    buffer_size: int | None = None,
) -> dict:
    from monai.bundle import ConfigParser
    from monai.data.utils import worker_init_fn as monai_worker_init_fn

    from dmaf_components.data import cache_bytes

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    # the training loader's worker processes (0: the bundle's loader thread, or a plain DataLoader's main process for
    # 0.1.6); the cache is filled by the bundle's default number of threads in every configuration
    updates = {"dataset_dir": data_dir, "train_num_workers": workers, "device": "$torch.device('cpu')"}
    if cache_rate is not None:
        updates["cache_rate"] = cache_rate
    parser.update(updates)
    from dmaf_components.data import keep_freed_memory

    if heap == "main":  # as the bundle's initialize does: before the cache is built; forked workers inherit it
        keep_freed_memory()
    if pipeline != "bundle":
        previous_pipeline(parser, pipeline)
    if buffer_size is not None:  # batches the loader thread makes ahead (train#dataloader#buffer_size)
        if "buffer_size" not in parser["train#dataloader"]:
            raise SystemExit(f"--buffer-sizes: the {pipeline} pipeline's loader has no thread")
        parser["train#dataloader"]["buffer_size"] = buffer_size
    if augmentation == "crop":
        parser["train#augmentation"] = [t for t in parser["train#augmentation"] if t["_target_"] in CROP_ONLY]
    start = time.perf_counter()
    dataset = parser.get_parsed_content("train#dataset")
    build = time.perf_counter() - start
    if heap == "workers":  # in the workers only, after MONAI's seeding

        def init(worker_id: int) -> None:
            monai_worker_init_fn(worker_id)
            keep_freed_memory()

        parser["train#dataloader"]["worker_init_fn"] = init
    loader = parser.get_parsed_content("train#dataloader")
    rates, waits, times, counts = [], [], [], []
    for epoch in range(epochs):
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        t = time.perf_counter()
        n, wait, asked = 0, 0.0, time.perf_counter()
        for batch in loader:
            wait += time.perf_counter() - asked
            n += int(batch["image"].shape[0])
            if step_s > 0:  # a GPU step: the main thread waits for the device, holding no lock a loader thread needs
                time.sleep(step_s)
            asked = time.perf_counter()
        elapsed = time.perf_counter() - t
        waits.append(wait)
        times.append(elapsed)
        counts.append(n)
        rates.append(n / (elapsed + (build if epoch == 0 else 0.0)))
    rss = worker_peak_rss_gb() if workers > 0 else float("nan")
    return {
        "cache_rate": parser.get_parsed_content("cache_rate"),
        "workers": workers,
        "rates": rates,
        "waits": waits,
        "times": times,
        "counts": counts,
        "cache_gb": cache_bytes(dataset) / 1024**3,
        "build_s": build,
        "worker_rss_gb": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/loader_bench", help="synthetic set (created when missing)")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--gen-workers", type=int, default=1, help="processes writing the synthetic set")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--augmentation",
        nargs="+",
        default=["bundle"],
        choices=["bundle", "crop"],
        help="the bundle's random augmentation, or the patch crop alone",
    )
    parser.add_argument(
        "--heap",
        nargs="+",
        default=["main"],
        choices=["main", "workers", "off"],
        help="where glibc keeps freed memory (dmaf_components.data.keep_freed_memory): main = in the "
        "main process before the cache is built, inherited by the workers it forks (the bundle's "
        "default, `keep_freed_memory` in initialize); workers = in the workers only; "
        "off = nowhere",
    )
    parser.add_argument(
        "--pipeline",
        nargs="+",
        default=["bundle"],
        choices=["bundle", "0.1.7", "0.1.6"],
        help="the bundle's training pipeline, or release 0.1.7's (MONAI's flips and rotation "
        "resampled separately), or 0.1.6's (also: cache deep-copied per sample, pad after crop, "
        "plain DataLoader)",
    )
    parser.add_argument(
        "--step-s",
        type=float,
        default=0.0,
        help="sleep this long after each batch, standing in for a GPU step (0: the loader alone); "
        "prints the share of the epoch spent waiting for batches",
    )
    parser.add_argument(
        "--buffer-sizes",
        type=int,
        nargs="+",
        default=[None],
        help="batches the loader thread makes ahead (train#dataloader#buffer_size; default: the "
        "pipeline's own: 4 for the bundle, 1 for 0.1.7); compared side by side",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration, print JSON
    parser.add_argument("--rounds", type=int, default=1, help="repeat each comparison, alternating its settings")
    parser.add_argument(
        "--cache-rates",
        type=float,
        nargs="+",
        default=None,
        help="cache rates to compare (default: the bundle's default, then 0)",
    )
    args = parser.parse_args()
    if args.one:  # a fresh process per configuration: allocator state and caches cannot carry over
        print("RESULT " + json.dumps(measure(**json.loads(args.one))))
        return
    from dmaf_components.data import build_datalist, synthesize_brats, write_datalist

    synthesize_brats(args.data, cases=args.cases, seed=0, workers=args.gen_workers)
    datalist = os.path.join(args.data, "datalist.json")
    if not os.path.exists(datalist):
        write_datalist(build_datalist(args.data, "brats", split=(args.cases, 0, 0), seed=0), datalist)
    default = json.load(open(os.path.join(BUNDLE, "configs", "train.json")))["cache_rate"]
    rates = args.cache_rates or [default, 0.0]
    print(machine_line())
    print(
        f"full-size BraTS loader: {args.cases} cases 240x240x155, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs; bundle default cache_rate {default}"
    )
    if args.step_s > 0:
        print(
            f"each batch is followed by a {args.step_s} s sleep standing in for a GPU step "
            f"(at most {1 / args.step_s:.2f} samples/s at batch 1); wait = share of the steady epochs spent "
            f"waiting for the loader"
        )
    print(
        f"{'pipeline':>8} {'buffer':>6} {'heap':>6} {'augmentation':>12} {'cache_rate':>10} {'workers':>7} "
        f"{'first epoch':>12} "
        f"{'steady':>9} {'wait':>6} {'cache':>9} {'worker RSS':>10}"
    )
    settings = [(p, h, b) for p in args.pipeline for h in args.heap for b in args.buffer_sizes]
    for augmentation in args.augmentation:
        for rate in rates:
            for workers in args.workers:
                for pipeline, heap, buffer in [s for _ in range(args.rounds) for s in settings]:  # alternating
                    one = {
                        "data_dir": args.data,
                        "cache_rate": rate,
                        "workers": workers,
                        "epochs": args.epochs,
                        "augmentation": augmentation,
                        "heap": heap,
                        "pipeline": pipeline,
                        "step_s": args.step_s,
                        "buffer_size": buffer,
                    }
                    proc = subprocess.run(
                        [sys.executable, __file__, "--one", json.dumps(one)], capture_output=True, text=True, check=True
                    )
                    r = json.loads(proc.stdout.rsplit("RESULT ", 1)[1])
                    steady = sum(r["counts"][1:]) / sum(r["times"][1:])  # all steady samples / all their time
                    wait = sum(r["waits"][1:]) / sum(r["times"][1:])
                    print(
                        f"{pipeline:>8} {str(buffer or '-'):>6} {heap:>6} {augmentation:>12} {r['cache_rate']:>10} "
                        f"{workers:>7} "
                        f"{r['rates'][0]:>8.2f} s/s {steady:>5.2f} s/s {100 * wait:>5.1f}% {r['cache_gb']:>6.2f} GB "
                        f"{r['worker_rss_gb']:>7.2f} GB   (samples/s; first epoch includes the cache fill, "
                        f"{r['build_s']:.0f} s)",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
