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
"""The README demo: what exists of the pipeline, end to end, on CPU in minutes."""

from __future__ import annotations

import time

import torch

__all__ = ["run_demo"]


def run_demo(data_dir: str) -> None:
    """Train DMAF-Net for a few steps on random tensors (the data tools and the bundle are not there yet)."""
    from .handlers import DynamicTrainingMonitor
    from .losses import DMAFLoss
    from .networks import DMAFNet

    print(f"[demo] data tools and bundle not implemented yet: {data_dir} is not generated; running the model core only")
    torch.manual_seed(0)
    net = DMAFNet(3, 4, 4, channels=(8, 16, 32, 64))
    loss_fn = DMAFLoss(4, 4, 64)
    dtm = DynamicTrainingMonitor(loss_fn, net, modality_names=["flair", "t1", "t1ce", "t2"])
    opt = torch.optim.AdamW(list(net.parameters()) + list(loss_fn.parameters()), lr=2e-4, weight_decay=1e-4)
    net.train()
    start = time.time()
    for step in range(3):
        x = torch.randn(1, 4, 32, 32, 32)
        y = torch.randint(0, 4, (1, 1, 32, 32, 32))
        mask = torch.rand(1, 4) > 0.5
        mask[0, step % 4] = True
        opt.zero_grad()
        loss = loss_fn(net(x, mask), y)
        loss.backward()
        dtm.update(loss_fn.last_terms.relation_gap_sum, loss_fn.last_terms.prototype_gap_sum,
                   loss_fn.last_terms.modality_count)
        dtm.scale_gradients(net.encoders)
        opt.step()
        print(f"[demo] step {step}: loss {loss.item():.4f}, mask {mask.int().tolist()[0]}, "
              f"w {[round(v, 3) for v in dtm.weights().tolist()]}")
    print(f"[demo] done in {time.time() - start:.1f} s")
