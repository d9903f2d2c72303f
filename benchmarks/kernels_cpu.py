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
"""The two CPU kernel figures of release 0.1.3 (docs/performance.md, docs/method.md), side by side in one run:

1. attention fwd+bwd with 8-wide heads: PyTorch flash attention as is, zero-padded to 16 channels, plain matmul;
2. per-channel sums of squares of a channels-last volume: one BLAS matmul over all voxels (release 0.1.2) vs the
   blocked float64-summed ``_channel_dot``, relative error against float64 and time.

    python benchmarks/kernels_cpu.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from dmaf_components.networks.cpu_kernels import _channel_dot, _rows


def _best(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times[1:])


def attention() -> None:
    print("attention fwd+bwd, ms (best of 3): flash | padded to 16 | matmul+softmax")
    for b, h, n, d in [
        (3, 8, 512, 8),
        (5, 8, 256, 8),
        (2, 8, 768, 8),
        (1, 8, 1536, 8),
        (1, 4, 1536, 8),
        (1, 8, 2048, 8),
    ]:
        q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
        s = d**-0.5

        def flash():
            F.scaled_dot_product_attention(q, k, v, scale=s).sum().backward()

        def padded():
            qp, kp, vp = (F.pad(t, (0, 16 - d)) for t in (q, k, v))
            F.scaled_dot_product_attention(qp, kp, vp, scale=s)[..., :d].sum().backward()

        def plain():
            (torch.softmax((q * s) @ k.transpose(-1, -2), -1) @ v).sum().backward()

        print(f"  {b}x{h} heads x {n} tokens: " + " | ".join(f"{_best(f) * 1e3:.1f}" for f in (flash, padded, plain)))


def channel_sums() -> None:
    print("per-channel sum of squares over a channels-last volume: relative error vs float64, ms")
    for size in (96, 64, 128):
        shape = (1, 8, size, size) if size == 96 else (1, 8, size, size, size)
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = (torch.randn(*shape) * 3 + 5).contiguous(memory_format=fmt)
        d = x - x.mean(tuple(range(2, x.ndim)), keepdim=True)
        exact = (d.double() ** 2).sum(tuple(range(2, x.ndim)))
        one = torch.bmm(_rows(d).transpose(1, 2), _rows(d)).diagonal(dim1=1, dim2=2)
        blocked = _channel_dot(d, d)
        err = [float(((v.double() - exact) / exact).abs().max()) for v in (one, blocked)]
        t_one = _best(lambda: torch.bmm(_rows(d).transpose(1, 2), _rows(d)))
        t_blk = _best(lambda: _channel_dot(d, d))
        name = "x".join(str(s) for s in shape[2:])
        print(f"  {name}: one matmul {err[0]:.1e} ({t_one * 1e3:.1f} ms), blocked {err[1]:.1e} ({t_blk * 1e3:.1f} ms)")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    attention()
    channel_sums()
