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
"""Convolution-only ceiling of a DMAF-Net training step on this machine.

Records every convolution of one training forward (shape, weight, stride, whether its input needs a gradient),
then times each distinct one alone, forward + backward, with the same channels-last oneDNN function the network
uses, and sums over the step. The result is what the step would reach if everything that is not a convolution took
no time at all: an upper bound on the fraction of the matmul peak that any implementation of this architecture with
these convolutions can reach here. Prints the per-shape table, the total, and the fp32 matmul peak measured in the
same run.

    python benchmarks/conv_ceiling.py --size 128
    python benchmarks/conv_ceiling.py --size 128 --channels 16 32 64 128 256   # a wider network, for comparison
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from torch.utils.flop_counter import conv_flop_count

from dmaf_components.networks import DMAFNet
from dmaf_components.networks.cpu_kernels import _CPUConv, _OneDNNConvFunction, to_channels_last as _cl
from train_step import matmul_peak  # (benchmarks/ is the script's directory, first on sys.path)


def record_convolutions(size: int, channels: list[int]) -> Counter:
    """(input shape, weight shape, stride, padding, bias, input needs grad) of every convolution in one step."""
    net = DMAFNet(3, 4, 4, channels=channels).train()
    seen: Counter = Counter()

    orig = _CPUConv.conv_cpu

    def spy(module, x, weight, bias):  # every convolution, partial ones (decoder merges) included
        key = (
            tuple(x.shape),
            tuple(weight.shape),
            tuple(module.stride),
            tuple(module.padding),
            bias is not None,
            x.requires_grad,
        )
        seen[key] += 1
        return orig(module, x, weight, bias)

    _CPUConv.conv_cpu = spy
    try:
        net(torch.randn(1, 4, size, size, size), torch.ones(1, 4, dtype=torch.bool))
    finally:
        _CPUConv.conv_cpu = orig
    return seen


def time_one(conf, reps: int) -> tuple[float, float]:
    """Median seconds and FLOPs of one convolution's forward + backward."""
    xs, ws, stride, padding, bias, needs_grad = conf
    x = _cl(torch.randn(xs)).requires_grad_(needs_grad)
    w = torch.randn(ws, requires_grad=True)
    b = torch.randn(ws[0], requires_grad=True) if bias else None
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]

    def run():
        y = _OneDNNConvFunction.apply(x, w, b, stride, padding, (1,) * len(stride), 1, True)
        torch.autograd.grad(y, inputs, _cl(torch.ones_like(y)))

    run()
    out_shape = _OneDNNConvFunction.apply(
        x.detach(), w.detach(), None, stride, padding, (1,) * len(stride), 1, True
    ).shape
    # forward, weight gradient and (if needed) input gradient each cost the forward's FLOPs (torch.utils.flop_counter's
    # rule); counted from the shapes, not by FlopCounterMode, which would also count the zero sample that the
    # backward pads batch-1 coarse-level convolutions with
    flops = conv_flop_count(list(xs), list(ws), list(out_shape)) * (3 if needs_grad else 2)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    peak = matmul_peak("cpu")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak {peak:.1f} GFLOP/s; "
        f"DMAFNet widths {args.channels}, {args.size}^3, all modalities, training step's convolutions"
    )
    total_t = total_f = 0.0
    rows = []
    for conf, count in record_convolutions(args.size, args.channels).items():
        sec, flops = time_one(conf, args.reps)
        total_t += count * sec
        total_f += count * flops
        rows.append((count * sec, conf, count, sec, flops))
    print(f"{'input':>22} {'weight':>18} {'stride':>6} {'n':>3} {'ms each':>8} {'GFLOP/s':>8} {'% peak':>6}")
    for _, (xs, ws, stride, _p, _b, needs), count, sec, flops in sorted(rows, reverse=True):
        print(
            f"{str(list(xs)):>22} {str(list(ws)):>18} {stride[0]:>6} {count:>3} {1e3 * sec:8.1f} "
            f"{flops / sec / 1e9:8.1f} {100 * flops / sec / 1e9 / peak:6.1f}" + ("" if needs else "  (no input grad)")
        )
    rate = total_f / total_t / 1e9
    print(
        f"\nconvolutions of one step: {total_f / 1e9:.1f} GFLOP in {total_t:.2f} s = {rate:.1f} GFLOP/s = "
        f"{100 * rate / peak:.1f} % of the matmul peak (the ceiling: every other operation taking no time)"
    )


if __name__ == "__main__":
    main()
