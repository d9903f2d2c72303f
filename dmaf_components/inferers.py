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
"""MONAI inferers that give the network the study-level modality mask for every window or slice."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import SliceInferer, SlidingWindowInferer

__all__ = ["study_modality_mask", "ModalitySlidingWindowInferer", "ModalitySliceInferer"]


def study_modality_mask(inputs: torch.Tensor) -> torch.Tensor:
    """bool ``(B, M)``: a modality is present in a study iff its channel has a non-zero voxel anywhere."""
    return torch.as_tensor(inputs).flatten(2).ne(0).any(dim=2)


class ModalitySlidingWindowInferer(SlidingWindowInferer):
    """MONAI ``SlidingWindowInferer`` that passes ``modality_mask`` (the study's, unless given) to every window.

    Without it, the network would derive the mask per window, and a window of background, where every channel is
    zero, would look like a sample with no modality at all. Callers that do not pass the mask (MONAI Label's infer
    task calls ``inferer(inputs, network)``) still get the right behaviour.
    """

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any):
        if kwargs.get("modality_mask") is None:
            kwargs["modality_mask"] = study_modality_mask(inputs)
        return super().__call__(inputs, network, *args, **kwargs)


class ModalitySliceInferer(SliceInferer):
    """MONAI ``SliceInferer`` (2-D network over a 3-D stack) with the study-level ``modality_mask``."""

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any):
        if kwargs.get("modality_mask") is None:
            kwargs["modality_mask"] = study_modality_mask(inputs)
        return super().__call__(inputs, network, *args, **kwargs)
