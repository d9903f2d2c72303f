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
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ChannelsLastConv2d",
    "ChannelsLastConv3d",
    "ModalityEncoder",
    "UNetDecoder",
    "channels_last_conv",
    "conv_block",
    "set_channels_last",
]

_NORM = ("instance", {"affine": True})
_ACT = ("leakyrelu", {"negative_slope": 0.2, "inplace": True})


def _cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)


class _ChannelsLastConvFunction(torch.autograd.Function):
    """Convolution on a channels-last copy of ``x``, output channels-first; saves ``x`` itself (not the copy).

    Autograd would otherwise keep the channels-last copy of every convolution input alive until backward, beside the
    channels-first original that the preceding activation already keeps: one more activation-sized tensor per
    convolution. Backward re-makes the copy instead (a memory copy, cheap next to the convolution).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):  # type: ignore[override]
        conv = F.conv3d if x.ndim == 5 else F.conv2d
        ctx.save_for_backward(x, weight)
        ctx.conf = (bias is not None, stride, padding, dilation, groups)
        return conv(_cl(x), weight, bias, stride, padding, dilation, groups).contiguous()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        has_bias, stride, padding, dilation, groups = ctx.conf
        dtype = grad.dtype  # under autocast the forward ran in lower precision: backward in the same dtype
        gx, gw, gb = torch.ops.aten.convolution_backward(
            _cl(grad), _cl(x.to(dtype)), weight.to(dtype), [weight.shape[0]] if has_bias else None, stride, padding,
            dilation, False, [0] * len(stride), groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]],
        )
        gx = gx.contiguous().to(x.dtype) if gx is not None else None
        gw = gw.to(weight.dtype) if gw is not None else None
        gb = gb.to(weight.dtype) if gb is not None else None
        return gx, gw, gb, None, None, None, None


class _ChannelsLastConv:
    """Convolution computed on a channels-last copy of its input, result returned channels-first.

    oneDNN's CPU convolutions with the 8-16 channels of the full-resolution levels are 2-5x faster (forward and
    backward) on channels-last (NDHWC) tensors than on NCDHW ones. Everything around the convolutions (instance norm,
    whose CPU kernel computes the statistics of a constant input, e.g. a background window, exactly and batch
    independently, interpolation, concatenation) stays channels-first; the layout copies cost a few percent of what
    the convolution saves, and no extra memory (:class:`_ChannelsLastConvFunction`). docs/performance.md has the
    measurements.

    ``channels_last``: None (default) = on CPU only (cuDNN chooses its own layouts); True/False forces it.
    Parameters are those of the ``nn.ConvNd`` it extends, so state dicts are unchanged.
    """

    channels_last: bool | None = None

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: bool = True) -> torch.Tensor:
        """
        Args:
            x: ``(B, C_in, *spatial)``.
            weight: optional replacement of ``self.weight``, e.g. a slice of its input channels.
            bias: add ``self.bias`` (False: e.g. for all but one of several partial convolutions that are summed).
        """
        w = self.weight if weight is None else weight  # type: ignore[attr-defined]
        b = self.bias if bias else None  # type: ignore[attr-defined]
        use = x.device.type == "cpu" if self.channels_last is None else self.channels_last
        if not use or torch.jit.is_tracing():  # (a traced export records the plain convolution)
            return self._conv_forward(x, w, b)  # type: ignore[attr-defined]
        return _ChannelsLastConvFunction.apply(
            x, w, b, self.stride, self.padding, self.dilation, self.groups  # type: ignore[attr-defined]
        )

    def forward_split(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The convolution of ``torch.cat(parts, dim=1)`` without building the concatenation: the sum of each part's
        convolution with its slice of the weight's input channels (bias added once). Saves the memory of the
        concatenated tensor, which autograd would keep until backward."""
        out = None
        start = 0
        for i, part in enumerate(parts):
            c = part.shape[1]
            y = self(part, weight=self.weight[:, start : start + c], bias=i == 0)  # type: ignore[attr-defined]
            out = y if out is None else out + y
            start += c
        return out


class ChannelsLastConv3d(_ChannelsLastConv, nn.Conv3d):
    """``nn.Conv3d`` run channels-last on CPU (see :class:`_ChannelsLastConv`)."""


class ChannelsLastConv2d(_ChannelsLastConv, nn.Conv2d):
    """``nn.Conv2d`` run channels-last on CPU (see :class:`_ChannelsLastConv`)."""


def channels_last_conv(
    spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 1, strides: int = 1
) -> nn.Module:
    """A ``ChannelsLastConv{2,3}d`` with 'same' padding (odd ``kernel_size``; with stride s: ceil(n / s) outputs)."""
    cls = ChannelsLastConv3d if spatial_dims == 3 else ChannelsLastConv2d
    return cls(in_channels, out_channels, kernel_size=kernel_size, stride=strides, padding=kernel_size // 2)


def set_channels_last(module: nn.Module, channels_last: bool | None) -> None:
    """Set the layout policy of every channels-last convolution in ``module`` (None: CPU only)."""
    for m in module.modules():
        if isinstance(m, _ChannelsLastConv):
            m.channels_last = channels_last


def conv_block(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3, strides: int = 1) -> nn.Module:
    """Convolution -> instance norm -> LeakyReLU(0.2), the unit used throughout (as in the mmFormer/PASSION baselines).

    MONAI's ``Convolution`` (parameter names ``conv``, ``adn.N``), its convolution computed channels-last on CPU.
    """
    block = Convolution(
        spatial_dims, in_channels, out_channels, strides=strides, kernel_size=kernel_size, norm=_NORM, act=_ACT
    )
    # replaces MONAI's plain convolution in place (same key and position, same shape and default initialisation)
    block.conv = channels_last_conv(spatial_dims, in_channels, out_channels, kernel_size, strides)
    return block


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
        feats = []
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
            [channels_last_conv(spatial_dims, channels[i], out_channels) for i in range(n_heads)]
        )
        self.mode = "trilinear" if spatial_dims == 3 else "bilinear"

    def forward(self, feats: Sequence[torch.Tensor], all_levels: bool = True) -> list[torch.Tensor]:
        """
        Args:
            feats: encoder (or fused) features, shallow to deep.
            all_levels: compute the deep-supervision heads too (False at inference: only z_1 is needed).
        """
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

    def _up(self, i: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode=self.mode, align_corners=False)
        merge = self.merge[i]
        # merge[0] on cat([up, skip]): computed as two partial convolutions, so the concatenation is never stored
        y = merge[0].adn(merge[0].conv.forward_split([self.up_convs[i](x), skip]))
        return merge[1](y)
