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
"""The DMAF-Net objective, paper Eq. 1, 17 and 19."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from .prototype import PrototypeDistillationLoss
from .relation import RelationDistillationLoss

__all__ = ["DMAFLoss", "DMAFLossTerms"]


@dataclass
class DMAFLossTerms:
    """Detached values of the last call of :class:`DMAFLoss`, for logging and for DTM.

    The per-modality gaps are sums over the samples of the batch where the modality is present, with the counts
    beside them, so that they can be summed across DDP ranks before averaging.
    """

    total: torch.Tensor
    fuse: torch.Tensor
    sep: torch.Tensor
    rel: torch.Tensor
    proto: torch.Tensor
    relation_gap_sum: torch.Tensor  # (M,)
    prototype_gap_sum: torch.Tensor  # (M,)
    modality_count: torch.Tensor  # (M,)
    alpha1: torch.Tensor

    def scalars(self) -> dict[str, float]:
        """Loss terms as plain floats, keyed for TensorBoard."""
        return {
            "loss/total": float(self.total),
            "loss/fuse": float(self.fuse),
            "loss/sep": float(self.sep),
            "loss/rel": float(self.rel),
            "loss/proto": float(self.proto),
            "loss/alpha1": float(self.alpha1),
        }


class DMAFLoss(nn.Module):
    """Total DMAF-Net loss, Eq. 19: L = lambda1 L_fuse + lambda2 L_sep + lambda3 L_rel + lambda4 L_proto.

    - L_fuse (Eq. 1) = sum_l lambda_l * l_dice+ce(Up(z_l), y), lambda_l = 1 / 2^l (l = 1 is the final output).
    - L_sep (Eq. 1, 17) = sum_m I_{n,m} w(m) l_dice+ce(z^m, y) over present modalities, averaged over the batch;
      w(m) = :attr:`modality_weights`, all 1 until a :class:`~dmaf_components.handlers.DynamicTrainingMonitor`
      sets them.
    - L_rel (Eq. 4-8) and L_proto (Eq. 9-10) at the last encoder level; the fused side is the (detached) teacher.

    l_dice+ce is MONAI's ``DiceCELoss`` (softmax, one-hot target, optional CE class weights). The module owns the
    learnable parts of distillation (projections P, the MAA attention, alpha1): give its parameters to the optimizer
    and its state to the checkpoint.

    Args:
        num_classes: K (incl. background).
        num_modalities: M.
        feature_channels: C_L, width of the last encoder level.
        lambdas: (lambda1, lambda2, lambda3, lambda4); paper (2.0, 1.0, 0.5, 0.5).
        deep_supervision_weights: lambda_l per level; default 1 / 2^l.
        distillation: add L_rel and L_proto to the loss. When False they are still computed without gradient, so
            that DTM can monitor the gaps (ablation "DTM without distillation").
        ce_weight: optional CE class weights (K,).
        include_background: Dice over the background class too.
        alpha1: initial alpha1 (Eq. 8), learnable when ``learn_alpha1``.
        learn_alpha1: see :class:`RelationDistillationLoss`.
        tau: prototype temperature(s) tau_m.
        attention_heads: heads of the MAA attention.
        detach_teacher: stop gradients through the fused features in distillation.

    Forward:
        output: the training-mode :class:`~dmaf_components.networks.DMAFNetOutput`.
        target: ``(B, 1, *spatial)`` class indices.

    Returns:
        the scalar total loss; :attr:`last_terms` holds every term (:class:`DMAFLossTerms`).
    """

    def __init__(
        self,
        num_classes: int,
        num_modalities: int,
        feature_channels: int,
        lambdas: Sequence[float] = (2.0, 1.0, 0.5, 0.5),
        deep_supervision_weights: Sequence[float] | None = None,
        distillation: bool = True,
        ce_weight: Sequence[float] | None = None,
        include_background: bool = True,
        alpha1: float = 0.6,
        learn_alpha1: bool = True,
        tau: float | Sequence[float] = 1.0,
        attention_heads: int = 8,
        detach_teacher: bool = True,
    ) -> None:
        super().__init__()
        if len(lambdas) != 4:
            raise ValueError(f"lambdas must hold 4 values (lambda1..lambda4), got {list(lambdas)}.")
        self.lambdas = tuple(float(v) for v in lambdas)
        self.ds_weights = None if deep_supervision_weights is None else tuple(deep_supervision_weights)
        if not isinstance(distillation, bool):  # "false" from a command line would silently mean True
            raise TypeError(f"distillation must be True or False, got {distillation!r} (on the command line: False).")
        self.distillation = distillation
        self.num_modalities = num_modalities
        weight = None if ce_weight is None else torch.as_tensor(ce_weight, dtype=torch.float32)
        self.seg_loss = DiceCELoss(include_background=include_background, to_onehot_y=True, softmax=True, weight=weight)
        self.relation = RelationDistillationLoss(
            feature_channels, num_modalities, attention_heads, alpha1, learn_alpha1, detach_teacher
        )
        self.prototype = PrototypeDistillationLoss(num_classes, num_modalities, tau, detach_teacher)
        self.register_buffer("modality_weights", torch.ones(num_modalities), persistent=False)
        self.last_terms: DMAFLossTerms | None = None

    def level_weight(self, level: int) -> float:
        """lambda_l for level l (1-based)."""
        if self.ds_weights is not None:
            return float(self.ds_weights[level - 1]) if level <= len(self.ds_weights) else 0.0
        return 0.5**level

    def fuse_loss(self, deep_supervision: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """L_fuse of Eq. 1: deep supervision with every level's logits upsampled to the label's grid."""
        size = target.shape[2:]
        total = deep_supervision[0].new_zeros((), dtype=torch.float32)
        for level, z in enumerate(deep_supervision, start=1):
            weight = self.level_weight(level)
            if weight == 0.0:
                continue
            if z.shape[2:] != size:
                z = F.interpolate(z, size=size, mode="trilinear" if z.ndim == 5 else "bilinear", align_corners=False)
            total = total + weight * self.seg_loss(z, target)
        return total

    def sep_loss(self, modality_logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L_sep of Eq. 1 / 17: sum over present modalities of w(m) * l(z^m, y), averaged over the batch."""
        b = mask.shape[0]
        total = modality_logits.new_zeros((), dtype=torch.float32)
        for m in range(mask.shape[1]):
            idx = mask[:, m].nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            term = self.seg_loss(modality_logits[idx, m], target[idx])
            total = total + self.modality_weights[m] * term * (idx.numel() / b)
        return total

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        if not hasattr(output, "modality_mask"):
            raise TypeError("DMAFLoss needs the training-mode DMAFNetOutput; call it with network.train() output.")
        target = torch.as_tensor(target)
        mask = output.modality_mask
        l_fuse = self.fuse_loss(output.deep_supervision, target)
        l_sep = self.sep_loss(output.modality_logits, target, mask)
        with torch.set_grad_enabled(self.distillation and torch.is_grad_enabled()):
            l_rel, g_r = self.relation(output.modality_features, output.fused_features, mask)
            l_proto, g_p = self.prototype(output.modality_features, output.fused_features, target, mask)
        l1, l2, l3, l4 = self.lambdas
        total = l1 * l_fuse + l2 * l_sep
        if self.distillation:
            total = total + l3 * l_rel + l4 * l_proto
        self.last_terms = DMAFLossTerms(
            total=total.detach(),
            fuse=l_fuse.detach(),
            sep=l_sep.detach(),
            rel=l_rel.detach(),
            proto=l_proto.detach(),
            relation_gap_sum=(g_r.detach() * mask).sum(0),
            prototype_gap_sum=(g_p.detach() * mask).sum(0),
            modality_count=mask.float().sum(0),
            alpha1=self.relation.alpha1.detach(),
        )
        return total
