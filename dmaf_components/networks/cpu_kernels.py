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
"""CPU kernels of DMAF-Net, kept apart from the network and applied by one call, :func:`apply_cpu_kernels`.

The network (``blocks.py``, ``fusion.py``, ``dmafnet.py``) is built from plain MONAI/PyTorch modules. On a CPU some of
them are several times slower than they need to be, so :func:`apply_cpu_kernels` (called by ``DMAFNet`` unless
``channels_last=False``) re-classes them in place into the subclasses below. A re-classed module has the same
parameters, buffers and names (checkpoints are unchanged) and computes the same function (tests pin each within float
tolerance); on a non-CPU tensor, and in an exported (scripted or traced) graph, it runs its parent's forward.

=====================================  ==================================================================
piece (option of apply_cpu_kernels)    what it does
=====================================  ==================================================================
``convolutions``                       ``nn.Conv{2,3}d`` in channels-last layout through oneDNN
``norm``                               MONAI ADN (instance norm + LeakyReLU) as one fused autograd node
``split_concat``                       the decoder merges' and concat fusion's partial convolutions too
``padded_heads``                       DMAF self-attention heads narrower than 16 zero-padded to 16
=====================================  ==================================================================

docs/performance.md ("CPU kernels") has what each piece buys in time and memory (``benchmarks/cpu_kernels_ab.py``).

Private PyTorch behaviour: the convolution piece calls ``aten.mkldnn_convolution`` directly, and pads a zero second
sample into the backward of small batch-1 3-D convolutions, because PyTorch's own dispatch sends batch-1 3-D
convolutions with N*C*D*H <= 20480 to a slower im2col path that also answers channels-first (2-D channels-last ones
stay on oneDNN at any size). Both rely on how PyTorch behaves, so they
are used only on the PyTorch versions in :data:`PRIVATE_OPS_TESTED`; on any other version the pieces use public
operations only (``F.conv*d`` on channels-last tensors and autograd's backward: the same results, slower on the
coarse levels), and ``tests/test_cpu_kernels.py`` fails when PyTorch stops behaving as described here.

One concept in one module (about 550 lines): the four pieces share the layout helpers and the private-operation
check, and :func:`apply_cpu_kernels` / :func:`remove_cpu_kernels` are the one place that swaps them in and out.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from monai.networks.blocks import ADN, SABlock
from torch import nn

from .blocks import UNetDecoder, conv_of_concat
from .fusion import ConcatFusion

__all__ = [
    "PRIVATE_OPS_TESTED",
    "apply_cpu_kernels",
    "cpu_kernels_applied",
    "is_channels_last",
    "private_ops_supported",
    "remove_cpu_kernels",
    "to_channels_last",
]

#: PyTorch versions (major, minor) on which the private-op parts were measured and tested
PRIVATE_OPS_TESTED = ((2, 13),)
#: PyTorch's own batch-1 threshold (N*C*D*H) below which a CPU convolution leaves oneDNN (aten/src/ATen/native/
#: Convolution.cpp, "use_mkldnn"): copied, so that the backward trick below applies exactly where it helps
ONEDNN_BATCH1_THRESHOLD = 20480
#: head width that PyTorch's CPU flash attention handles efficiently (vector width of fp32 AVX-512)
CPU_MIN_HEAD_DIM = 16
#: rows per block of :func:`_channel_dot`'s matmuls: one matmul over a whole 128^3 volume (2M rows) accumulated an error
#: of 1.5e-3 relative on this CPU's BLAS (0.08 logits at the network's output); blocks of 4096 rows summed in float64
#: agree with a float64 reference to ~5e-7
_DOT_BLOCK = 4096


def private_ops_supported() -> bool:
    """True on the PyTorch versions the private-op tricks were measured and tested on (:data:`PRIVATE_OPS_TESTED`),
    with oneDNN available."""
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return version in PRIVATE_OPS_TESTED and torch.backends.mkldnn.is_available()


# ----------------------------------------------------------------------------------------------- layout helpers
def _cl_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if x.ndim == 5 else torch.channels_last


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
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


def is_channels_last(x: torch.Tensor) -> bool:
    """True when ``x`` is stored channels-last and not (also) channels-first."""
    if x.ndim not in (4, 5) or x.is_contiguous():
        return False
    return x.is_contiguous(memory_format=_cl_format(x))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A channels-last ``(B, C, *spatial)`` tensor as ``(B, n, C)`` rows (a view)."""
    return x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])


