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
"""The (case, combination) pairs of an evaluation over every combination of available modalities (paper Table 2).

:class:`CombinationPairs` loads each case once and hands it on once per combination, with the combination's missing
channels zeroed and ``modality_mask`` set; :func:`skip_absent_combinations` leaves out a pair whose case has none of
the combination's modalities; :class:`PairNames` names each pair ``<case>:<combination>``. Also the regions evaluated
per dataset and BraTS's ET post-processing (:class:`SuppressSmallETd`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from monai.config import KeysCollection
from monai.transforms import MapTransform

from ..inferers import study_modality_mask
from ..transforms.label import class_map

__all__ = [
    "REGIONS",
    "check_enough_cases",
    "modality_combinations",
    "combination_name",
    "suppress_small_et",
    "CombinationPairs",
    "skip_absent_combinations",
    "SuppressSmallETd",
    "PairNames",
]

#: evaluation regions in trained class indices (BraTS: 1 NCR, 2 edema, 3 ET; MyoPS: 1 LVB, 2 RVB, 3 MYO)
REGIONS = {
    "brats": {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
    "myops": {"LVB": (1,), "RVB": (2,), "MYO": (3,)},
}


def check_enough_cases(cases: int, world_size: int) -> None:
    """Multi-process evaluation needs a test case per process: a process without one would skip the metric gather
    that the others wait in. One line instead of a hang."""
    if cases < world_size:
        from ..data.constants import DMAFDataError

        raise DMAFDataError(
            f"testing split: {cases} case(s) for {world_size} processes; run with --nproc_per_node={max(cases, 1)} "
            "or fewer (every process needs a case)"
        )


def modality_combinations(num_modalities: int) -> list[tuple[bool, ...]]:
    """All 2^M - 1 non-empty presence patterns: single modalities first, then pairs, ..., then all (Table 2)."""
    patterns = [p for p in itertools.product((False, True), repeat=num_modalities) if any(p)]
    return sorted(patterns, key=lambda p: (sum(p), [not v for v in p]))


def combination_name(pattern: Sequence[bool], modalities: Sequence[str]) -> str:
    return "+".join(m for m, present in zip(modalities, pattern) if present)


def suppress_small_et(label: torch.Tensor, et_class: int = 3, min_voxels: int = 500, replace_with: int = 1):
    """The usual BraTS ET post-processing: a predicted ET smaller than ``min_voxels`` becomes necrosis (class 1)."""
    et = label == et_class
    if 0 < int(et.sum()) < min_voxels:
        label = label.masked_fill(et, replace_with)
    return label


class CombinationPairs:
    """The (case, combination) pairs of an evaluation: each case is loaded once and handed on once per combination.

    Iterating yields, for every case batch of ``dataloader`` and every combination of
    :func:`modality_combinations` in turn, the case's batch with

    - ``image`` ``(1, M, *s)``: the channels outside the combination set to zero;
    - ``modality_mask`` ``(1, M)`` bool: the combination's modalities that the case has (``image_available``, else
      a scan of the channels); all False when the case has none of them, which
      :func:`skip_absent_combinations` leaves out of the metrics;
    - ``combination`` ``(1,)``: the combination's index in :func:`modality_combinations`;
    - ``case_index`` ``(1,)``: the case's index in the dataset (its loader order; under a ``DistributedSampler``,
      the global index, so that the values of all ranks can be put back in loader order).

    It is sized (``len(dataloader) * (2^M - 1)``), so an evaluator and its progress bar know the epoch length.

    Args:
        dataloader: batches of one case each: ``image`` ``(1, M, *s)``, ``label`` ``(1, 1, *s)``, optionally
            ``image_available`` ``(1, M)``. Its sampler (sequential, or ``DistributedSampler`` with
            ``shuffle=False``) must give the same order on every pass.
        num_modalities: M.
        image_key: key of the image.
        mask_key: key the combination's presence mask is written to (the network's ``modality_mask``).
        available_key: key of the case's available modalities, as written by ``LoadModalitiesd``.
    """

    def __init__(
        self,
        dataloader: Iterable,
        num_modalities: int,
        image_key: str = "image",
        mask_key: str = "modality_mask",
        available_key: str = "image_available",
    ) -> None:
        self.dataloader = dataloader
        self.combinations = modality_combinations(num_modalities)
        self.image_key = image_key
        self.mask_key = mask_key
        self.available_key = available_key

    def __len__(self) -> int:
        return len(self.dataloader) * len(self.combinations)  # type: ignore[arg-type]

    def _case_indices(self) -> list[int] | None:
        sampler = getattr(self.dataloader, "sampler", None)
        if sampler is None or getattr(self.dataloader, "batch_size", 1) != 1:
            return None
        return [int(i) for i in sampler]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        indices = self._case_indices()
        for i, batch in enumerate(self.dataloader):
            image = batch[self.image_key]
            if image.shape[0] != 1:
                raise ValueError(f"CombinationPairs needs one case per batch, got a batch of {image.shape[0]}.")
            available = batch.get(self.available_key)
            available = study_modality_mask(image) if available is None else torch.as_tensor(available).bool()
            available = available.reshape(1, -1).to(image.device)
            case = torch.tensor([indices[i] if indices is not None else i])
            for k, combo in enumerate(self.combinations):
                mask = torch.tensor(combo, device=image.device)[None] & available
                pair = dict(batch)
                pair[self.image_key] = image * mask.reshape(1, -1, *([1] * (image.ndim - 2))).to(image.dtype)
                pair[self.mask_key] = mask
                pair["combination"] = torch.tensor([k])
                pair["case_index"] = case
                yield pair


def skip_absent_combinations(engine: Engine, batchdata: dict[str, Any]) -> Any:
    """``iteration_update`` of the evaluator: a pair whose ``modality_mask`` is empty (the case has none of the
    combination's modalities) is not inferred and adds no metric value, as in every earlier release; every other
    pair runs the evaluator's own iteration."""
    mask = batchdata.get("modality_mask") if isinstance(batchdata, Mapping) else None
    if mask is not None and not bool(torch.as_tensor(mask).any()):
        engine.state.batch = []
        return []
    return engine._iteration(engine, batchdata)  # type: ignore[attr-defined]


class SuppressSmallETd(MapTransform):
    """Write the ET post-processed class map of ``key`` to ``key + output_postfix`` (:func:`suppress_small_et`).

    A ``(C, *s)`` logit/probability map is reduced by argmax first; the result is a ``(1, *s)`` class map.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_postfix: str = "_et_postprocessed",
        et_class: int = 3,
        min_voxels: int = 500,
        replace_with: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_postfix = output_postfix
        self.et_class = et_class
        self.min_voxels = min_voxels
        self.replace_with = replace_with

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = class_map(d[key])
            d[f"{key}{self.output_postfix}"] = suppress_small_et(lab, self.et_class, self.min_voxels, self.replace_with)
        return d


class PairNames:
    """``batch_transform`` of MONAI ``MetricsSaver``: names each evaluated pair ``<case>:<combination>``.

    Args:
        modalities: names in channel order.
        case_key: key of the case's name (``dmaf datalist`` writes ``case``); else the image's file name is used.
        combination_key: key of the combination index (:class:`CombinationPairs`).
    """

    def __init__(self, modalities: Sequence[str], case_key: str = "case", combination_key: str = "combination"):
        self.names = [combination_name(c, modalities) for c in modality_combinations(len(modalities))]
        self.case_key = case_key
        self.combination_key = combination_key

    def __call__(self, batch: Any) -> list[dict[str, str]]:
        out = []
        for item in batch if isinstance(batch, list) else []:
            case = item.get(self.case_key)
            if case is None:
                case = os.path.basename(str(getattr(item.get("image"), "meta", {}).get("filename_or_obj", "")))
            out.append({"filename_or_obj": f"{case}:{self.names[int(item[self.combination_key])]}"})
        return out
