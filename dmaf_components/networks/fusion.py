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
"""Fusion of per-modality features: the DMAF module (paper Sec. 3.2, Eq. 2-3) and attention-free baselines."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from monai.networks.layers.factories import Conv
from torch import nn

from .blocks import conv_of_concat


__all__ = [
    "shared_present",
    "DMAFFusion",
    "MeanFusion",
    "ConcatFusion",
    "masked_softmax",
    "grid_to_tokens",
    "tokens_to_grid",
    "attention_heads",
]


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Softmax over modalities in which masked-out entries get weight exactly 0.

    Computed in float32 so that fp16/bf16 autocast cannot overflow; a sample with no modality present gets all-zero
    weights (never NaN).

    Args:
        logits: ``(B, M, ...)`` scores.
        mask: bool ``(B, M)``, True = present.
        dim: the modality dimension (1).

    Returns:
        weights of the shape and dtype of ``logits``, summing to 1 over present modalities and 0 elsewhere.
    """
    m = mask.reshape(list(mask.shape) + [1] * (logits.dim() - mask.dim()))
    # the most negative float32, torch.finfo(torch.float32).min, written out: TorchScript has no torch.finfo
    scores = logits.float().masked_fill(~m, -3.4028234663852886e38)
    weights = torch.softmax(scores, dim=dim) * m
    return weights.to(logits.dtype)


