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
"""DMAF-Net networks."""

from __future__ import annotations

from .blocks import ModalityEncoder, UNetDecoder
from .compiled import compile_network, compiled_network, compiled_parts
from .cpu_kernels import apply_cpu_kernels, cpu_kernels_applied
from .dmafnet import FUSIONS, DMAFNet, DMAFNetOutput, DMAFNetPrediction
from .fusion import ConcatFusion, DMAFFusion, MeanFusion, masked_softmax, tokens_to_grid, grid_to_tokens

__all__ = [
    "DMAFNet",
    "DMAFNetOutput",
    "DMAFNetPrediction",
    "FUSIONS",
    "DMAFFusion",
    "MeanFusion",
    "ConcatFusion",
    "ModalityEncoder",
    "UNetDecoder",
    "apply_cpu_kernels",
    "cpu_kernels_applied",
    "compile_network",
    "compiled_network",
    "compiled_parts",
    "masked_softmax",
    "grid_to_tokens",
    "tokens_to_grid",
]
