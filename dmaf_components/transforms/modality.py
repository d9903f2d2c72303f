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
"""Modality transforms: which modalities a training or inference sample shows."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

from ..data.constants import DMAFDataError
from ..inferers import study_modality_mask
from .io import AVAILABLE_POSTFIX

__all__ = ["ModalityDropd"]


class ModalityDropd(RandomizableTransform, MapTransform):
    """Decide which modalities a sample shows, zero the others and write the bool ``(M,)`` ``modality_mask``.

    A modality is shown only if it is available (its file exists and is not all zero, ``image_available`` from
    :class:`~dmaf_components.transforms.LoadModalitiesd`, else the channel is checked) and:

    - ``mode="idt"``: the case's persistent presence vector ``data[mask_key]`` from the datalist allows it (imperfect
      data training; a case without one keeps all available modalities);
    - ``mode="pdt"``: it belongs to the combination drawn for this call, uniformly among the 2^M - 1 non-empty ones
      (perfect data training); a draw disjoint from the available modalities is drawn again;
    - ``mode="none"``: always (evaluation and inference: what is there is used).

    Place it last in the chain, after intensity augmentation, so that dropped channels are exactly zero.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mode: str = "idt",
        mask_key: str = "modality_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if mode not in ("idt", "pdt", "none"):
            raise ValueError(f"ModalityDropd mode must be idt, pdt or none, got {mode!r}.")
        self.mode = mode
        self.mask_key = mask_key

    def _draw(self, available: torch.Tensor) -> torch.Tensor:
        m = available.numel()
        patterns = [p for p in itertools.product((False, True), repeat=m) if any(p)]
        while True:
            choice = torch.tensor(patterns[self.R.randint(len(patterns))])
            if (choice & available).any():
                return choice & available

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            available = d.get(f"{key}{AVAILABLE_POSTFIX}")
            if available is None:
                available = study_modality_mask(torch.as_tensor(img)[None])[0]
            available = torch.as_tensor(available).bool().cpu()
            mask = available.clone()
            if self.mode == "idt" and d.get(self.mask_key) is not None:
                persistent = torch.as_tensor(d[self.mask_key]).bool().flatten().cpu()
                if persistent.numel() != available.numel():
                    raise DMAFDataError(
                        f"{d.get('case', key)}: modality_mask has {persistent.numel()} entries, "
                        f"expected {available.numel()}"
                    )
                mask = available & persistent
            elif self.mode == "pdt" and available.any():
                mask = self._draw(available)
            if not mask.any():
                raise DMAFDataError(f"{d.get('case', key)}: no modality present (all files missing or all zero)")
            shape = (-1,) + (1,) * (img.ndim - 1)
            d[key] = img * mask.to(device=img.device, dtype=img.dtype).reshape(shape)
            d[self.mask_key] = mask
        return d
