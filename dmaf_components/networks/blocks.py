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

from collections import OrderedDict
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
    "is_channels_last",
    "set_channels_last",
]

_NORM = ("instance", {"affine": True})
_ACT = ("leakyrelu", {"negative_slope": 0.2, "inplace": True})


def _cl_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if x.ndim == 5 else torch.channels_last


def _cl(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last layout, no copy when it already is. Size-1 dimensions (batch 1, one channel) can carry
    any stride in a contiguous tensor, and oneDNN then answers channels-first: they get the canonical strides."""
    x = x.contiguous(memory_format=_cl_format(x))
    if x.ndim < 4:
        return x
    c, spatial = x.shape[1], x.shape[2:]
    strides = [c] * len(spatial)
    for i in range(len(spatial) - 2, -1, -1):
        strides[i] = strides[i + 1] * spatial[i + 1]
    canonical = (strides[0] * spatial[0], 1, *strides)
    return x if x.stride() == canonical else x.as_strided(x.shape, canonical, x.storage_offset())


def _register_flop_formula() -> None:
    """Let ``torch.utils.flop_counter.FlopCounterMode`` count the oneDNN convolution this module calls directly (it
    knows ``aten.convolution`` only), so that FLOP counts of the network stay right."""
    from torch.utils import flop_counter

    op = torch.ops.aten.mkldnn_convolution
    if op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _mkldnn_conv_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


_register_flop_formula()


def is_channels_last(x: torch.Tensor) -> bool:
    """True when ``x`` is stored channels-last and not (also) channels-first."""
    if x.ndim not in (4, 5) or x.is_contiguous():
        return False
    return x.is_contiguous(memory_format=_cl_format(x))


class _ChannelsLastConvFunction(torch.autograd.Function):
    """oneDNN convolution of ``x`` in channels-last layout; the output stays channels-last.

    The input is converted only if it is not channels-last already (in DMAF-Net only the one-channel modality
    inputs, where the conversion is free), and what is saved for backward is ``x`` as given. oneDNN is called
    directly: PyTorch's own choice sends batch-1 convolutions with N*C*D*H <= 20480 (the coarse levels) to a slower
    im2col path that also returns channels-first. Backward goes through ``aten.convolution_backward``, made to choose
    oneDNN for those shapes too (see there).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conf = (bias is not None, stride, padding, dilation, groups)
        if torch.is_autocast_enabled("cpu"):  # a custom function is outside autocast's table: cast as F.conv would
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if x.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            # (bf16 under autocast: PyTorch picks oneDNN itself where the CPU supports it)
            conv = F.conv3d if x.ndim == 5 else F.conv2d
            return _cl(conv(_cl(x), weight, bias, stride, padding, dilation, groups))
        return torch.ops.aten.mkldnn_convolution(
            _cl(x), weight.contiguous(), bias, list(padding), list(stride), list(dilation), groups
        )

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        has_bias, stride, padding, dilation, groups = ctx.conf
        dtype = grad.dtype  # under autocast the forward ran in lower precision: backward in the same dtype
        grad, xc = _cl(grad), _cl(x.to(dtype))
        # PyTorch runs the backward of a batch-1 fp32 convolution with N*C*D*H <= 20480 on its im2col path, 2-9x
        # slower here than oneDNN (at 64^3 patches: 16 channels at 32^3, and every coarser level; the one-channel
        # stems). A zero second sample makes it choose oneDNN, and adds nothing to the weight and bias gradients.
        pad = xc.dtype == torch.float32 and xc.shape[0] == 1 and xc.shape[1] * xc.shape[2] * xc.shape[3] <= 20480
        pad = pad and torch.backends.mkldnn.is_available()
        if pad:
            grad, xc = torch.cat([grad, torch.zeros_like(grad)]), torch.cat([xc, torch.zeros_like(xc)])
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, xc, weight.to(dtype), [weight.shape[0]] if has_bias else None, stride, padding,
            dilation, False, [0] * len(stride), groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]],
        )
        if pad and gx is not None:
            gx = gx[:1]
        gx = gx.to(x.dtype) if gx is not None else None
        gw = gw.to(weight.dtype) if gw is not None else None
        gb = gb.to(weight.dtype) if gb is not None else None
        return gx, gw, gb, None, None, None, None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A channels-last ``(B, C, *spatial)`` tensor as ``(B, n, C)`` rows (a view)."""
    return x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])


#: rows per block of :func:`_channel_dot`'s matmuls: one matmul over a whole 128^3 volume (2M rows) accumulated with an
#: error of 1.5e-3 relative on this CPU's BLAS (0.08 logits at the network's output); blocks of 4096 rows summed in
#: float64 agree with a float64 reference to ~5e-7
_DOT_BLOCK = 4096


def _channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-(sample, channel) dot product over the spatial axes of two channels-last tensors, ``(B, C)``.

    Diagonals of small batched matmuls over blocks of :data:`_DOT_BLOCK` rows (reading each tensor once, where an
    elementwise product and a sum would write and re-read a temporary), the block sums added in float64.
    """
    ra, rb = _rows(a), _rows(b)
    n = ra.shape[1]
    k = n // _DOT_BLOCK
    out = []
    for i in range(ra.shape[0]):
        xa, xb = ra[i], rb[i]  # (n, C) each, contiguous
        total = torch.zeros(xa.shape[1], dtype=torch.float64, device=xa.device)
        if k:
            blocks_a = xa[: k * _DOT_BLOCK].view(k, _DOT_BLOCK, -1)
            blocks_b = xb[: k * _DOT_BLOCK].view(k, _DOT_BLOCK, -1)
            total += torch.bmm(blocks_a.transpose(1, 2), blocks_b).diagonal(dim1=1, dim2=2).double().sum(0)
        if n > k * _DOT_BLOCK:
            total += (xa[k * _DOT_BLOCK :].T @ xb[k * _DOT_BLOCK :]).diagonal().double()
        out.append(total)
    return torch.stack(out).to(a.dtype)