def _on_cpu(x: torch.Tensor) -> bool:
    """The kernels act: eager mode (not an export) and a CPU tensor."""
    return not (torch.jit.is_scripting() or torch.jit.is_tracing()) and x.device.type == "cpu"


# ------------------------------------------------------------------------------------------------- convolution
_flop_formula_registered = False


def _register_flop_formula() -> None:
    """Let ``torch.utils.flop_counter.FlopCounterMode`` count the oneDNN convolution called directly here (it knows
    ``aten.convolution`` only), so that FLOP counts of an accelerated network stay right."""
    global _flop_formula_registered
    if _flop_formula_registered:
        return
    from torch.utils import flop_counter

    op = torch.ops.aten.mkldnn_convolution
    if op not in flop_counter.flop_registry and op.default not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(op)
        def _mkldnn_conv_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    _flop_formula_registered = True


class _OneDNNConvFunction(torch.autograd.Function):
    """oneDNN convolution of ``x`` in channels-last layout; the output stays channels-last (private ops: used only
    where :func:`private_ops_supported`).

    The input is converted only if it is not channels-last already (in DMAF-Net only the one-channel modality inputs,
    where the conversion is free), and what is saved for backward is ``x`` as given. Backward goes through
    ``aten.convolution_backward``; for batch-1 fp32 3-D shapes under :data:`ONEDNN_BATCH1_THRESHOLD` (PyTorch would take
    its im2col path, 2-9x slower here) a zero second sample makes it choose oneDNN and adds nothing to the weight and
    bias gradients (``pad_backward``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, pad_backward):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conf = (bias is not None, stride, padding, dilation, groups, pad_backward)
        if torch.is_autocast_enabled("cpu"):  # a custom function is outside autocast's table: cast as F.conv would
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if x.dtype != torch.float32:  # (bf16 under autocast: PyTorch picks oneDNN itself where the CPU supports it)
            conv = F.conv3d if x.ndim == 5 else F.conv2d
            return to_channels_last(conv(to_channels_last(x), weight, bias, stride, padding, dilation, groups))
        return torch.ops.aten.mkldnn_convolution(
            to_channels_last(x), weight.contiguous(), bias, list(padding), list(stride), list(dilation), groups
        )

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        has_bias, stride, padding, dilation, groups, pad_backward = ctx.conf
        dtype = grad.dtype  # under autocast the forward ran in lower precision: backward in the same dtype
        grad, xc = to_channels_last(grad), to_channels_last(x.to(dtype))
        # 3-D only: PyTorch keeps channels-last 2-D convolutions on oneDNN at any size
        pad = pad_backward and xc.ndim == 5 and xc.dtype == torch.float32 and xc.shape[0] == 1
        pad = pad and xc.shape[1] * xc.shape[2] * xc.shape[3] <= ONEDNN_BATCH1_THRESHOLD
        if pad:
            grad, xc = torch.cat([grad, torch.zeros_like(grad)]), torch.cat([xc, torch.zeros_like(xc)])
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad,
            xc,
            weight.to(dtype),
            [weight.shape[0]] if has_bias else None,
            stride,
            padding,
            dilation,
            False,
            [0] * len(stride),
            groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]],
        )
        if pad and gx is not None:
            gx = gx[:1]
        gx = gx.to(x.dtype) if gx is not None else None
        gw = gw.to(weight.dtype) if gw is not None else None
        gb = gb.to(weight.dtype) if gb is not None else None
        return gx, gw, gb, None, None, None, None, None


class _CPUConv:
    """Mixin of the re-classed ``nn.Conv{2,3}d``: on CPU the convolution runs channels-last (oneDNN's CPU convolutions
    with the 8-16 channels of the full-resolution levels are 2-5x faster, forward and backward, on that layout) and
    the result stays channels-last, so that the layout is kept from one convolution to the next."""

    #: private ops (direct oneDNN call, padded batch-1 backward); set by :func:`apply_cpu_kernels`
    use_private_ops = False
    pad_backward = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or torch.jit.is_tracing():  # an exported graph records the plain convolution
            return self._conv_forward(x, self.weight, self.bias)  # type: ignore[attr-defined]
        return self.conv_cpu(x, self.weight, self.bias)  # type: ignore[attr-defined]

    def conv_cpu(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The convolution of ``x`` with ``weight`` and ``bias`` (which may differ from the module's own)."""
        if not _on_cpu(x):
            return self._conv_forward(x, weight, bias)  # type: ignore[attr-defined]
        if self.use_private_ops:
            return _OneDNNConvFunction.apply(
                x,
                weight,
                bias,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,  # type: ignore[attr-defined]
                self.pad_backward,
            )
        return to_channels_last(self._conv_forward(to_channels_last(x), weight, bias))  # type: ignore[attr-defined]

    def forward_split(self, parts: list[torch.Tensor], weight: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution of ``torch.cat(parts, dim=1)`` without building the concatenation: the sum of each part's
        convolution with its slice of the weight's input channels (bias added once). Saves the memory of the
        concatenated tensor, which autograd would keep until backward.

        Args:
            parts: ``(B, C_i, *spatial)`` tensors, in the order of the weight's input channels.
            weight: optional replacement of ``self.weight`` (with ``sum(C_i)`` input channels).
        """
        return conv_of_concat(self, parts, weight, conv_fn=self.conv_cpu)  # type: ignore[arg-type]


class CPUConv3d(_CPUConv, nn.Conv3d):
    """``nn.Conv3d`` re-classed by :func:`apply_cpu_kernels` (see :class:`_CPUConv`)."""


class CPUConv2d(_CPUConv, nn.Conv2d):
    """``nn.Conv2d`` re-classed by :func:`apply_cpu_kernels` (see :class:`_CPUConv`)."""


# ------------------------------------------------------------------------------------- instance norm + LeakyReLU
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


def _leaky_relu_grad(
    grad: torch.Tensor, at: torch.Tensor, slope: float, private: bool, is_result: bool
) -> torch.Tensor:
    """The gradient through LeakyReLU(``slope``) at its input, or (``is_result``) its output ``at`` (the same sign
    for a slope > 0). With private ops: ATen's own kernel, written into ``at``'s memory unless ``is_result``."""
    if private:
        if is_result:
            return torch.ops.aten.leaky_relu_backward(grad, at, slope, True)
        return torch.ops.aten.leaky_relu_backward.grad_input(grad, at, slope, False, grad_input=at)
    return torch.where(at > 0, grad, grad * slope)


class _InstanceNormActFunction(torch.autograd.Function):
    """Instance norm + LeakyReLU in one autograd node, for channels-last fp32 tensors on CPU.

    PyTorch's CPU batch norm (which instance norm calls) is exact and fast only channels-first: on channels-last input
    its statistics of a constant window are off (variance ~1e-6 instead of 0, i.e. outputs off by ~0.2 after the
    1/sqrt(eps) gain) and its backward is 6x slower. Here the variance is computed about a first estimate of the mean
    (d = x - mean_0; var = E[d^2] - E[d]^2, which has no cancellation because E[d] ~ 0, and gives a constant window
    exactly 0), and the normalisation is one ``addcmul`` into d's memory, so the layout is kept.

    Backward needs the normalised input x_hat. It is recovered from the output y, which the next convolution keeps for
    its own backward anyway: the pre-activation is y with the negative part divided by the slope, and
    x_hat = (pre - bias) / weight. The node then keeps no tensor of its own, where MONAI's ADN keeps its input (one
    activation-sized tensor per block: ~0.9 GB at 128^3). Dividing by the weight turns rounding of ``pre`` (~1e-7
    relative) into an x_hat error of ~1e-7 / |weight|, so a channel with |weight| < 1e-2 (or a slope <= 0) makes the
    node keep ``x`` and recompute x_hat from it instead.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, slope, private):  # type: ignore[override]
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
        ctx.slope, ctx.private = slope, private
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = to_channels_last(grad)
        if ctx.from_output:
            y, rstd, weight, bias = ctx.saved_tensors
            shape = (1, -1) + (1,) * (y.ndim - 2)
            g = _leaky_relu_grad(grad, y, ctx.slope, ctx.private, is_result=True)
            xhat = F.leaky_relu(y, 1.0 / ctx.slope)  # the pre-activation ...
            inv_w = 1.0 / weight.reshape(shape)
            torch.addcmul(-bias.reshape(shape) * inv_w, xhat, inv_w, out=xhat)  # ... normalised: x_hat
        else:
            x, mean, rstd, weight, bias = ctx.saved_tensors
            shape = (1, -1) + (1,) * (x.ndim - 2)
            xhat = torch.addcmul(-mean * rstd, x, rstd)
            pre = torch.addcmul(bias.reshape(shape), xhat, weight.reshape(shape))  # the pre-activation ...
            g = _leaky_relu_grad(grad, pre, ctx.slope, ctx.private, is_result=False)  # ... its gradient
        n = xhat[0, 0].numel()
        sum_g = _rows(g).sum(1).reshape(rstd.shape)
        sum_gx = _channel_dot(g, xhat).reshape(rstd.shape)
        scale = rstd * weight.reshape(shape)
        # dx = scale * (g - mean(g) - xhat * mean(g * xhat)), written into xhat's memory
        gx = torch.addcmul(-scale * sum_g / n, xhat, -scale * sum_gx / n, out=xhat).addcmul_(g, scale)
        gw = sum_gx.sum(0).flatten() if ctx.needs_input_grad[1] else None
        gb = sum_g.sum(0).flatten() if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None


