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
"""DMAF-Net: modality-specific encoders, a shared uni-modal decoder and a fusion decoder fed by per-level fusion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..inferers import study_modality_mask
from .blocks import ModalityEncoder, UNetDecoder
from .cpu_kernels import apply_cpu_kernels
from .fusion import ConcatFusion, DMAFFusion, MeanFusion, shared_present

__all__ = ["DMAFNet", "DMAFNetExport", "DMAFNetOutput", "DMAFNetPrediction", "FUSIONS"]

FUSIONS = ("dmaf", "mean", "concat")


class DMAFNetOutput(NamedTuple):
    """What :class:`DMAFNet` returns in training mode (everything the DMAF objective needs).

    Attributes:
        logits: final fused logits z_1, ``(B, K, *spatial)``.
        deep_supervision: fused logits ``[z_1, ..., z_L]``, z_l at the resolution of level l.
        modality_logits: uni-modal logits z^m from the shared decoder, ``(B, M, K, *spatial)``; zero for a missing
            modality (never computed).
        modality_features: last encoder level e^m_{n,L}, ``(B, M, C_L, *spatial_L)``; zero for a missing modality.
        fused_features: last fused level f_{n,L}, ``(B, C_L, *spatial_L)``.
        modality_mask: bool ``(B, M)``, True = present.
    """

    logits: torch.Tensor
    deep_supervision: list[torch.Tensor]
    modality_logits: torch.Tensor
    modality_features: torch.Tensor
    fused_features: torch.Tensor
    modality_mask: torch.Tensor


class DMAFNetPrediction(NamedTuple):
    """What :meth:`DMAFNet.forward_with_modality_logits` returns (inference with the uni-modal decoder's outputs).

    Attributes:
        logits: fused logits z_1, ``(B, K, *spatial)``: the eval-mode output of :meth:`DMAFNet.forward`.
        modality_logits: uni-modal logits z^m of the shared decoder, ``(B, M, K, *spatial)``; zero for a missing
            modality (never computed).
        modality_mask: bool ``(B, M)``, True = present.
    """

    logits: torch.Tensor
    modality_logits: torch.Tensor
    modality_mask: torch.Tensor


def _level_sizes(size: Sequence[int], levels: int) -> list[tuple[int, ...]]:
    """Spatial size of every encoder level (stride-2, kernel-3, padding-1 convolutions: ceil(n / 2))."""
    sizes = [tuple(int(s) for s in size)]
    for _ in range(levels - 1):
        sizes.append(tuple((s + 1) // 2 for s in sizes[-1]))
    return sizes


class DMAFNet(nn.Module):
    """DMAF-Net (Lan et al., 2025) for segmentation with missing modalities, 2D or 3D.

    M modality-specific encoders E_m (L levels), one shared uni-modal decoder D_s applied to every present modality
    (outputs z^m, Eq. 1 L_sep), one fusion module per level (DMAF, Eq. 2-3, or an attention-free baseline) and a
    fusion decoder D_f with deep supervision (outputs z_l, Eq. 1 L_fuse).

    Missing modalities cost nothing: their encoder and shared-decoder passes are skipped (batch 1) or run only on
    the samples where the modality is present (batch > 1), and their features are zero at every level.

    Args:
        spatial_dims: 2 (MyoPS slices) or 3 (BraTS volumes).
        in_channels: number of modalities M (one channel each).
        out_channels: number of classes K (incl. background).
        channels: encoder widths per level; ``(8, 16, 32, 64, 128)`` is the reference baselines' setting.
        fusion: ``"dmaf"`` (default), ``"mean"`` (masked mean) or ``"concat"`` (concatenation + 1x1 conv).
        token_grid: S_d of the DMAF modules; default 8 per axis (8^3 in 3D, 8^2 in 2D; docs/method.md).
        num_layers: transformer layers K per DMAF module (default 4).
        num_heads: attention heads (at most; narrow levels use fewer so each head is >= 8 wide).
        mlp_ratio: FFN width / C in the DMAF transformer.
        dropout: dropout in the DMAF transformer.
        deep_supervision: fusion decoder heads at every level (training only).
        gradient_checkpointing: recompute encoder and decoder stages in backward instead of storing their activations
            (training memory down, compute up by about one forward pass); the shared decoder then also runs one
            modality at a time, so that its recomputation in backward holds one modality's activations, not all of
            them. See docs/performance.md.
        channels_last: the CPU kernels of :mod:`dmaf_components.networks.cpu_kernels` (channels-last oneDNN
            convolutions, fused instance norm + LeakyReLU, concatenation-free merges, padded attention heads), which
            act on CPU tensors only (on CPU the logits come out channels-last). None or True (default None): applied
            by :func:`~dmaf_components.networks.cpu_kernels.apply_cpu_kernels`; False: the plain MONAI/PyTorch
            modules everywhere.

    Forward:
        x: ``(B, M, *spatial)`` modalities stacked as channels.
        modality_mask: optional bool ``(B, M)``, True = present. If None, a modality is present iff its channel has a
            non-zero voxel (per sample).

    Returns:
        eval mode: fused logits ``(B, K, *spatial)``; training mode: :class:`DMAFNetOutput`.
        :meth:`forward_with_modality_logits` adds the shared decoder's uni-modal logits at inference
        (:class:`DMAFNetPrediction`).

    TorchScript: ``torch.jit.script(net)`` compiles the inference graph, :class:`DMAFNetExport` (same submodules and
    parameter names), which takes ``(x, modality_mask=None)`` at any size the network accepts.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 4,
        channels: Sequence[int] = (8, 16, 32, 64, 128),
        fusion: str = "dmaf",
        token_grid: Sequence[int] | int | None = None,
        num_layers: int = 4,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        deep_supervision: bool = True,
        gradient_checkpointing: bool = False,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}.")
        for name, value in (("gradient_checkpointing", gradient_checkpointing), ("channels_last", channels_last)):
            if not (isinstance(value, bool) or (value is None and name == "channels_last")):
                # a command line's "false" is a non-empty string: it would silently mean True
                raise TypeError(f"{name} must be True or False, got {value!r} (on the command line: False).")
        if in_channels < 1 or len(channels) < 2:
            raise ValueError("DMAFNet needs in_channels >= 1 modality and at least 2 levels in channels.")
        if token_grid is None:
            token_grid = 8
        if isinstance(token_grid, int):
            token_grid = (token_grid,) * spatial_dims
        self.spatial_dims = spatial_dims
        self.num_modalities = in_channels
        self.out_channels = out_channels
        self.channels = tuple(int(c) for c in channels)
        self.fusion = fusion
        self.encoders = nn.ModuleList(
            [ModalityEncoder(spatial_dims, self.channels, 1, gradient_checkpointing) for _ in range(in_channels)]
        )
        if fusion == "dmaf":
            fusions = [
                DMAFFusion(spatial_dims, c, in_channels, token_grid, num_layers, num_heads, mlp_ratio, dropout)
                for c in self.channels
            ]
        elif fusion == "concat":
            fusions = [ConcatFusion(spatial_dims, c, in_channels) for c in self.channels]
        else:
            fusions = [MeanFusion() for _ in self.channels]
        self.fusions = nn.ModuleList(fusions)
        self.shared_decoder = UNetDecoder(
            spatial_dims,
            self.channels,
            out_channels,
            deep_supervision=False,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.fusion_decoder = UNetDecoder(
            spatial_dims, self.channels, out_channels, deep_supervision, gradient_checkpointing
        )
        self.gradient_checkpointing = gradient_checkpointing
        if channels_last is not False:
            apply_cpu_kernels(self)

    def __prepare_scriptable__(self) -> DMAFNetExport:
        """What ``torch.jit.script`` compiles in place of this module (see :class:`DMAFNetExport`)."""
        return DMAFNetExport(self)

    def resolve_mask(self, x: torch.Tensor, modality_mask: torch.Tensor | None) -> torch.Tensor:
        """The bool ``(B, M)`` presence mask: the given one, or derived from non-zero voxels."""
        b, m = x.shape[:2]
        if m != self.num_modalities:
            raise ValueError(f"input has {m} channels but DMAFNet was built for {self.num_modalities} modalities.")
        if modality_mask is None:
            return study_modality_mask(x)
        mask = torch.as_tensor(modality_mask, device=x.device).bool()
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape[0] == 1 and b > 1:  # one study, several sliding windows / slices
            mask = mask.expand(b, -1)
        if mask.shape != (b, m):
            raise ValueError(f"modality_mask must have shape (B, M) = ({b}, {m}), got {tuple(modality_mask.shape)}.")
        return mask

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Run each encoder on the samples where its modality is present.

        Returns:
            L tensors ``(B, M, C_l, *spatial_l)``, zero for missing modalities.
        """
        b = x.shape[0]
        sizes = _level_sizes(x.shape[2:], len(self.channels))
        per_level: list[list[torch.Tensor]] = [[] for _ in self.channels]
        tracing = torch.jit.is_tracing()
        for m, encoder in enumerate(self.encoders):
            present = mask[:, m]
            if tracing:  # a traced graph must not depend on the example's mask: compute, then zero
                keep = present.to(x.dtype)
                outs = [o * keep.reshape((b,) + (1,) * (o.ndim - 1)) for o in encoder(x[:, m : m + 1])]
            else:
                idx = present.nonzero().squeeze(1)
                if idx.numel() == b:
                    outs = encoder(x[:, m : m + 1])
                elif idx.numel() == 0:
                    outs = [x.new_zeros((b, c) + s) for c, s in zip(self.channels, sizes)]
                else:
                    sub = encoder(x[idx, m : m + 1])
                    outs = [s.new_zeros((b,) + s.shape[1:]).index_copy(0, idx, s) for s in sub]
            for level, o in enumerate(outs):
                per_level[level].append(o)
        return [torch.stack(level, dim=1) for level in per_level]

    def encode_present(self, x: torch.Tensor, present: torch.Tensor) -> list[torch.Tensor]:
        """Run the encoders of the modalities ``present`` (every sample has exactly these).

        Returns:
            L tensors ``(P * B, C_l, *spatial_l)``, modality-major (row ``p * B + b`` is modality ``present[p]`` of
            sample b): the shared decoder's batch as it is, and :func:`unpack` gives the fusion's ``(B, P, ...)``.
        """
        outs = [self.encoders[int(m)](x[:, int(m) : int(m) + 1]) for m in present]
        return [level[0] if len(level) == 1 else torch.cat(level, dim=0) for level in zip(*outs)]

    @staticmethod
    def unpack(packed: torch.Tensor, num_present: int) -> torch.Tensor:
        """``(P * B, ...)`` modality-major -> ``(B, P, ...)`` (a view, no copy)."""
        return packed.reshape((num_present, -1) + tuple(packed.shape[1:])).transpose(0, 1)

    def decode_present(self, packed: Sequence[torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """Shared decoder D_s on the present modalities' packed features (see :meth:`encode_present`).

        With gradient checkpointing it runs one modality at a time, so that backward recomputes one modality's
        decoder activations at a time.

        Returns:
            ``(B, M, K, *spatial)`` uni-modal logits z^m, zero where the modality is missing.
        """
        p = int(present.numel())
        b = packed[0].shape[0] // p
        if self.gradient_checkpointing and self.training and p > 1:
            z = torch.cat([self.shared_decoder([f[i * b : (i + 1) * b] for f in packed], False)[0] for i in range(p)])
        else:
            z = self.shared_decoder(list(packed), all_levels=False)[0]
        return self._fill_missing(self.unpack(z, p), present)

    def _fill_missing(self, t: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``(B, P, ...)`` for the modalities ``present`` -> ``(B, M, ...)``, zero for the others."""
        if present.numel() == self.num_modalities:
            return t
        return t.new_zeros((t.shape[0], self.num_modalities) + tuple(t.shape[2:])).index_copy(1, present, t)

    def decode_modalities(self, feats: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Shared decoder D_s on every present (sample, modality) pair in one batched call.

        Returns:
            ``(B, M, K, *spatial)`` uni-modal logits z^m, zero where the modality is missing.
        """
        b_idx, m_idx = mask.nonzero(as_tuple=True)
        b, m = mask.shape
        out_shape = (b, m, self.out_channels) + tuple(feats[0].shape[3:])
        if b_idx.numel() == 0:
            return feats[0].new_zeros(out_shape)
        z = self.shared_decoder([f[b_idx, m_idx] for f in feats], all_levels=False)[0]
        return z.new_zeros(out_shape).index_put((b_idx, m_idx), z)

    def _encode_and_fuse(
        self, x: torch.Tensor, modality_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None, list[torch.Tensor], list[torch.Tensor]]:
        """Encoders and per-level fusion, shared by :meth:`forward` and :meth:`forward_with_modality_logits`.

        Returns:
            ``(mask, present, packed, feats, fused)``: the bool ``(B, M)`` mask; the present indices ``(P,)`` when
            every sample has the same modalities (else None); the encoders' packed ``(P * B, C_l, ...)`` outputs on
            that path (else None); the per-level ``(B, P or M, C_l, ...)`` features; the fused ``(B, C_l, ...)``.
        """
        if hasattr(x, "as_tensor"):  # MONAI MetaTensor: plain tensor math is faster and metadata is not needed
            x = x.as_tensor()
        if modality_mask is not None and hasattr(modality_mask, "as_tensor"):
            modality_mask = modality_mask.as_tensor()
        mask = self.resolve_mask(x, modality_mask)
        x = x * mask.to(x.dtype).reshape(mask.shape + (1,) * (x.ndim - 2))
        present = shared_present(mask)
        packed: list[torch.Tensor] | None = None
        if present is not None:  # every sample has the same modalities (batch 1): only theirs are computed
            packed = self.encode_present(x, present)
            feats = [self.unpack(f, present.numel()) for f in packed]
            fused = [fuse(f, mask, present) for fuse, f in zip(self.fusions, feats)]
        else:
            feats = self.encode(x, mask)
            fused = [fuse(f, mask) for fuse, f in zip(self.fusions, feats)]
        return mask, present, packed, feats, fused

    def forward(self, x: torch.Tensor, modality_mask: torch.Tensor | None = None) -> torch.Tensor | DMAFNetOutput:
        mask, present, packed, feats, fused = self._encode_and_fuse(x, modality_mask)
        z = self.fusion_decoder(fused, all_levels=self.training)
        if not self.training:
            return z[0]
        if present is not None:
            modality_logits = self.decode_present(packed, present)
            last = self._fill_missing(feats[-1], present)
        else:
            modality_logits, last = self.decode_modalities(feats, mask), feats[-1]
        return DMAFNetOutput(
            logits=z[0],
            deep_supervision=z,
            modality_logits=modality_logits,
            modality_features=last,
            fused_features=fused[-1],
            modality_mask=mask,
        )

    def forward_with_modality_logits(
        self, x: torch.Tensor, modality_mask: torch.Tensor | None = None
    ) -> DMAFNetPrediction:
        """The inference path that also returns the shared decoder's uni-modal logits z^m.

        :meth:`forward` in eval mode returns the fused logits only (the shared decoder D_s serves the training
        objective, Eq. 1 L_sep); this runs D_s on every present modality as well, at the cost of one more decoder
        pass per present modality. The fused logits are :meth:`forward`'s eval-mode output, computed the same way,
        whatever the module's mode (no deep supervision). The TorchScript export (:class:`DMAFNetExport`) does not
        include it. Used by :mod:`dmaf_components.uncertainty` (modality disagreement).

        Args:
            x: ``(B, M, *spatial)``.
            modality_mask: optional bool ``(B, M)``, as :meth:`forward`.

        Returns:
            :class:`DMAFNetPrediction`: fused logits ``(B, K, *spatial)``, uni-modal logits ``(B, M, K, *spatial)``
            (zero for a missing modality) and the bool ``(B, M)`` mask used.
        """
        mask, present, packed, feats, fused = self._encode_and_fuse(x, modality_mask)
        logits = self.fusion_decoder(fused, all_levels=False)[0]
        if present is not None and packed is not None:
            modality_logits = self.decode_present(packed, present)
        else:
            modality_logits = self.decode_modalities(feats, mask)
        return DMAFNetPrediction(logits=logits, modality_logits=modality_logits, modality_mask=mask)


class DMAFNetExport(nn.Module):
    """The inference graph of a :class:`DMAFNet` in a form TorchScript compiles: what ``torch.jit.script(net)`` and
    MONAI's ``ckpt_export`` (which scripts) produce.

    It holds the network's own submodules (no copy: the same parameters, names and state dict) and computes the
    eval-mode logits as the eager network does, for any spatial size it accepts and any modality mask, with a
    control flow that depends on no Python value: every encoder runs on every sample and a missing modality's
    features are zeroed afterwards (eager mode skips it; its features are zero all the same), the DMAF modules attend
    over one token sequence with M_mask (eager mode keeps only the present modalities' tokens: the same weights), and
    the eager CPU fast paths (fused instance norm, oneDNN calls, padded attention heads) give way to PyTorch's modules
    (the same results within float rounding). docs/engineering.md ("Export") has the measured agreement.

    Args:
        net: the network; its training mode, layout policy and gradient checkpointing do not apply here.

    Forward:
        x: ``(B, M, *spatial)``.
        modality_mask: optional ``(B, M)`` or ``(M,)`` presence mask (bool or 0/1); None: a modality is present iff its
            channel has a non-zero voxel (per sample).

    Returns:
        fused logits ``(B, K, *spatial)``.
    """

    def __init__(self, net: DMAFNet) -> None:
        super().__init__()
        self.num_modalities = net.num_modalities
        self.encoders = net.encoders
        self.fusions = net.fusions
        self.shared_decoder = net.shared_decoder  # unused: kept so that the state dict is the network's
        self.fusion_decoder = net.fusion_decoder
        self.train(net.training)

    def forward(self, x: torch.Tensor, modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, m = x.shape[0], x.shape[1]
        if m != self.num_modalities:
            raise ValueError("input channels differ from the number of modalities DMAFNet was built for.")
        if modality_mask is None:
            mask = x.flatten(2).ne(0).any(dim=2)
        else:
            mask = modality_mask.to(device=x.device, dtype=torch.bool)
            if mask.dim() == 1:
                mask = mask.unsqueeze(0)
            if mask.shape[0] == 1 and b > 1:  # one study, several sliding windows / slices
                mask = mask.expand(b, m)
            if mask.dim() != 2 or mask.shape[0] != b or mask.shape[1] != m:
                raise ValueError("modality_mask must have shape (B, M).")
        x = x * mask.to(x.dtype).reshape([b, m] + [1] * (x.dim() - 2))
        per_level: list[list[torch.Tensor]] = []
        for i, encoder in enumerate(self.encoders):
            keep = mask[:, i].to(x.dtype)
            for level, out in enumerate(encoder(x[:, i : i + 1])):
                out = out * keep.reshape([b] + [1] * (out.dim() - 1))
                if i == 0:
                    per_level.append([out])
                else:
                    per_level[level].append(out)
        fused: list[torch.Tensor] = []
        for level, fuse in enumerate(self.fusions):
            fused.append(fuse(torch.stack(per_level[level], dim=1), mask))
        return self.fusion_decoder(fused, False)[0]
