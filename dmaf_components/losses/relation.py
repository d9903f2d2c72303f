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
"""Relation distillation (paper Sec. 3.3.1): covariance consistency alignment (CCA) and masked attention alignment."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["channel_covariance", "RelationDistillationLoss"]


def channel_covariance(x: torch.Tensor) -> torch.Tensor:
    """Channel covariance over voxels, paper Eq. 4: Cov(X) = (X - mu)^T (X - mu) / (H W D).

    Args:
        x: ``(N, C, *spatial)`` features.

    Returns:
        ``(N, C, C)`` covariance matrices (population normalisation by the number of voxels).
    """
    flat = x.flatten(2).float()
    centred = flat - flat.mean(dim=2, keepdim=True)
    return centred @ centred.transpose(1, 2) / flat.shape[2]


class RelationDistillationLoss(nn.Module):
    """Relation distillation from the fused features f_{n,L} to each modality's e^m_{n,L} (Eq. 4-8, 11).

    - CCA (Eq. 5): L_cov^m = MSE(P_m(Cov(e^m)), Cov(f)), with the learnable linear map of the features
      P_m(S) = W_m S W_m^T (W_m initialised to the identity), i.e. the covariance of the linearly projected features.
    - MAA (Eq. 6-7): A^m = MHA(Q = tokens of e^m, K = V = tokens of f); L_attn^m = MSE(A^m, f). Only present
      (sample, modality) pairs are queried, which is what M_mask does: missing modalities never take part.
    - Eq. 8 / 11: g_r(m) = alpha1 * L_cov^m + (1 - alpha1) * L_attn^m; L_rel averages g_r over the present modalities
      of each sample, then over the batch. alpha1 = sigmoid(a) is learnable (starts at 0.6, stays in (0, 1)).

    Args:
        channels: C_L, the width of the last encoder level.
        num_modalities: M.
        num_heads: heads of the MAA attention.
        alpha1: initial alpha1.
        learn_alpha1: make alpha1 a parameter (paper) or a constant.
        detach_teacher: stop gradients through the fused (teacher) side.
    """

    def __init__(
        self,
        channels: int,
        num_modalities: int,
        num_heads: int = 8,
        alpha1: float = 0.6,
        learn_alpha1: bool = True,
        detach_teacher: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < alpha1 < 1.0:
            raise ValueError(f"alpha1 must lie in (0, 1), got {alpha1}.")
        if not isinstance(learn_alpha1, bool):  # "false" from a command line would silently mean True
            raise TypeError(f"learn_alpha1 must be True or False, got {learn_alpha1!r} (on the command line: False).")
        while channels % num_heads:
            num_heads -= 1
        self.projection = nn.Parameter(torch.eye(channels).repeat(num_modalities, 1, 1))
        self.attention = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        logit = torch.tensor(math.log(alpha1 / (1.0 - alpha1)))
        if learn_alpha1:
            self.alpha1_logit = nn.Parameter(logit)
        else:
            self.register_buffer("alpha1_logit", logit)
        self.detach_teacher = detach_teacher

    @property
    def alpha1(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha1_logit)

    def pair_terms(
        self, modality_features: torch.Tensor, fused_features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L_cov^m and L_attn^m for every (sample, modality) pair, zero where the modality is missing.

        Args:
            modality_features: ``(B, M, C, *spatial)`` e^m_{n,L}.
            fused_features: ``(B, C, *spatial)`` f_{n,L}.
            mask: bool ``(B, M)``.

        Returns:
            two ``(B, M)`` tensors (L_cov, L_attn).
        """
        b_idx, m_idx = mask.nonzero(as_tuple=True)
        cov_loss = modality_features.new_zeros(mask.shape, dtype=torch.float32)
        attn_loss = cov_loss.clone()
        if b_idx.numel() == 0:
            return cov_loss, attn_loss
        teacher = fused_features.detach() if self.detach_teacher else fused_features
        e = modality_features[b_idx, m_idx].float()  # (P, C, *s)
        f = teacher[b_idx].float()
        w = self.projection[m_idx]  # (P, C, C)
        projected = w @ channel_covariance(e) @ w.transpose(1, 2)
        cov = (projected - channel_covariance(f)).pow(2).flatten(1).mean(1)
        q = e.flatten(2).transpose(1, 2)  # (P, N, C)
        kv = f.flatten(2).transpose(1, 2)
        attended, _ = self.attention(q, kv, kv, need_weights=False)
        attn = (attended - kv).pow(2).flatten(1).mean(1)
        return cov_loss.index_put((b_idx, m_idx), cov.float()), attn_loss.index_put((b_idx, m_idx), attn.float())

    def forward(
        self, modality_features: torch.Tensor, fused_features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Returns:
            L_rel (scalar, Eq. 8) and the per-pair relation gaps g_r ``(B, M)`` (Eq. 11; zero where missing).
        """
        cov, attn = self.pair_terms(modality_features, fused_features, mask)
        a = self.alpha1
        gap = a * cov + (1.0 - a) * attn
        present = mask.float()
        per_sample = (gap * present).sum(1) / present.sum(1).clamp_min(1.0)
        return per_sample.mean(), gap
