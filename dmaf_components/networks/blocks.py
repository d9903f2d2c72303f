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
"""U-Net style building blocks of DMAF-Net: one modality encoder and one decoder (shared or fusion)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ModalityEncoder", "UNetDecoder", "conv_block", "conv_of_concat"]

_NORM = ("instance", {"affine": True})
_ACT = ("leakyrelu", {"negative_slope": 0.2, "inplace": True})


def conv_block(
    spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3, strides: int = 1
) -> Convolution:
    """Convolution -> instance norm -> LeakyReLU(0.2), the unit used throughout (as in the mmFormer/PASSION baselines):
    MONAI's ``Convolution`` (children ``conv`` and ``adn``), 'same' padding (with stride s: ceil(n / s) outputs)."""
    return Convolution(
        spatial_dims, in_channels, out_channels, strides=strides, kernel_size=kernel_size, norm=_NORM, act=_ACT
    )


def conv_of_concat(
    conv: nn.Module, parts: list[torch.Tensor], weight: torch.Tensor | None = None, conv_fn=None
) -> torch.Tensor:
    """``conv(torch.cat(parts, dim=1))`` computed as the sum of each part's convolution with its slice of the weight's
    input channels (bias added once): the same result, and autograd keeps the parts (alive anyway) instead of a
    concatenated copy, the largest activation of a decoder level.

    Args:
        conv: an ``nn.Conv2d``/``nn.Conv3d`` with zero padding.
        parts: ``(B, C_i, *spatial)`` tensors, in the order of the weight's input channels.
        weight: optional replacement of ``conv.weight`` (with ``sum(C_i)`` input channels).
        conv_fn: ``(x, weight, bias) -> y`` computing one partial convolution; default ``F.conv*d`` with ``conv``'s
            stride, padding, dilation and groups.

    Returns:
        ``(B, C_out, *spatial')``.
    """
    if conv_fn is None:
        fn = F.conv3d if parts[0].dim() == 5 else F.conv2d

        def conv_fn(x, w, b):
            return fn(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)

    w = conv.weight if weight is None else weight
    out, start = None, 0
    for i, part in enumerate(parts):
        c = part.shape[1]
        y = conv_fn(part, w[:, start : start + c], conv.bias if i == 0 else None)
        out = y if out is None else out + y
        start += c
    return out


