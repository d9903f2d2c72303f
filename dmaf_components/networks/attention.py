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
"""The transformer layer of the DMAF module (paper Eq. 2): MONAI's pre-LN ``TransformerBlock`` whose self-attention
pads narrow heads on the CPU.

PyTorch's CPU flash attention is slow for heads narrower than 16 channels (DMAF's levels have C = 8 ... 128 with up
to 8 heads, so 8-wide heads are common): zero-padding q, k and v to 16 channels gives the same attention (the extra
channels add 0 to every dot product and produce output channels that are dropped; the scale stays 1/sqrt(8)) in
about half the time (docs/performance.md). Parameters and their names are MONAI's, so checkpoints are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import SABlock, TransformerBlock

__all__ = ["PaddedHeadSelfAttention", "DMAFTransformerLayer", "CPU_MIN_HEAD_DIM"]

#: head width that PyTorch's CPU flash attention handles efficiently (vector width of fp32 AVX-512)
CPU_MIN_HEAD_DIM = 16


class PaddedHeadSelfAttention(SABlock):
    """MONAI ``SABlock`` (combined qkv projection, ``scaled_dot_product_attention``) whose heads are zero-padded to
    :data:`CPU_MIN_HEAD_DIM` channels on the CPU when they are narrower. Same parameters, same result.

    Args: as :class:`monai.networks.blocks.SABlock` (``use_flash_attention=True`` and ``use_combined_linear=True``
    are required: this is the path the DMAF module uses); ``pad_heads=False`` gives MONAI's computation as it is
    (the benchmarks' reference).
    """

    def __init__(
        self, hidden_size: int, num_heads: int, dropout_rate: float = 0.0, qkv_bias: bool = False, pad_heads: bool = True
    ) -> None:
        super().__init__(
            hidden_size, num_heads, dropout_rate, qkv_bias=qkv_bias, use_flash_attention=True, use_combined_linear=True
        )
        self.pad_heads = pad_heads

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
            pad = CPU_MIN_HEAD_DIM - d if (self.pad_heads and q.device.type == "cpu" and d < CPU_MIN_HEAD_DIM) else 0
            if pad > 0:
                q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, scale=self.scale, dropout_p=self.dropout_rate if self.training else 0.0
        )
        if out.shape[-1] != d:
            out = out[..., :d]
        return self.drop_output(self.out_proj(self.out_rearrange(out)))


class DMAFTransformerLayer(TransformerBlock):
    """One pre-LN layer of Eq. 2, T'_k = MMHA(LN(T_{k-1}), M_mask) + T_{k-1}, T_k = FFN(LN(T'_k)) + T'_k: MONAI's
    ``TransformerBlock`` (its parameter names, so checkpoints load unchanged) with :class:`PaddedHeadSelfAttention`.

    Args:
        hidden_size: token width C.
        mlp_dim: FFN width.
        num_heads: attention heads.
        dropout_rate: dropout in attention and FFN.
        qkv_bias: bias in the qkv projection.
    """

    def __init__(
        self, hidden_size: int, mlp_dim: int, num_heads: int, dropout_rate: float = 0.0, qkv_bias: bool = False
    ) -> None:
        super().__init__(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias=qkv_bias, use_flash_attention=True)
        self.attn = PaddedHeadSelfAttention(hidden_size, num_heads, dropout_rate, qkv_bias)