def shared_present(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices ``(P,)`` of the present modalities when every sample has the same ones and at least one (always the
    case at batch 1), else None. None while tracing too: an exported graph must not depend on the example's mask.

    Args:
        mask: bool ``(B, M)``, True = present.
    """
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return None
    shared = mask[0]
    if bool(shared.any()) and bool((mask == shared).all()):
        return shared.nonzero().squeeze(1)
    return None


def grid_to_tokens(x: torch.Tensor, num_modalities: int) -> torch.Tensor:
    """Serialise per-modality grids into one modality-major token sequence.

    Args:
        x: ``(B * M, C, *grid)``, the M modalities of each sample consecutive.
        num_modalities: M.

    Returns:
        ``(B, M * N, C)`` with N = prod(grid); token ``m * N + i`` is voxel i (row-major) of modality m.
    """
    bm, c = x.shape[0], x.shape[1]
    tokens = x.flatten(2).transpose(1, 2)  # (B*M, N, C)
    return tokens.reshape(bm // num_modalities, num_modalities * tokens.shape[1], c)


def tokens_to_grid(tokens: torch.Tensor, num_modalities: int, grid: list[int]) -> torch.Tensor:
    """Inverse of :func:`grid_to_tokens`: every modality's tokens go back to their own grid positions.

    Args:
        tokens: ``(B, M * N, C)`` modality-major.
        num_modalities: M.
        grid: the token grid (N = prod(grid)).

    Returns:
        ``(B, M, C, *grid)``.
    """
    b, c = tokens.shape[0], tokens.shape[2]
    t = tokens.reshape(b, num_modalities, -1, c)  # (B, M, N, C): split modality-major, never voxel-major
    return t.transpose(2, 3).reshape([b, num_modalities, c] + list(grid))


def attention_heads(channels: int, max_heads: int, min_head_dim: int = 8) -> int:
    """Largest head count <= ``max_heads`` that divides ``channels`` with head width >= ``min_head_dim`` (>= 1 head)."""
    for h in range(max_heads, 0, -1):
        if channels % h == 0 and channels // h >= min_head_dim:
            return h
    return 1


class DMAFFusion(nn.Module):
    """Dynamic Modality-Aware Fusion of one encoder level (paper Fig. 1, Eq. 2-3).

    Steps: (1) zero missing modalities (dynamic mask C); (2) adaptive convolutional downsampling of each modality
    to the token grid S_d (adaptive average pooling to ``min(size, S_d)`` per axis, then a 3x3 convolution: works for
    any patch size, a level already at or below S_d is not downsampled); (3) flatten to tokens, add positional and
    modality embeddings, concatenate to T_0 of shape ``(S_d * M, C)``; (4) K pre-LN transformer layers (Eq. 2) whose
    attention mask M_mask removes every token of a missing modality (as key); (5) one score per token, de-serialised
    to each modality's own grid, upsampled to the level's resolution; (6) softmax across present modalities (a
    missing modality's weight is exactly 0) and f = sum_m e^m * a_m (Eq. 3).

    Args:
        spatial_dims: 2 or 3.
        channels: feature width C of this level (the token width).
        num_modalities: M.
        token_grid: S_d, e.g. ``(8, 8, 8)`` in 3D, ``(8, 8)`` in 2D.
        num_layers: K.
        num_heads: maximum number of heads (reduced so that each head is >= 8 wide, see :func:`attention_heads`).
        mlp_ratio: FFN width / C.
        dropout: dropout in attention and FFN.
        group_by_mask: with mixed masks in a batch, run the transformer on the present modalities' tokens only,
            samples grouped by their number of present modalities (:meth:`_grouped_weights`, the default), instead
            of once on every token with M_mask. Both give the same weights; grouping costs less. Exported graphs
            (traced or scripted) always use the masked sequence.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        num_modalities: int,
        token_grid: Sequence[int],
        num_layers: int = 4,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        group_by_mask: bool = True,
    ) -> None:
        super().__init__()
        self.group_by_mask = group_by_mask
        self.spatial_dims = spatial_dims
        self.num_modalities = num_modalities
        self.token_grid = tuple(int(g) for g in token_grid)
        self._token_grid_list = list(self.token_grid)  # (TorchScript indexes a list, not a tuple, by a variable)
        if len(self.token_grid) != spatial_dims:
            raise ValueError(f"token_grid {self.token_grid} must have {spatial_dims} entries (spatial_dims).")
        self.down = Conv[Conv.CONV, spatial_dims](channels, channels, kernel_size=3, padding=1)
        self.pos_embed = nn.Parameter(torch.zeros(1, channels, *self.token_grid))
        self.modality_embed = nn.Parameter(torch.zeros(1, num_modalities, 1, channels))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.modality_embed, std=0.02)
        heads = attention_heads(channels, num_heads)
        self.layers = nn.ModuleList(
            [
                TransformerBlock(  # one pre-LN layer of Eq. 2 (M_mask as its attention mask)
                    hidden_size=channels,
                    mlp_dim=int(channels * mlp_ratio),
                    num_heads=heads,
                    dropout_rate=dropout,
                    qkv_bias=True,
                    use_flash_attention=True,  # torch scaled_dot_product_attention
                )
                for _ in range(num_layers)
            ]
        )
        self.norm = nn.LayerNorm(channels)
        self.score = nn.Linear(channels, 1)
        self.interp = "trilinear" if spatial_dims == 3 else "bilinear"

    def attention_mask(self, mask: torch.Tensor, tokens_per_modality: int) -> torch.Tensor:
        """M_mask as a boolean SDPA mask ``(B, 1, 1, M * N)`` (True = may be attended).

        A sample with no modality present (e.g. a sliding-window patch outside the head whose mask was derived from
        its voxels) keeps all keys: its features are all zero and its fusion weights are zeroed afterwards, and a row
        with every key masked would make softmax NaN.
        """
        safe = mask | ~mask.any(dim=1, keepdim=True)
        keys = safe[:, :, None].expand(-1, -1, tokens_per_modality).reshape(mask.shape[0], -1)
        return keys[:, None, None, :]

    def spatial_weights(
        self, feats: torch.Tensor, mask: torch.Tensor, present: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-modality spatial weight maps a_m (Eq. 2-3): :meth:`reference_weights`, or one of its optimisations.

        :meth:`reference_weights` is the reference: every modality's tokens in one sequence, M_mask removing the
        missing ones as keys, a softmax over the present modalities. The other paths give its result (to float
        rounding; ``tests/test_networks.py::test_every_weight_path_gives_the_reference``) at less cost:

        - ``present`` given (the network packed the present modalities): only their tokens, no mask;
        - every sample of the batch has the same modalities (always at batch 1): the same, selected here (masked keys
          get zero attention, and missing queries are discarded by the zero weights), at (present / M)^2 of the
          attention cost;
        - mixed masks with ``group_by_mask`` (the default): :meth:`_grouped_weights`, the samples with P present
          modalities together, at sum_b P_b^2 instead of B * M^2;
        - a scripted or traced graph: the reference itself (one graph for any mask).

        Args:
            feats: ``(B, M, C, *spatial)`` features, missing modalities zero; or, when ``present`` is given,
                ``(B, P, C, *spatial)`` holding only the modalities ``present`` (shared by every sample).
            mask: bool ``(B, M)``.
            present: optional ``(P,)`` indices of the modalities ``feats`` holds.

        Returns:
            ``(B, M, *spatial)`` weights, 0 for missing modalities, summing to 1 over present ones; with ``present``,
            ``(B, P, *spatial)`` weights of the modalities in ``feats``.
        """
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            # an exported graph: one masked token sequence for any mask (the same weights, docs/method.md "Export")
            if present is not None:
                raise ValueError("an exported DMAFFusion takes (B, M, ...) features and the mask, not present.")
            return self.reference_weights(feats, mask)
        if present is not None:
            return self._present_weights(feats, self.modality_embed.index_select(1, present))
        keep = shared_present(mask)
        if keep is not None:
            weights = self._present_weights(feats.index_select(1, keep), self.modality_embed.index_select(1, keep))
            return weights.new_zeros(feats.shape[:2] + weights.shape[2:]).index_copy(1, keep, weights)
        if self.group_by_mask:
            return self._grouped_weights(feats, mask)
        return self.reference_weights(feats, mask)

    def reference_weights(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 2-3 as written, the reference of every path of :meth:`spatial_weights`: all M modalities' tokens in
        one sequence, M_mask (:meth:`attention_mask`) removing the missing ones as keys, then a softmax over the
        present modalities (:func:`masked_softmax`; all zero for a sample with none present).

        Args:
            feats: ``(B, M, C, *spatial)`` features, missing modalities zero.
            mask: bool ``(B, M)``.

        Returns:
            ``(B, M, *spatial)`` weights, 0 for missing modalities, summing to 1 over present ones.
        """
        return masked_softmax(self._scores(feats, self.modality_embed, mask), mask, dim=1)

    def _grouped_weights(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Weights of a batch with mixed masks, computed for the samples with P present modalities together, from
        their present modalities' tokens only (each sample's own modality embeddings), then scattered back: the same
        result as one masked sequence (Eq. 2's M_mask removes missing tokens as keys, and missing queries get weight
        0), at sum_b P_b^2 instead of B * M^2 of the attention cost, with no mask, in at most M transformer calls.

        Args:
            feats: ``(B, M, C, *spatial)``, missing modalities zero.
            mask: bool ``(B, M)``.

        Returns:
            ``(B, M, *spatial)`` weights (0 for missing modalities and for samples with no modality present).
        """
        counts = mask.sum(1)
        # present modalities of every sample in canonical order, padded at the end (argsort is stable)
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
        rows, cols, values = [], [], []
        for p in range(1, mask.shape[1] + 1):  # samples with no modality present keep all-zero weights
            samples = (counts == p).nonzero().squeeze(1)
            if samples.numel() == 0:
                continue
            keep = order.index_select(0, samples)[:, :p]  # (b, P) modality indices
            w = self._present_weights(feats[samples[:, None], keep], self.modality_embed[0][keep])  # (b, P, *S)
            rows.append(samples.repeat_interleave(p))
            cols.append(keep.flatten())
            values.append(w.flatten(0, 1))
        out = feats.new_zeros(feats.shape[:2] + feats.shape[3:])
        if not values:
            return out
        return out.index_put((torch.cat(rows), torch.cat(cols)), torch.cat(values))

    def _present_weights(self, feats: torch.Tensor, mod_embed: torch.Tensor) -> torch.Tensor:
        """Weights of present modalities from their features ``(B, P, C, *spatial)`` and modality embeddings
        ``(1 or B, P, 1, C)``: no masking needed."""
        scores = self._scores(feats, mod_embed, None)
        return torch.softmax(scores.float(), dim=1).to(scores.dtype)

    def _scores(self, feats: torch.Tensor, mod_embed: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One score per voxel and modality, ``(B, M', *spatial)``, for the M' modalities of ``feats`` with modality
        embeddings ``mod_embed`` ``(1 or B, M', 1, C)``; ``mask`` (bool ``(B, M')``) masks the missing modalities'
        tokens as keys, None attends to every token."""
        b, ms, c = feats.shape[0], feats.shape[1], feats.shape[2]
        spatial = list(feats.shape[3:])
        grid: list[int] = []
        for i, s in enumerate(spatial):
            grid.append(min(s, self._token_grid_list[i]))
        flat = feats.reshape([b * ms, c] + spatial)
        if self.spatial_dims == 3:
            x = self.down(F.adaptive_avg_pool3d(flat, grid))
        else:
            x = self.down(F.adaptive_avg_pool2d(flat, grid))
        pos = self.pos_embed
        if list(pos.shape[2:]) != grid:
            pos = F.interpolate(pos, size=grid, mode=self.interp, align_corners=False)
        tokens = grid_to_tokens(x + pos, ms)  # (B, ms*N, C)
        n = tokens.shape[1] // ms
        tokens = (tokens.reshape(b, ms, n, c) + mod_embed).reshape(b, ms * n, c)
        attn_mask = None if mask is None else self.attention_mask(mask, n)
        for layer in self.layers:
            tokens = layer(tokens, attn_mask=attn_mask)
        scores = tokens_to_grid(self.score(self.norm(tokens)), ms, grid)[:, :, 0]  # (B, ms, *grid)
        if list(scores.shape[2:]) != list(spatial):
            scores = F.interpolate(scores, size=spatial, mode=self.interp, align_corners=False)
        return scores

    def forward(self, feats: torch.Tensor, mask: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            feats: ``(B, M, C, *spatial)`` per-modality features e^m_{n,l} (missing ones zero), or
                ``(B, P, C, *spatial)`` holding only the modalities ``present``.
            mask: bool ``(B, M)``, True = present.
            present: optional ``(P,)`` indices of the modalities in ``feats`` (every sample has exactly these).

        Returns:
            fused features f_{n,l} of shape ``(B, C, *spatial)``.
        """
        return self._weighted_sum(feats, self.spatial_weights(feats, mask, present))

    def _weighted_sum(self, feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """f = sum_m e^m * a_m (Eq. 3) of features ``(B, M', C, *spatial)`` and weights ``(B, M', *spatial)``,
        returning ``(B, C, *spatial)``.

        One modality at a time: no ``(B, M', C, ...)`` product is built, and the result keeps the features' memory
        layout (channels-last on CPU). ``unbind``, not indexing: its backward stacks the gradients once instead of
        zero-filling the whole stack per modality.
        """
        parts, w = feats.unbind(1), weights.unsqueeze(2).unbind(1)
        out = parts[0] * w[0]
        for part, a in zip(parts[1:], w[1:]):
            out = out.addcmul(part, a)
        return out


class MeanFusion(nn.Module):
    """Attention-free baseline: mean of the present modalities' features (zero when none is present)."""

    def forward(self, feats: torch.Tensor, mask: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """``feats`` ``(B, M, C, *spatial)`` (missing zero), or ``(B, P, C, *spatial)`` holding the modalities
        ``present``; returns ``(B, C, *spatial)``."""
        if present is not None:
            return feats.mean(1)
        m = mask.to(feats.dtype).reshape(list(mask.shape) + [1] * (feats.dim() - 2))
        return (feats * m).sum(1) / m.sum(1).clamp_min(1.0)


class ConcatFusion(nn.Module):
    """Attention-free baseline as in mmFormer/RFNet: concatenate the (zero-filled) modalities, fuse with a 1x1 conv."""

    def __init__(self, spatial_dims: int, channels: int, num_modalities: int) -> None:
        super().__init__()
        self.num_modalities = num_modalities
        self.proj = Conv[Conv.CONV, spatial_dims](channels * num_modalities, channels, kernel_size=1)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """``feats`` ``(B, M, C, *spatial)`` (missing zero), or ``(B, P, C, *spatial)`` holding the modalities
        ``present`` (the missing modalities' zero channels are then left out of the 1x1 convolution together with
        their weights: the same result); returns ``(B, C, *spatial)``."""
        if torch.jit.is_scripting() or present is None:
            m = mask.to(feats.dtype).reshape(list(mask.shape) + [1] * (feats.dim() - 2))
            return self.proj((feats * m).flatten(1, 2))
        w = self.proj.weight
        c_out, m_c = w.shape[0], w.shape[1]
        w = w.reshape([c_out, self.num_modalities, m_c // self.num_modalities] + list(w.shape[2:]))
        return self._present(feats, w.index_select(1, present).flatten(1, 2))

    def _present(self, feats: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The 1x1 convolution of the present modalities' features ``(B, P, C, *spatial)`` with their slice
        ``(C, P * C, 1...)`` of the weight: one partial convolution per modality (no concatenated copy)."""
        return self._proj_of_concat(list(feats.unbind(1)), weight)

    def _proj_of_concat(self, parts: list[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        return conv_of_concat(self.proj, parts, weight)