@torch.jit.interface
class _TensorModule(nn.Module):
    """What TorchScript needs to call a module taken from a ModuleList at a variable index: tensor in, tensor out."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Sequential's argument name)
        pass


class _ResidualStage(nn.Module):
    """Entry convolution (optionally strided) followed by a two-convolution residual branch."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, strides: int) -> None:
        super().__init__()
        self.entry = conv_block(spatial_dims, in_channels, out_channels, strides=strides)
        self.body = nn.Sequential(
            conv_block(spatial_dims, out_channels, out_channels), conv_block(spatial_dims, out_channels, out_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        return x + self.body(x)


class ModalityEncoder(nn.Module):
    """Modality-specific encoder E_m: L residual stages, stage l at 1/2^(l-1) of the input resolution.

    Args:
        spatial_dims: 2 or 3.
        channels: feature width of each level, e.g. ``(8, 16, 32, 64, 128)`` (the mmFormer/PASSION baseline widths).
        in_channels: channels of one modality (1 for MRI).
        gradient_checkpointing: in training, recompute each stage's activations in backward instead of storing them
            (less memory, about one more forward of compute).

    Returns (forward):
        list of L tensors, level l of shape ``(B, channels[l], *spatial / 2^l)``.
    """

    def __init__(
        self, spatial_dims: int, channels: Sequence[int], in_channels: int = 1, gradient_checkpointing: bool = False
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        stages = []
        prev = in_channels
        for level, ch in enumerate(channels):
            stages.append(_ResidualStage(spatial_dims, prev, ch, strides=1 if level == 0 else 2))
            prev = ch
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats: list[torch.Tensor] = []
        if torch.jit.is_scripting():
            for stage in self.stages:
                x = stage(x)
                feats.append(x)
            return feats
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for stage in self.stages:
            x = checkpoint(stage, x, use_reentrant=False) if ckpt else stage(x)
            feats.append(x)
        return feats


class UNetDecoder(nn.Module):
    """U-Net decoder with one segmentation head per level (deep supervision).

    Used twice in DMAF-Net: as the shared uni-modal decoder D_s (fed each modality's own encoder features) and as
    the fusion decoder D_f (fed the fused features f_{n,l} at every level).

    Args:
        spatial_dims: 2 or 3.
        channels: encoder widths, shallow to deep.
        out_channels: number of classes.
        deep_supervision: also return logits of the coarser levels.
        gradient_checkpointing: recompute each decoder stage in backward (training only).

    Returns (forward):
        list of logits ``[z_1, ..., z_L]``, z_l of shape ``(B, out_channels, *spatial_l)`` at the resolution of
        level l (z_1 is the final output); only ``[z_1]`` when ``deep_supervision`` is False or ``heads`` = 1.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: Sequence[int],
        out_channels: int,
        deep_supervision: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        channels = list(channels)
        self.deep_supervision = deep_supervision
        self.gradient_checkpointing = gradient_checkpointing
        self.up_convs = nn.ModuleList(
            [conv_block(spatial_dims, channels[i + 1], channels[i]) for i in range(len(channels) - 1)]
        )
        self.merge = nn.ModuleList(
            [
                nn.Sequential(
                    conv_block(spatial_dims, 2 * channels[i], channels[i]),
                    conv_block(spatial_dims, channels[i], channels[i], kernel_size=1),
                )
                for i in range(len(channels) - 1)
            ]
        )
        n_heads = len(channels) if deep_supervision else 1
        self.heads = nn.ModuleList(
            [Conv[Conv.CONV, spatial_dims](channels[i], out_channels, kernel_size=1) for i in range(n_heads)]
        )
        self.mode = "trilinear" if spatial_dims == 3 else "bilinear"

    def forward(self, feats: list[torch.Tensor], all_levels: bool = True) -> list[torch.Tensor]:
        """
        Args:
            feats: encoder (or fused) features, shallow to deep.
            all_levels: compute the deep-supervision heads too (False at inference: only z_1 is needed).
        """
        if torch.jit.is_scripting():
            return [self._forward_scripted(feats)]
        levels = len(feats)
        want = self.deep_supervision and all_levels
        outputs: list[torch.Tensor] = []
        x = feats[-1]
        if want:
            outputs.append(self.heads[levels - 1](x))
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i in range(levels - 2, -1, -1):
            skip = feats[i]
            x = checkpoint(self._up, i, x, skip, use_reentrant=False) if ckpt else self._up(i, x, skip)
            if want and i > 0:
                outputs.append(self.heads[i](x))
        outputs.append(self.heads[0](x))
        return outputs[::-1]

    def _forward_scripted(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """z_1 alone, as TorchScript compiles it (the inference graph of an export): the stages run deep to shallow,
        indexed through :class:`_TensorModule` (TorchScript indexes a ModuleList by a variable only so), and
        ``merge[i]`` sees the concatenation (eager mode's two partial convolutions: the same sum)."""
        x = feats[-1]
        for i in range(len(feats) - 2, -1, -1):
            skip = feats[i]
            x = F.interpolate(x, size=skip.shape[2:], mode=self.mode, align_corners=False)
            up: _TensorModule = self.up_convs[i]
            merge: _TensorModule = self.merge[i]
            x = merge.forward(torch.cat([up.forward(x), skip], dim=1))
        return self.heads[0](x)

    def _up(self, i: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Decoder stage i: upsample ``x`` to the skip's size, convolve, and merge with the skip; ``merge[i]``'s first
        convolution on ``cat([up, skip])`` runs as two partial convolutions (:func:`conv_of_concat`)."""
        x = F.interpolate(x, size=skip.shape[2:], mode=self.mode, align_corners=False)
        first, second = self.merge[i][0], self.merge[i][1]
        return second(first.adn(self._merge_conv(first.conv, [self.up_convs[i](x), skip])))

    def _merge_conv(self, conv: nn.Module, parts: list[torch.Tensor]) -> torch.Tensor:
        return conv_of_concat(conv, parts)