class _InstanceNormActFunction(torch.autograd.Function):
    """Instance norm + LeakyReLU in one autograd node, for channels-last fp32 tensors on CPU.

    PyTorch's CPU batch norm (which instance norm calls) is exact and fast only channels-first: on channels-last input
    its statistics of a constant window are off (variance ~1e-6 instead of 0, i.e. outputs off by ~0.2 after the
    1/sqrt(eps) gain) and its backward is 6x slower. Here the variance is computed about a first estimate of the mean
    (d = x - mean_0; var = E[d^2] - E[d]^2, which has no cancellation because E[d] ~ 0, and gives a constant window
    exactly 0), and the normalisation is one ``addcmul`` into d's memory, so the layout is kept.

    Backward needs the normalised input x_hat. It is recovered from the output y, which the next convolution keeps for
    its own backward anyway: the pre-activation is y with the negative part divided by the slope, and
    x_hat = (pre - bias) / weight. The node then keeps no tensor of its own, where MONAI's ADN kept its input (one
    activation-sized tensor per block: ~0.9 GB at 128^3). Dividing by the weight turns rounding of ``pre`` (~1e-7
    relative) into an x_hat error of ~1e-7 / |weight|, so a channel with |weight| < 1e-2 (or a slope <= 0) makes the
    node keep ``x`` and recompute x_hat from it instead.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, slope):  # type: ignore[override]
        dims = tuple(range(2, x.ndim))
        n = x[0, 0].numel()
        shape = (1, -1) + (1,) * len(dims)
        mean0 = x.mean(dims, keepdim=True)
        d = x - mean0
        mean_d = d.sum(dims, keepdim=True) / n
        var = (_channel_dot(d, d).reshape(mean_d.shape) / n - mean_d * mean_d).clamp_min(0)
        rstd = torch.rsqrt(var + eps)
        scale = rstd * weight.reshape(shape)
        y = torch.addcmul(bias.reshape(shape) - mean_d * scale, d, scale, out=d)
        F.leaky_relu(y, slope, inplace=True)
        ctx.from_output = slope > 0 and bool(weight.detach().abs().min() >= 1e-2)
        if ctx.from_output:
            ctx.save_for_backward(y, rstd, weight, bias)
        else:
            ctx.save_for_backward(x, mean0 + mean_d, rstd, weight, bias)
        ctx.slope = slope
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = _cl(grad)
        if ctx.from_output:
            y, rstd, weight, bias = ctx.saved_tensors
            shape = (1, -1) + (1,) * (y.ndim - 2)
            g = torch.ops.aten.leaky_relu_backward(grad, y, ctx.slope, True)
            xhat = F.leaky_relu(y, 1.0 / ctx.slope)  # the pre-activation ...
            inv_w = 1.0 / weight.reshape(shape)
            torch.addcmul(-bias.reshape(shape) * inv_w, xhat, inv_w, out=xhat)  # ... normalised: x_hat
        else:
            x, mean, rstd, weight, bias = ctx.saved_tensors
            shape = (1, -1) + (1,) * (x.ndim - 2)
            xhat = torch.addcmul(-mean * rstd, x, rstd)
            g = torch.addcmul(bias.reshape(shape), xhat, weight.reshape(shape))  # the pre-activation ...
            torch.ops.aten.leaky_relu_backward.grad_input(grad, g, ctx.slope, False, grad_input=g)  # ... its grad
        n = xhat[0, 0].numel()
        sum_g = _rows(g).sum(1).reshape(rstd.shape)
        sum_gx = _channel_dot(g, xhat).reshape(rstd.shape)
        scale = rstd * weight.reshape(shape)
        # dx = scale * (g - mean(g) - xhat * mean(g * xhat)), written into xhat's memory
        gx = torch.addcmul(-scale * sum_g / n, xhat, -scale * sum_gx / n, out=xhat).addcmul_(g, scale)
        gw = sum_gx.sum(0).flatten() if ctx.needs_input_grad[1] else None
        gb = sum_g.sum(0).flatten() if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


class _NormAct(nn.Sequential):
    """MONAI's ADN (children ``N`` instance norm, ``A`` LeakyReLU: the same parameter names) that runs both as one
    :class:`_InstanceNormActFunction` on channels-last fp32 CPU input, and as MONAI's modules otherwise.

    Other channels-last CPU input (bf16 under CPU autocast) is normalised channels-first, where PyTorch's kernel is
    exact on constant windows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if torch.jit.is_scripting() or torch.jit.is_tracing():  # an exported graph records MONAI's modules
            return self.A(self.N(x))
        norm, act = self.N, self.A
        if x.device.type == "cpu" and is_channels_last(x):
            if x.dtype == torch.float32:
                return _InstanceNormActFunction.apply(x, norm.weight, norm.bias, norm.eps, act.negative_slope)
            x = x.contiguous()
        return act(norm(x))


