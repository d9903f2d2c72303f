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
"""Prototype distillation (paper Sec. 3.3.2, Eq. 9-10)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["class_prototypes", "label_to_grid", "PrototypeDistillationLoss"]


def label_to_grid(label: torch.Tensor, num_classes: int, grid: Sequence[int]) -> torch.Tensor:
    """One-hot class memberships brought to a coarser feature grid by area averaging.

    Args:
        label: ``(B, 1, *spatial)`` integer class indices.
        num_classes: K.
        grid: the feature grid.

    Returns:
        ``(B, K, *grid)`` fractions in [0, 1] (the share of each coarse voxel that belongs to class c).
    """
    onehot = F.one_hot(label[:, 0].long(), num_classes).movedim(-1, 1).float()
    pool = F.adaptive_avg_pool3d if onehot.ndim == 5 else F.adaptive_avg_pool2d
    return pool(onehot, list(grid))


def class_prototypes(features: torch.Tensor, memberships: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Class prototypes, paper Eq. 9: p_c = sum_{x in Omega_c} feat(x) / (|Omega_c| + eps).

    Args:
        features: ``(N, C, *grid)``.
        memberships: ``(N, K, *grid)`` (soft) class memberships on the same grid.
        eps: the epsilon of Eq. 9.

    Returns:
        ``(N, K, C)`` prototypes.
    """
    f = features.flatten(2).float()  # (N, C, V)
    w = memberships.flatten(2).float()  # (N, K, V)
    return (w @ f.transpose(1, 2)) / (w.sum(2, keepdim=True) + eps)


class PrototypeDistillationLoss(nn.Module):
    """Prototype distillation, paper Eq. 9-11.

    g_p(m) = sum_c (1 - cos(p_c^f, p_c^m) / tau_m) over the classes present in the sample; L_proto averages g_p over
    the present modalities of each sample, then over the batch. The label is brought to the feature grid by area
    averaging (soft memberships), so small structures that nearest-neighbour downsampling would erase still count.

    Args:
        num_classes: K.
        num_modalities: M.
        tau: temperature tau_m, one value for all modalities or one per modality.
        detach_teacher: stop gradients through the fused prototypes.
        eps: the epsilon of Eq. 9.
    """

    def __init__(
        self,
        num_classes: int,
        num_modalities: int,
        tau: float | Sequence[float] = 1.0,
        detach_teacher: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        taus = torch.as_tensor(tau, dtype=torch.float32).flatten()
        if taus.numel() == 1:
            taus = taus.repeat(num_modalities)
        if taus.numel() != num_modalities or bool((taus <= 0).any()):
            raise ValueError(f"tau must be one positive value or {num_modalities} positive values, got {tau}.")
        self.register_buffer("tau", taus)
        self.num_classes = num_classes
        self.detach_teacher = detach_teacher
        self.eps = eps

    def forward(
        self, modality_features: torch.Tensor, fused_features: torch.Tensor, label: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            modality_features: ``(B, M, C, *grid)`` e^m_{n,L}.
            fused_features: ``(B, C, *grid)`` f_{n,L}.
            label: ``(B, 1, *spatial)`` class indices at full resolution.
            mask: bool ``(B, M)``.

        Returns:
            L_proto (scalar, Eq. 10) and the per-pair prototype gaps g_p ``(B, M)`` (zero where missing).
        """
        grid = fused_features.shape[2:]
        label = torch.as_tensor(label)
        memberships = label_to_grid(label, self.num_classes, grid)
        present_classes = memberships.flatten(2).sum(2) > 0  # (B, K)
        teacher = fused_features.detach() if self.detach_teacher else fused_features
        p_f = class_prototypes(teacher, memberships, self.eps)  # (B, K, C)
        gap = modality_features.new_zeros(mask.shape, dtype=torch.float32)
        b_idx, m_idx = mask.nonzero(as_tuple=True)
        if b_idx.numel():
            p_m = class_prototypes(modality_features[b_idx, m_idx], memberships[b_idx], self.eps)
            cos = F.cosine_similarity(p_f[b_idx], p_m, dim=2)  # (P, K)
            per_class = (1.0 - cos / self.tau[m_idx, None]) * present_classes[b_idx]
            gap = gap.index_put((b_idx, m_idx), per_class.sum(1).float())
        present = mask.float()
        per_sample = (gap * present).sum(1) / present.sum(1).clamp_min(1.0)
        return per_sample.mean(), gap
