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
"""Label transforms: refusing label values outside a dataset's set, and class indices to region channels."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ..data.image_checks import check_label_values

__all__ = ["CheckLabelValuesd", "LabelToRegionsd", "class_map"]


def class_map(label: torch.Tensor) -> torch.Tensor:
    """A ``(1, *spatial)`` class-index map as it is; a ``(C, *spatial)`` logit/probability map reduced by argmax."""
    return label.argmax(0, keepdim=True) if label.shape[0] > 1 else label


class CheckLabelValuesd(MapTransform):
    """Raise a one-line :class:`~dmaf_components.data.DMAFDataError` when a label holds values outside ``allowed``
    (names the file; :func:`~dmaf_components.data.image_checks.check_label_values`)."""

    def __init__(self, keys: KeysCollection, allowed: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.allowed = torch.as_tensor(sorted(int(v) for v in allowed))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        allowed = self.allowed.tolist()
        for key in self.key_iterator(d):
            check_label_values(getattr(d[key], "meta", {}).get("filename_or_obj", key), d[key], allowed)
        return d


class LabelToRegionsd(MapTransform):
    """Class-index label map ``(1, *spatial)`` -> binary region channels ``(R, *spatial)`` for region metrics.

    Example (BraTS, trained classes 1 NCR, 2 edema, 3 ET): ``{"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}``; MyoPS:
    ``{"LVB": [1], "RVB": [2], "MYO": [3]}``. A key holding logits/probabilities with more than one channel is
    reduced by argmax first.
    """

    def __init__(
        self, keys: KeysCollection, regions: Mapping[str, Sequence[int]], allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.regions = {name: [int(c) for c in classes] for name, classes in regions.items()}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = class_map(d[key])
            channels = [torch.isin(lab[0], torch.as_tensor(c, device=lab.device)) for c in self.regions.values()]
            d[key] = torch.stack(channels).to(torch.float32)
            if isinstance(lab, MetaTensor) and not isinstance(d[key], MetaTensor):
                d[key] = MetaTensor(d[key], meta=lab.meta)
        return d