class _ChannelsLastConv:
    """Convolution computed by oneDNN in channels-last layout, result returned channels-last.

    oneDNN's CPU convolutions with the 8-16 channels of the full-resolution levels are 2-5x faster (forward and
    backward) on channels-last (NDHWC) tensors than on NCDHW ones. The layout is kept from one convolution to the next:
    instance norm + LeakyReLU run fused on it (:class:`_NormAct`), and residual additions, interpolation and the
    fusions keep it, so after the one-channel modality inputs no layout copy is made. docs/performance.md has the
    measurements.

    ``channels_last``: None (default) = on CPU only (cuDNN chooses its own layouts); True/False forces it.
    Parameters are those of the ``nn.ConvNd`` it extends, so state dicts are unchanged. TorchScript (scripted or
    traced) records the plain convolution.
    """

    # bool or None; not annotated: TorchScript reads class annotations unevaluated and knows no ``bool | None``
    channels_last = None

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: bool = True) -> torch.Tensor:
        """
        Args:
            x: ``(B, C_in, *spatial)``.
            weight: optional replacement of ``self.weight``, e.g. a slice of its input channels.
            bias: add ``self.bias`` (False: e.g. for all but one of several partial convolutions that are summed).
        """
        w = self.weight if weight is None else weight  # type: ignore[attr-defined]
        b = self.bias if bias else None  # type: ignore[attr-defined]
        if torch.jit.is_scripting() or torch.jit.is_tracing():  # (an export records the plain convolution)
            return self._conv_forward(x, w, b)  # type: ignore[attr-defined]
        use = x.device.type == "cpu" if self.channels_last is None else self.channels_last
        if not use:
            return self._conv_forward(x, w, b)  # type: ignore[attr-defined]
        return _ChannelsLastConvFunction.apply(
            x, w, b, self.stride, self.padding, self.dilation, self.groups  # type: ignore[attr-defined]
        )

    def forward_split(self, parts: list[torch.Tensor], weight: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution of ``torch.cat(parts, dim=1)`` without building the concatenation: the sum of each part's
        convolution with its slice of the weight's input channels (bias added once). Saves the memory of the
        concatenated tensor, which autograd would keep until backward.

        Args:
            parts: ``(B, C_i, *spatial)`` tensors, in the order of the weight's input channels.
            weight: optional replacement of ``self.weight`` (with ``sum(C_i)`` input channels).
        """
        w = self.weight if weight is None else weight  # type: ignore[attr-defined]
        c = parts[0].shape[1]
        out = self.forward(parts[0], weight=w[:, :c], bias=True)
        start = c
        for part in parts[1:]:
            c = part.shape[1]
            out = out + self.forward(part, weight=w[:, start : start + c], bias=False)
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
    block.adn = _NormAct(OrderedDict(block.adn.named_children()))  # same modules and keys, fused on channels-last
    return block


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
            [channels_last_conv(spatial_dims, channels[i], out_channels) for i in range(n_heads)]
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
        """z_1 alone, as TorchScript compiles it (the inference graph of an export). The stages run deep to shallow,
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
        x = F.interpolate(x, size=skip.shape[2:], mode=self.mode, align_corners=False)
        merge = self.merge[i]
        # merge[0] on cat([up, skip]): computed as two partial convolutions, so the concatenation is never stored
        y = merge[0].adn(merge[0].conv.forward_split([self.up_convs[i](x), skip]))
        return merge[1](y)
