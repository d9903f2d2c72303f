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
"""Interleaved A/B timing of one training step: the channels-last network (oneDNN convolutions, fused norm) on vs off.

The shared CPU drifts by tens of percent over minutes, so configurations timed one after the other can be compared
only roughly. Here the two networks (same weights, same input) take turns step by step, and the script prints the
median of each and the median of the per-pair ratios: drift affects both sides of every pair alike.

    python benchmarks/layout_ab.py --size 128 --pairs 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=3, help="timed A/B pairs (after one untimed pair)")
    parser.add_argument("--masks", choices=["all", "one"], default="all", help="all four modalities, or FLAIR only")
    args = parser.parse_args()

    from dmaf_components.losses import DMAFLoss
    from dmaf_components.networks import DMAFNet

    torch.manual_seed(0)
    x = torch.randn(1, 4, *(args.size,) * 3)
    y = torch.randint(0, 4, (1, 1, *(args.size,) * 3))
    mask = torch.tensor([[True, True, True, True] if args.masks == "all" else [True, False, False, False]])
    configs = {}
    state = None
    for name, cl in (("channels-last", True), ("channels-first", False)):
        net = DMAFNet(3, 4, 4, channels_last=cl).train()
        if state is None:
            state = net.state_dict()
        net.load_state_dict(state)
        loss_fn = DMAFLoss(4, 4, 128)
        opt = torch.optim.AdamW(list(net.parameters()) + list(loss_fn.parameters()), lr=2e-4, weight_decay=1e-4)
        configs[name] = (net, loss_fn, opt)

    def step(name: str) -> float:
        net, loss_fn, opt = configs[name]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x, mask), y).backward()
        opt.step()
        return time.perf_counter() - start

    print(f"machine: torch {torch.__version__}, {torch.get_num_threads()} threads; {args.size}^3, masks {args.masks}")
    times: dict[str, list[float]] = {n: [] for n in configs}
    for i in range(args.pairs + 1):
        order = list(configs) if i % 2 == 0 else list(configs)[::-1]  # alternate who goes first
        for name in order:
            t = step(name)
            if i > 0:
                times[name].append(t)
    ratios = [a / b for a, b in zip(times["channels-last"], times["channels-first"])]
    for name, ts in times.items():
        print(f"{name:<15} median {statistics.median(ts):7.2f} s/step  ({', '.join(f'{t:.2f}' for t in ts)})")
    print(f"channels-last / channels-first: median of pair ratios {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
