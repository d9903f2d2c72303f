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
"""2-D (MyoPS) training step: the full DMAF-Net objective vs the concatenation baseline, interleaved in one process.

Batch of B slices, 3 modalities, per-sample IDT masks at the paper's MyoPS missing rates (bSSFP .3, LGE .5, T2 .7),
forward + backward + AdamW (+ DTM for the full model), as the bundle trains with ``--batch_size B``. The full and the
baseline step (and any other variants asked for) run round-robin (A B A B ...), so that a change in the machine's
load hits all alike; the ratio to the first variant is taken per round and its median printed.

    python benchmarks/step_2d.py                       # 128^2, batch 8, 5 timed pairs
    python benchmarks/step_2d.py --size 96 --batch 8 --masks all
    python benchmarks/step_2d.py --variants full full-0.1.2 baseline
    python benchmarks/step_2d.py --variants full full-ungrouped baseline dmaf dmaf+distill concat+distill
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


VARIANTS = {
    "full": ("dmaf", True, True),
    "baseline": ("concat", False, False),
    "dmaf": ("dmaf", False, False),
    "dmaf+distill": ("dmaf", True, False),
    "concat+distill": ("concat", True, False),
    "concat+distill+dtm": ("concat", True, True),
}


def build(
    variant: str, batch: int, size: int, grouping: bool = True, token_grid: int | None = None, pad_heads: bool = True
):
    """Network, loss, optimizer and DTM of one variant (see ``VARIANTS``: fusion, distillation, DTM), and a step
    function of one ``(B, 3)`` mask that returns its wall time."""
    from dmaf_components.handlers import DynamicTrainingMonitor
    from dmaf_components.losses import DMAFLoss
    from dmaf_components.networks import DMAFNet, apply_cpu_kernels

    torch.manual_seed(0)
    fusion, distill, dtm_on = VARIANTS[variant]
    net = apply_cpu_kernels(
        DMAFNet(2, 3, 4, fusion=fusion, token_grid=token_grid, channels_last=False), padded_heads=pad_heads
    ).train()
    if fusion == "dmaf":
        for f in net.fusions:
            f.group_by_mask = grouping
    loss_fn = DMAFLoss(4, 3, net.channels[-1], distillation=distill)
    params = list(net.parameters()) + (list(loss_fn.parameters()) if distill else [])
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-4)
    dtm = DynamicTrainingMonitor(loss_fn, net) if dtm_on else None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 4, (batch, 1, size, size), generator=g)

    def step(mask: torch.Tensor) -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x, mask), y)
        loss.backward()
        if dtm is not None:
            dtm.step(net.encoders)
        opt.step()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=5, help="timed pairs (after one untimed pair)")
    parser.add_argument("--masks", choices=["idt", "all"], default="idt")
    parser.add_argument(
        "--grouping",
        choices=["on", "off"],
        default="on",
        help="DMAF: samples grouped by mask pattern (on) or one masked token sequence (off)",
    )
    parser.add_argument("--token-grid", type=int, default=None, help="S_d per axis (default: DMAFNet's 2-D default)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["full", "baseline"],
        help=f"interleaved round-robin; the first is compared with each other ({', '.join(VARIANTS)}, "
        "full-ungrouped: the full model with --grouping off, and full-0.1.2: the full model as release "
        "0.1.2 computed it (one masked sequence, unpadded heads, S_d 16^2)",
    )
    args = parser.parse_args()
    from dmaf_components.data import idt_masks

    n = (args.pairs + 1) * args.batch
    rows = idt_masks(n, [0.3, 0.5, 0.7], seed=1) if args.masks == "idt" else [[1, 1, 1]] * n
    masks = torch.as_tensor(rows, dtype=torch.bool).reshape(args.pairs + 1, args.batch, 3)
    steps = {}
    for name in args.variants:
        if name == "full-ungrouped":
            steps[name] = build("full", args.batch, args.size, False, args.token_grid)
        elif name == "full-0.1.2":
            steps[name] = build("full", args.batch, args.size, False, 16, pad_heads=False)
        else:
            steps[name] = build(name, args.batch, args.size, args.grouping == "on", args.token_grid)
    times = {name: [] for name in steps}
    for i in range(args.pairs + 1):
        for name, step in steps.items():
            t = step(masks[i])
            if i:
                times[name].append(t)
    patterns = len({tuple(r.tolist()) for m in masks[1:] for r in m})
    print(
        f"2-D step, {args.size}^2, batch {args.batch}, masks {args.masks} ({patterns} patterns), DMAF grouping "
        f"{args.grouping}, token grid {args.token_grid or 'default'}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    first = args.variants[0]
    for name, ts in times.items():
        line = f"  {name:<20s} {statistics.median(ts):7.3f} s/step (min {min(ts):.3f})"
        if name != first:
            ratios = [a / b for a, b in zip(times[first], ts)]
            line += (
                f"   {first}/{name} {statistics.median(ratios):.2f} "
                f"(median of {len(ratios)} interleaved rounds, range {min(ratios):.2f}-{max(ratios):.2f})"
            )
        print(line)


if __name__ == "__main__":
    main()