class CPUNormAct(ADN):
    """MONAI's ADN with children ``N`` (affine instance norm) and ``A`` (LeakyReLU), re-classed by
    :func:`apply_cpu_kernels`: on channels-last fp32 CPU input both run as one :class:`_InstanceNormActFunction`.

    Other channels-last CPU input (bf16 under CPU autocast) is normalised channels-first, where PyTorch's kernel is
    exact on constant windows."""

    use_private_ops = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if torch.jit.is_scripting() or torch.jit.is_tracing():  # an exported graph records MONAI's modules
            return self.A(self.N(x))
        norm, act = self.N, self.A
        if x.device.type == "cpu" and is_channels_last(x):
            if x.dtype == torch.float32:
                return _InstanceNormActFunction.apply(
                    x, norm.weight, norm.bias, norm.eps, act.negative_slope, self.use_private_ops
                )
            x = x.contiguous()
        return act(norm(x))


# ------------------------------------------------------------------------------------- concatenation-free merges
class CPUUNetDecoder(UNetDecoder):
    """:class:`UNetDecoder` whose partial merge convolutions (on ``cat([up, skip])``) run through the re-classed
    convolution's CPU kernel (:meth:`_CPUConv.forward_split`) on CPU tensors."""

    def _merge_conv(self, conv: nn.Module, parts: list[torch.Tensor]) -> torch.Tensor:
        if isinstance(conv, _CPUConv) and parts[0].device.type == "cpu":
            return conv.forward_split(parts)
        return super()._merge_conv(conv, parts)


