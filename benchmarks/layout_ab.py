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
"""Interleaved A/B timing of one training step, in one process: the CPU kernels (networks/cpu_kernels.py:
channels-last oneDNN convolutions, fused norm, padded heads) on vs off (``--compare layout``), or the full model vs
the attention-free baseline (``--compare model``:
DMAF + distillation + DTM vs concatenation fusion without distillation or DTM, as in train_step.py).

The shared CPU drifts by tens of percent over minutes, so configurations timed one after the other can be compared
only roughly. Here the two networks (same weights, same input) take turns step by step, and the script prints the
median of each and the median of the per-pair ratios: drift affects both sides of every pair alike.

    python benchmarks/layout_ab.py --size 128 --pairs 3
    python benchmarks/layout_ab.py --compare model --size 64 --pairs 10
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
    parser.add_argument("--compare", choices=["layout", "model"], default="layout")
    args = parser.parse_args()

    from dmaf_components.handlers import DynamicTrainingMonitor
    from dmaf_components.losses import DMAFLoss
    from dmaf_components.networks import DMAFNet

    torch.manual_seed(0)
    x = torch.randn(1, 4, *(args.size,) * 3)
    y = torch.randint(0, 4, (1, 1, *(args.size,) * 3))
    mask = torch.tensor([[True, True, True, True] if args.masks == "all" else [True, False, False, False]])
    configs = {}
    state = None
    if args.compare == "layout":
        variants = [("channels-last", True, "dmaf"), ("channels-first", False, "dmaf")]
    else:
        variants = [("full", None, "dmaf"), ("baseline", None, "concat")]
    for name, cl, fusion in variants:
        net = DMAFNet(3, 4, 4, fusion=fusion, channels_last=cl).train()
        if args.compare == "layout":  # same weights on both sides
            if state is None:
                state = net.state_dict()
            net.load_state_dict(state)
        full = name != "baseline"
        loss_fn = DMAFLoss(4, 4, 128, distillation=full)
        params = list(net.parameters()) + (list(loss_fn.parameters()) if full else [])
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-4)
        dtm = DynamicTrainingMonitor(loss_fn, net) if args.compare == "model" and full else None
        configs[name] = (net, loss_fn, opt, dtm)

    def step(name: str) -> float:
        net, loss_fn, opt, dtm = configs[name]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x, mask), y).backward()
        if dtm is not None:  # between backward and the optimizer step, as the bundle's handler
            dtm.step(net.encoders)
        opt.step()
        return time.perf_counter() - start

    print(
        f"machine: torch {torch.__version__}, {torch.get_num_threads()} threads; {args.size}^3, masks {args.masks}, "
        f"compare {args.compare}"
    )
    times: dict[str, list[float]] = {n: [] for n in configs}
    for i in range(args.pairs + 1):
        order = list(configs) if i % 2 == 0 else list(configs)[::-1]  # alternate who goes first
        for name in order:
            t = step(name)
            if i > 0:
                times[name].append(t)
    a, b = list(configs)
    ratios = [ta / tb for ta, tb in zip(times[a], times[b])]
    for name, ts in times.items():
        print(f"{name:<15} median {statistics.median(ts):7.2f} s/step  ({', '.join(f'{t:.2f}' for t in ts)})")
    print(f"{a} / {b}: median of pair ratios {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
