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
"""What each CPU kernel of ``dmaf_components.networks.cpu_kernels`` buys: training-step time (forward, backward,
AdamW) and peak memory of the plain network, of all kernels, and of all kernels but one, side by side.

Every measurement is a fresh process (so that its peak resident memory is its own), and the variants are interleaved
round by round (so that a load change on a shared machine hits all of them alike); the table gives the median over
rounds of each variant's median step time, its ratio to "all kernels", and the peak resident memory above the plain
network's.

    python benchmarks/cpu_kernels_ab.py                       # 3-D, 64^3, batch 1, one modality missing
    python benchmarks/cpu_kernels_ab.py --dims 2 --size 128 --batch 8 --masks mixed
    python benchmarks/cpu_kernels_ab.py --mode infer --size 128   # eval forward (sliding-window inference's unit)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

#: name -> apply_cpu_kernels keyword arguments (None: the plain network, channels_last=False)
VARIANTS = {
    "plain": None,
    "all kernels": {},
    "no convolutions": {"convolutions": False},
    "no fused norm": {"norm": False},
    "no split concat": {"split_concat": False},
    "no padded heads": {"padded_heads": False},
    "no private ops": {"private_ops": False},
    "no padded backward": {"pad_backward": False},
}


def measure(variant: str, dims: int, size: int, batch: int, masks: str, mode: str, steps: int) -> dict:
    """One variant in this process: median step seconds and peak resident memory (MiB)."""
    import torch

    from dmaf_components.losses import DMAFLoss
    from dmaf_components.networks import DMAFNet, apply_cpu_kernels

    m = 4 if dims == 3 else 3
    torch.manual_seed(0)
    net = DMAFNet(dims, m, 4, channels_last=False)
    if VARIANTS[variant] is not None:
        apply_cpu_kernels(net, **VARIANTS[variant])
    g = torch.Generator().manual_seed(1)
    x = torch.randn((batch, m) + (size,) * dims, generator=g)
    y = torch.randint(0, 4, (batch, 1) + (size,) * dims, generator=g)
    if masks == "all":
        mask = torch.ones(batch, m, dtype=torch.bool)
    elif masks == "one-missing":
        mask = torch.ones(batch, m, dtype=torch.bool)
        mask[:, -1] = False
    else:  # mixed: sample b misses modality b % m (and sample 0 keeps all)
        mask = torch.ones(batch, m, dtype=torch.bool)
        for b in range(1, batch):
            mask[b, b % m] = False
    if mode == "infer":
        net.eval()

        def step() -> None:
            with torch.no_grad():
                net(x, mask)
    else:
        net.train()
        loss_fn = DMAFLoss(4, m, net.channels[-1])
        opt = torch.optim.AdamW(list(net.parameters()) + list(loss_fn.parameters()), lr=2e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x, mask), y).backward()
            opt.step()

    step()  # warm-up (oneDNN primitive caches, allocator)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    return {"variant": variant, "seconds": statistics.median(times), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, default=3, choices=(2, 3))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--masks", default="one-missing", choices=("all", "one-missing", "mixed"))
    parser.add_argument("--mode", default="train", choices=("train", "infer"))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one process per variant each)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    conf = (args.dims, args.size, args.batch, args.masks, args.mode, args.steps)
    if args.child is not None:
        print(json.dumps(measure(args.child, *conf)))
        return

    import torch

    from dmaf_components.networks.cpu_kernels import private_ops_supported

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, private ops "
        f"{'on' if private_ops_supported() else 'off (untested PyTorch)'}; {args.mode}, {args.dims}-D "
        f"{args.size}^{args.dims}, batch {args.batch}, masks {args.masks}; {args.rounds} rounds x {args.steps} steps",
        flush=True,
    )
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for variant in args.variants:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--dims",
                str(args.dims),
                "--size",
                str(args.size),
                "--batch",
                str(args.batch),
                "--masks",
                args.masks,
                "--mode",
                args.mode,
                "--steps",
                str(args.steps),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[variant].append(json.loads(out))
            print(f"  round {r + 1}: {variant:<20} {results[variant][-1]['seconds']:.3f} s", flush=True)
    med = {v: statistics.median(x["seconds"] for x in rs) for v, rs in results.items()}
    mem = {v: statistics.median(x["peak_mib"] for x in rs) for v, rs in results.items()}
    ref_t = med.get("all kernels")
    ref_m = mem.get("plain")
    print(f"\n{'variant':<20} {'s/step':>8} {'/ all':>7} {'peak MiB':>9} {'vs plain':>9}")
    for v in args.variants:
        ratio = f"{med[v] / ref_t:7.2f}" if ref_t else "      -"
        delta = f"{mem[v] - ref_m:+9.0f}" if ref_m is not None else "        -"
        print(f"{v:<20} {med[v]:8.3f} {ratio} {mem[v]:9.0f} {delta}")


if __name__ == "__main__":
    main()
