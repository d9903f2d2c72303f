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
"""What a segmentation leaned on: DMAF's per-voxel modality weights a_m (paper Eq. 3) as an inference output.

- :class:`ModalityWeightsNet` wraps a :class:`~dmaf_components.networks.DMAFNet` (``fusion="dmaf"``) without
  changing it: a forward hook on the fusion module(s) reads a_m, and the wrapper returns the logits with the weights
  appended as extra channels, ``(B, K + M, *spatial)``, so that MONAI's sliding-window inferer stitches them like
  the logits (its window blending is a weighted average, so the stitched weights still sum to 1 over the present
  modalities). Its ``state_dict`` is the plain network's: checkpoints are unchanged;
- :class:`SplitModalityWeightsd` splits the extra channels off the prediction (``pred`` keeps K channels);
- :class:`SaveModalityWeightsd` writes the weights as a 4-D NIfTI (one channel per modality, 0 for missing ones) and a
  JSON with the mean weight of each present modality inside each predicted region, next to the segmentation,
  atomically.

Which a_m: the first fusion level's (``level=0``, the default), which DMAF computes at the input's full resolution
and which weights the features of the fusion decoder's last skip connection; ``level="mean"`` averages every level's
weights, each upsampled (tri/bilinear) to full resolution. See ``docs/method.md``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from torch import nn

from .data.constants import DMAFDataError
from .errors import DMAFError, BundleExit, as_bool
from .outputs import _dotted, atomic_write, float_map_saver, output_path

__all__ = [
    "WEIGHTS_POSTFIX",
    "weight_map_outputs",
    "ModalityWeightsNet",
    "modality_weights_network",
    "SplitModalityWeightsd",
    "region_weight_summary",
    "SaveModalityWeightsd",
]

logger = logging.getLogger(__name__)

#: the weight map of study ``case`` is ``<case>_modality_weights.nii.gz``, its summary ``<case>_modality_weights.json``
WEIGHTS_POSTFIX = "modality_weights"


def weight_map_outputs(postfix: str = WEIGHTS_POSTFIX) -> tuple[tuple[str, str], ...]:
    """``(postfix, ext)`` of the files written per study with weight maps on, for
    :func:`~dmaf_components.inference.plan_outputs`."""
    return ((postfix, ".nii.gz"), (postfix, ".json"))


class ModalityWeightsNet(nn.Module):
    """A DMAF network that also returns its per-voxel modality weights a_m as extra output channels.

    Args:
        network: a ``DMAFNet`` with ``fusion="dmaf"`` (its ``fusions`` are ``DMAFFusion`` modules), or an
            :class:`~dmaf_components.uncertainty.UncertaintyNet` around one (its extra channels then come before the
            weights).
        level: the fusion level whose weights are returned (0, the default: full resolution), or ``"mean"``: the
            mean over all levels, each upsampled to the input's size.

    ``forward(x (B, M, *spatial), modality_mask (B, M) | None)`` returns float32 ``(B, K + M, *spatial)``: the
    network's logits, then one weight channel per modality (0 for missing modalities, summing to 1 over the present
    ones).
    The weights are read by a forward hook on the fusion module: ``DMAFFusion.spatial_weights`` is evaluated again
    on the same inputs (one extra DMAF weight computation per hooked level; the network's own forward is untouched);
    when the wrapped module runs the network more than once (test-time flips), the first run's weights are kept.
    Eval mode only. ``state_dict``/``load_state_dict`` are the wrapped network's.
    """

    #: :func:`~dmaf_components.uncertainty.base_network` looks through it
    wraps_network = True

    def __init__(self, network: nn.Module, level: int | str = 0) -> None:
        super().__init__()
        from .uncertainty import base_network

        base = base_network(network)
        if getattr(base, "fusion", None) != "dmaf":
            raise ValueError(
                f"save_weights: modality weights exist only with fusion 'dmaf' (the network uses "
                f"{getattr(base, 'fusion', type(base).__name__)!r})"
            )
        levels = len(base.fusions)
        if level == "mean":
            self.levels = tuple(range(levels))
        elif isinstance(level, int) and not isinstance(level, bool) and 0 <= level < levels:
            self.levels = (level,)
        else:
            raise ValueError(f"weights_level: expected a level 0..{levels - 1} or 'mean', got {level!r}")
        self.level = level
        self.network = network

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:  # type: ignore[override]
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.network.load_state_dict(*args, **kwargs)

    @staticmethod
    def _hook(level: int, store: dict[int, torch.Tensor]):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if level in store:  # the first forward's (an UncertaintyNet computes the unflipped input first)
                return
            feats, mask = args[0], args[1]
            present = args[2] if len(args) > 2 else None
            weights = module.spatial_weights(feats, mask, present)
            if present is not None:  # (B, P, *S) for the present modalities -> (B, M, *S), zero for the missing
                shape = (weights.shape[0], module.num_modalities) + tuple(weights.shape[2:])
                weights = weights.new_zeros(shape).index_copy(1, present, weights)
            store[level] = weights.detach().float()

        return hook

    def forward(self, x: torch.Tensor, modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.network.training:
            raise RuntimeError("ModalityWeightsNet is for inference: call .eval() first")
        from .uncertainty import base_network

        store: dict[int, torch.Tensor] = {}
        fusions = base_network(self.network).fusions
        handles = [fusions[lv].register_forward_hook(self._hook(lv, store)) for lv in self.levels]
        try:
            logits = self.network(x, modality_mask)
        finally:
            for handle in handles:
                handle.remove()
        size = tuple(x.shape[2:])
        mode = "trilinear" if len(size) == 3 else "bilinear"
        maps = [
            w if tuple(w.shape[2:]) == size else F.interpolate(w, size=size, mode=mode, align_corners=False)
            for w in (store[lv] for lv in self.levels)
        ]
        weights = maps[0] if len(maps) == 1 else torch.stack(maps).mean(0)
        # float32 (the logits too, an exact cast under AMP): the sliding-window blend keeps the sum at 1
        return torch.cat([logits.float(), weights], dim=1)


def modality_weights_network(network: nn.Module, enabled: Any = False, level: int | str = 0) -> nn.Module:
    """``network`` itself, or with ``enabled`` (``--save_weights True``) a :class:`ModalityWeightsNet` around it
    (for bundle configs: a misfit ends the run with one line, :class:`~dmaf_components.errors.BundleExit`)."""
    try:
        if not as_bool(enabled, "save_weights"):
            return network
        return ModalityWeightsNet(network, level)
    except (ValueError, DMAFError) as exc:
        raise BundleExit(str(exc)) from None


class SplitModalityWeightsd(MapTransform):
    """Split the weight channels that :class:`ModalityWeightsNet` appends off the prediction.

    ``data[key]`` ``(K + M, *spatial)`` -> ``data[key]`` ``(K, *spatial)`` and ``data[weights_key]``
    ``(M, *spatial)`` (both keep the metadata). A prediction of K channels (weights off, or MONAI Label) passes
    unchanged.

    Args:
        keys: the prediction key(s).
        num_classes: K.
        weights_key: where the weights go.
    """

    def __init__(
        self, keys: KeysCollection, num_classes: int, weights_key: str = "weights", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = int(num_classes)
        self.weights_key = weights_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            if pred.shape[0] > self.num_classes:
                d[self.weights_key] = pred[self.num_classes :]
                d[key] = pred[: self.num_classes]
        return d


def region_weight_summary(
    weights: torch.Tensor,
    label: torch.Tensor,
    regions: Mapping[str, Sequence[int]],
    modalities: Sequence[str],
    present: Sequence[bool] | torch.Tensor,
    label_values: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Mean weight of each present modality inside each predicted region.

    Args:
        weights: ``(M, *spatial)`` a_m.
        label: ``(1, *spatial)`` or ``(*spatial)`` predicted label map, in ``label_values`` (as written) or, when
            ``label_values`` is None, in class indices.
        regions: ``{name: class indices}``, e.g. ``REGIONS["brats"]`` ``{"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}``.
        modalities: the M modality names.
        present: ``(M,)`` which modalities the study has.
        label_values: label value of each class index (BraTS ``[0, 1, 2, 4]``).

    Returns:
        ``{region: {"voxels": n, "mean_weight": {modality: mean a_m over the region, or None when n == 0}}}`` with
        the present modalities only.
    """
    w = torch.as_tensor(weights).float()
    lab = torch.as_tensor(label).reshape(w.shape[1:])
    present = [bool(p) for p in torch.as_tensor(present).reshape(-1).tolist()]
    out: dict[str, dict[str, Any]] = {}
    for name, classes in regions.items():
        values = [int(label_values[c]) if label_values is not None else int(c) for c in classes]
        inside = torch.isin(lab, torch.as_tensor(values, device=lab.device, dtype=lab.dtype))
        n = int(inside.sum())
        means = {
            m: (round(float(w[i][inside].mean()), 6) if n else None) for i, m in enumerate(modalities) if present[i]
        }
        out[name] = {"voxels": n, "mean_weight": means}
    return out


class SaveModalityWeightsd(MapTransform):
    """Write a study's modality weights and their per-region summary next to its segmentation.

    - ``<case>_modality_weights.nii.gz``: ``data[key]`` ``(M, *spatial)`` as a 4-D float32 NIfTI
      ``(*spatial, M)`` on the grid and affine of the image (after ``Invertd``: the input's), channel order
      ``modalities``, a missing modality's channel 0. Outside the region the network saw (``CropForegroundd``'s box)
      every channel is 0;
    - ``<case>_modality_weights.json``: the modalities present and missing, which weights (``level``), and per
      region (``regions``, in class indices) the number of predicted voxels and the mean weight of each present
      modality inside it (:func:`region_weight_summary`).

    Both are written atomically (temporary file in the folder, ``os.replace``); an existing file is kept unless
    ``overwrite``. A sample without ``data[key]`` (weights off, MONAI Label) passes unchanged.

    Args:
        keys: the weights key.
        pred_key: the predicted label map ``(1, *spatial)`` in ``label_values``.
        modalities: the M modality names.
        regions: ``{name: class indices}`` (``dmaf_components.evaluation.REGIONS[dataset]``).
        label_values: label value of each class index.
        output_dir, output_postfix, separate_folder, name_key, overwrite: where and how, as
            :class:`~dmaf_components.outputs.AtomicSaveImaged`.
        mask_key: the study's bool ``(M,)`` modality mask; missing modalities' channels are set to exactly 0.
        segmentation_postfix, segmentation_ext: the segmentation's name, recorded in the JSON.
        level: which weights (recorded in the JSON).
    """

    def __init__(
        self,
        keys: KeysCollection,
        pred_key: str = "pred",
        modalities: Sequence[str] = (),
        regions: Mapping[str, Sequence[int]] | None = None,
        label_values: Sequence[int] | None = None,
        output_dir: str = "./",
        output_postfix: str = WEIGHTS_POSTFIX,
        separate_folder: bool = False,
        name_key: str = "case",
        overwrite: bool = False,
        mask_key: str = "modality_mask",
        segmentation_postfix: str = "seg",
        segmentation_ext: str = ".nii.gz",
        level: int | str = 0,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pred_key = pred_key
        self.modalities = tuple(modalities)
        self.regions = dict(regions or {})
        self.label_values = None if label_values is None else [int(v) for v in label_values]
        self.output_dir = str(output_dir)
        self.output_postfix = output_postfix
        self.separate_folder = as_bool(separate_folder, "separate_folder")
        self.name_key = name_key
        self.overwrite = as_bool(overwrite)
        self.mask_key = mask_key
        self.segmentation_postfix = segmentation_postfix
        self.segmentation_ext = _dotted(segmentation_ext)
        self.level = level
        self._saver = float_map_saver(
            self.keys[0], self.output_dir, self.output_postfix, self.separate_folder, self.name_key, self.overwrite
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            weights = d[key]
            case = str(d.get(self.name_key, "study"))
            m = weights.shape[0]
            if self.modalities and m != len(self.modalities):
                raise DMAFDataError(f"{case}: {m} weight channels, expected {len(self.modalities)} modalities")
            present = d.get(self.mask_key)
            present = (
                torch.ones(m, dtype=torch.bool) if present is None else torch.as_tensor(present).reshape(-1).bool()
            )
            keep = present.to(device=weights.device, dtype=weights.dtype).reshape((-1,) + (1,) * (weights.ndim - 1))
            weights = weights.float() * keep.float()
            if isinstance(d[key], MetaTensor) and not isinstance(weights, MetaTensor):
                weights = MetaTensor(weights, meta=d[key].meta)
            d[key] = weights
            names = self.modalities or tuple(str(i) for i in range(m))
            json_path = output_path(case, self.output_dir, self.output_postfix, ".json", self.separate_folder)
            if not self.overwrite and os.path.lexists(json_path):
                raise DMAFDataError(f"{json_path}: exists already; kept (pass --overwrite true to replace it)")
            summary = {
                "case": case,
                "segmentation": os.path.basename(
                    output_path(
                        case, self.output_dir, self.segmentation_postfix, self.segmentation_ext, self.separate_folder
                    )
                ),
                "weight_map": os.path.basename(
                    output_path(case, self.output_dir, self.output_postfix, ".nii.gz", self.separate_folder)
                ),
                "weights": (
                    "DMAF a_m (Eq. 3): mean of every fusion level's, upsampled to full resolution"
                    if self.level == "mean"
                    else f"DMAF a_m (Eq. 3) of fusion level {self.level}"
                    + (" (full resolution)" if self.level == 0 else ", upsampled to full resolution")
                ),
                "channels": list(names),
                "present": [n for n, p in zip(names, present.tolist()) if p],
                "missing": [n for n, p in zip(names, present.tolist()) if not p],
                "regions": region_weight_summary(
                    weights, d[self.pred_key], self.regions, names, present, self.label_values
                )
                if self.pred_key in d
                else {},
            }
            self._saver({key: weights, self.name_key: case})
            atomic_write(json_path, lambda f: json.dump(summary, f, indent=2), what="the summary")
        return d