class CPUConcatFusion(ConcatFusion):
    """:class:`ConcatFusion` whose per-modality partial convolutions run through the re-classed convolution's CPU
    kernel on CPU tensors."""

    def _proj_of_concat(self, parts: list[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        if isinstance(self.proj, _CPUConv) and parts[0].device.type == "cpu":
            return self.proj.forward_split(parts, weight=weight)
        return super()._proj_of_concat(parts, weight)


# --------------------------------------------------------------------------------------------- attention heads
class CPUPaddedHeadAttention(SABlock):
    """MONAI ``SABlock`` (combined qkv projection, ``scaled_dot_product_attention``) re-classed by
    :func:`apply_cpu_kernels`: on the CPU, heads narrower than :data:`CPU_MIN_HEAD_DIM` are zero-padded to it.

    PyTorch's CPU flash attention is slow for narrow heads (DMAF's levels have C = 8 ... 128 with up to 8 heads, so
    8-wide heads are common): the extra channels add 0 to every dot product and produce output channels that are
    dropped, the scale stays 1/sqrt(d), so the attention is the same, in about half the time.
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: ``(B, N, C)`` tokens.
            attn_mask: optional boolean mask broadcastable to ``(B, heads, N, N)`` (True = may be attended).

        Returns:
            ``(B, N, C)``.
        """
        qkv = self.input_rearrange(self.qkv(x))  # (3, B, heads, N, d)
        q, k, v = qkv[0], qkv[1], qkv[2]
        d = q.shape[-1]
        if not (torch.jit.is_scripting() or torch.jit.is_tracing()):  # (an exported graph keeps the heads as they are)
            if x.device.type == "cpu" and d < CPU_MIN_HEAD_DIM:
                q, k, v = (F.pad(t, (0, CPU_MIN_HEAD_DIM - d)) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, scale=self.scale, dropout_p=self.dropout_rate, is_causal=self.causal
        )  # (as MONAI's SABlock: its dropout_p applies in eval too; DMAF's default dropout is 0)
        if out.shape[-1] != d:
            out = out[..., :d]
        return self.drop_output(self.out_proj(self.out_rearrange(out)))


def _paddable(block: SABlock) -> bool:
    """The SABlock configuration :class:`CPUPaddedHeadAttention` reproduces: combined qkv, flash attention, output
    projection, no causal mask, no relative positions, no attention dtype, no saved attention."""
    # (getattr: a MONAI version without one of these options is left alone)
    return (
        getattr(block, "use_combined_linear", False)
        and getattr(block, "use_flash_attention", False)
        and getattr(block, "include_fc", False)
        and not getattr(block, "causal", True)
        and getattr(block, "rel_positional_embedding", 0) is None
        and getattr(block, "attention_dtype", 0) is None
        and not getattr(block, "save_attn", True)
    )


# -------------------------------------------------------------------------------------------------- the one call
def _reclass(module: nn.Module, cls: type) -> None:
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} does not extend {type(module).__name__}.")
    module.__class__ = cls


def apply_cpu_kernels(
    net: nn.Module,
    convolutions: bool = True,
    norm: bool = True,
    split_concat: bool = True,
    padded_heads: bool = True,
    private_ops: bool | None = None,
    pad_backward: bool = True,
) -> nn.Module:
    """Re-class the modules of ``net`` in place into their CPU-kernel subclasses (same parameters and names, same
    function; each acts on CPU tensors only and falls back to its parent's forward elsewhere). Every convolution is
    included, the DMAF modules' token convolutions too. Calling it again reconfigures (the pieces not asked for are
    given their plain classes back).

    Args:
        net: a DMAF-Net (or any module built from the same blocks).
        convolutions: ``nn.Conv2d``/``nn.Conv3d`` -> :class:`CPUConv2d`/:class:`CPUConv3d` (channels-last layout).
        norm: MONAI ``ADN`` made of an affine instance norm and a LeakyReLU -> :class:`CPUNormAct` (needs
            ``convolutions``: it fuses on channels-last tensors only).
        split_concat: :class:`UNetDecoder` -> :class:`CPUUNetDecoder`, :class:`ConcatFusion` ->
            :class:`CPUConcatFusion`: their partial convolutions (on ``cat([up, skip])`` and on the present
            modalities) through the CPU convolution too (needs ``convolutions``).
        padded_heads: MONAI ``SABlock`` -> :class:`CPUPaddedHeadAttention`.
        private_ops: use the private-op parts (direct oneDNN convolution, padded batch-1 backward, ATen LeakyReLU
            backward); None (default): where :func:`private_ops_supported`. True on an untested PyTorch warns.
        pad_backward: with private ops, the zero second sample in small batch-1 convolution backwards.

    Returns:
        ``net`` itself.
    """
    if private_ops is None:
        private_ops = private_ops_supported()
    elif private_ops and not private_ops_supported():
        warnings.warn(
            f"CPU kernels: private ops forced on PyTorch {torch.__version__}, which they were not tested "
            f"on (tested: {PRIVATE_OPS_TESTED}).",
            stacklevel=2,
        )
    if private_ops:
        _register_flop_formula()
    remove_cpu_kernels(net)  # a second call reconfigures: every module starts from its plain class
    for module in net.modules():
        if convolutions and type(module) in (nn.Conv2d, nn.Conv3d):
            _reclass(module, CPUConv3d if isinstance(module, nn.Conv3d) else CPUConv2d)
            module.use_private_ops, module.pad_backward = private_ops, pad_backward
        elif norm and convolutions and type(module) is ADN and _fusable(module):
            _reclass(module, CPUNormAct)
            module.use_private_ops = private_ops
        elif split_concat and convolutions and type(module) is UNetDecoder:
            _reclass(module, CPUUNetDecoder)
        elif split_concat and convolutions and type(module) is ConcatFusion:
            _reclass(module, CPUConcatFusion)
        elif padded_heads and type(module) is SABlock and _paddable(module):
            _reclass(module, CPUPaddedHeadAttention)
    return net


def _fusable(adn: ADN) -> bool:
    """An ADN that is exactly an affine instance norm followed by a LeakyReLU."""
    children = list(adn.named_children())
    if [name for name, _ in children] != ["N", "A"]:
        return False
    n, a = adn.N, adn.A
    return (
        isinstance(n, (nn.InstanceNorm2d, nn.InstanceNorm3d))
        and n.affine
        and not n.track_running_stats
        and isinstance(a, nn.LeakyReLU)
    )


def remove_cpu_kernels(net: nn.Module) -> nn.Module:
    """Give every re-classed module of ``net`` its plain class back (in place; parameters untouched); returns
    ``net``."""
    plain = {
        CPUConv3d: nn.Conv3d,
        CPUConv2d: nn.Conv2d,
        CPUNormAct: ADN,
        CPUUNetDecoder: UNetDecoder,
        CPUConcatFusion: ConcatFusion,
        CPUPaddedHeadAttention: SABlock,
    }
    for module in net.modules():
        if type(module) in plain:
            module.__class__ = plain[type(module)]
            for attr in ("use_private_ops", "pad_backward"):
                module.__dict__.pop(attr, None)
    return net


def cpu_kernels_applied(net: nn.Module) -> dict[str, int]:
    """How many modules of ``net`` run each CPU kernel (an empty count: the plain network)."""
    kinds = {
        "convolutions": _CPUConv,
        "norm": CPUNormAct,
        "split_concat": (CPUUNetDecoder, CPUConcatFusion),
        "padded_heads": CPUPaddedHeadAttention,
    }
    return {k: sum(isinstance(m, cls) for m in net.modules()) for k, cls in kinds.items()}
