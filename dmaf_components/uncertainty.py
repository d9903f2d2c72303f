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
"""Where the model is unsure: per-voxel uncertainty measures of a segmentation.

Four measures, each in [0, 1] (higher = less sure), compared by ``benchmarks/uncertainty_ranking.py``
(docs/accuracy.md, "Where the model is unsure"):

- :func:`margin_uncertainty` (the bundle's default): 1 minus the margin between the two largest fused
  probabilities: it ranks wrong voxels about as well as flips at no extra network pass;
- :func:`normalized_entropy`: the entropy of the fused softmax, divided by log K;
- :func:`modality_probabilities` + :func:`label_disagreement`: how little probability the present modalities' own
  decoders (DMAF-Net's shared uni-modal decoder D_s on each present modality) give the label written, averaged over
  those modalities;
- :func:`flip_probabilities` + :func:`label_disagreement`: the same over the predictions of the input flipped along
  every subset of its spatial axes (test-time augmentation by flips).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from torch import nn

from .data.constants import DMAFDataError
from .errors import DMAFError, BundleExit, as_bool
from .outputs import float_map_saver, output_path

__all__ = [
    "UNCERTAINTY_POSTFIX",
    "UNCERTAINTY_SUMMARY_KEY",
    "UNCERTAINTY_MEASURES",
    "LOGIT_MEASURES",
    "DEFAULT_MEASURE",
    "DEFAULT_THRESHOLDS",
    "normalized_entropy",
    "margin_uncertainty",
    "label_disagreement",
    "modality_probabilities",
    "flip_axes",
    "flip_probabilities",
    "uncertainty_outputs",
    "check_measure",
    "check_threshold",
    "base_network",
    "UncertaintyNet",
    "uncertainty_network",
    "UncertaintyMapd",
    "uncertainty_summary",
    "uncertainty_line",
    "SaveUncertaintyd",
]

#: the uncertainty map of study ``case`` is ``<case>_uncertainty.nii.gz``
UNCERTAINTY_POSTFIX = "uncertainty"
#: the data key :class:`SaveUncertaintyd` puts the study's summary under (read by the report)
UNCERTAINTY_SUMMARY_KEY = "uncertainty_summary"
#: the measures inference can write (``--uncertainty``)
UNCERTAINTY_MEASURES = ("entropy", "margin", "modalities", "flips")
#: the measures computed from the logits alone (no wrapper, no extra network pass)
LOGIT_MEASURES = ("entropy", "margin")
#: the bundle's measure, chosen by ``benchmarks/uncertainty_ranking.py`` (docs/reliability.md)
DEFAULT_MEASURE = "margin"
#: per measure, the value at or above which a voxel is "uncertain" in the report when ``--uncertainty_threshold`` is
#: not given: the smallest of 0.1 ... 0.9 at which at least a third of the voxels flagged were wrong in
#: ``benchmarks/uncertainty_ranking.py`` (study 1, 5 models; entropy never reaches it: its largest, 0.9, 28.5 %)
DEFAULT_THRESHOLDS = {"entropy": 0.9, "margin": 0.8, "modalities": 0.6, "flips": 0.5}


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the class axis, divided by log K.

    Args:
        logits: ``(B, K, *spatial)``, K >= 2.

    Returns:
        float32 ``(B, 1, *spatial)`` in [0, 1]: 0 where one class has all the probability, 1 where all K are equal.
    """
    logits = torch.as_tensor(logits).float()
    k = logits.shape[1]
    logp = torch.log_softmax(logits, dim=1)
    entropy = -(logp.exp() * logp).sum(dim=1, keepdim=True)
    return (entropy / math.log(k)).clamp_(0.0, 1.0)


def margin_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """1 minus the margin between the two largest probabilities of ``softmax(logits)``.

    Args:
        logits: ``(B, K, *spatial)``, K >= 2.

    Returns:
        float32 ``(B, 1, *spatial)`` in [0, 1]: 0 where one class has all the probability, 1 where the two most
        likely classes are tied.
    """
    top2 = torch.softmax(torch.as_tensor(logits).float(), dim=1).topk(2, dim=1).values
    return (1.0 - (top2[:, :1] - top2[:, 1:2])).clamp_(0.0, 1.0)


def label_disagreement(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """1 minus the probability that ``probs`` give the label predicted by ``logits`` (their argmax).

    Args:
        logits: ``(B, K, *spatial)`` the prediction whose label is written.
        probs: ``(B, K, *spatial)`` other opinions, e.g. the mean softmax of the present modalities' decoders.

    Returns:
        float32 ``(B, 1, *spatial)`` in [0, 1].
    """
    label = torch.as_tensor(logits).argmax(dim=1, keepdim=True)
    return (1.0 - torch.as_tensor(probs).float().gather(1, label)).clamp_(0.0, 1.0)


def modality_probabilities(modality_logits: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
    """Mean softmax of the present modalities' uni-modal logits.

    Args:
        modality_logits: ``(B, M, K, *spatial)``, from
            :meth:`~dmaf_components.networks.DMAFNet.forward_with_modality_logits`.
        modality_mask: bool ``(B, M)``, at least one modality present per sample.

    Returns:
        float32 ``(B, K, *spatial)``.
    """
    probs = torch.softmax(torch.as_tensor(modality_logits).float(), dim=2)
    keep = torch.as_tensor(modality_mask, device=probs.device).float()
    weights = keep / keep.sum(dim=1, keepdim=True).clamp_min(1.0)
    return (probs * weights.reshape(weights.shape + (1,) * (probs.ndim - 2))).sum(dim=1)


def flip_axes(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of a ``(B, C, *spatial)`` tensor, identity first (4 in 2-D, 8 in 3-D)."""
    axes = tuple(range(2, 2 + spatial_dims))
    return [c for r in range(spatial_dims + 1) for c in itertools.combinations(axes, r)]


def flip_probabilities(
    network: Any,
    x: torch.Tensor,
    modality_mask: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean softmax of ``network`` over the input flipped along every subset of its spatial axes, flipped back.

    Args:
        network: called as ``network(x_flipped, modality_mask)``, returning ``(B, K, *spatial)`` logits.
        x: ``(B, C, *spatial)``.
        modality_mask: passed on.
        logits: ``network(x, modality_mask)`` when already computed (the unflipped term is not computed again).

    Returns:
        float32 ``(B, K, *spatial)``.
    """
    flips = flip_axes(x.ndim - 2)
    first = network(x, modality_mask) if logits is None else logits
    total = torch.softmax(torch.as_tensor(first).float(), dim=1)
    for dims in flips[1:]:
        out = network(torch.flip(x, dims), modality_mask)
        total = total + torch.flip(torch.softmax(torch.as_tensor(out).float(), dim=1), dims)
    return total / len(flips)


def uncertainty_outputs(postfix: str = UNCERTAINTY_POSTFIX) -> tuple[tuple[str, str], ...]:
    """``(postfix, ext)`` of the file written per study with the uncertainty on, for
    :func:`~dmaf_components.inference.plan_outputs`."""
    return ((postfix, ".nii.gz"),)


def check_measure(measure: Any) -> str:
    """``measure`` in lower case when it is one of :data:`UNCERTAINTY_MEASURES`.

    Raises:
        ValueError: another value (one line naming the choices).
    """
    name = str(measure).strip().lower()
    if name not in UNCERTAINTY_MEASURES:
        raise ValueError(f"uncertainty: expected one of {', '.join(UNCERTAINTY_MEASURES)}, got {measure!r}")
    return name


def check_threshold(threshold: Any, measure: str = DEFAULT_MEASURE) -> float:
    """``threshold`` as a float in (0, 1]; None (or ``"auto"``): the measure's :data:`DEFAULT_THRESHOLDS`.

    Raises:
        ValueError: not a number in (0, 1].
    """
    if threshold is None or (isinstance(threshold, str) and threshold.strip().lower() in ("auto", "none", "null")):
        return DEFAULT_THRESHOLDS[check_measure(measure)]
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise ValueError(f"uncertainty_threshold: expected a number in (0, 1], got {threshold!r}")
    return value


def base_network(network: nn.Module) -> nn.Module:
    """The network inside inference wrappers (:class:`UncertaintyNet`,
    :class:`~dmaf_components.weight_maps.ModalityWeightsNet`): their ``network`` attribute, followed to the end."""
    while isinstance(getattr(network, "network", None), nn.Module) and getattr(network, "wraps_network", False):
        network = network.network
    return network


class UncertaintyNet(nn.Module):
    """A DMAF network that also returns what a measure of :data:`UNCERTAINTY_MEASURES` needs beyond the logits.

    ``entropy`` needs nothing (it is computed from the stitched logits, :class:`UncertaintyMapd`): the network is
    returned as it is by :func:`uncertainty_network`. ``modalities`` appends the mean softmax of the present
    modalities' uni-modal decoders (:meth:`~dmaf_components.networks.DMAFNet.forward_with_modality_logits`), and
    ``flips`` the mean softmax over the input flipped along every subset of its spatial axes
    (:func:`flip_probabilities`, the unflipped prediction computed first). The extra K channels come right after the
    logits, ``(B, 2K, *spatial)`` float32, so that MONAI's sliding-window inferer stitches them like the logits (a
    weighted mean of probabilities is still a probability). Eval mode only; ``state_dict``/``load_state_dict`` are
    the wrapped network's, so checkpoints are unchanged.

    Args:
        network: a :class:`~dmaf_components.networks.DMAFNet`.
        measure: ``modalities`` or ``flips``.
    """

    wraps_network = True

    def __init__(self, network: nn.Module, measure: str) -> None:
        super().__init__()
        measure = check_measure(measure)
        if measure in LOGIT_MEASURES:
            raise ValueError(f"uncertainty {measure!r} needs no wrapper (it is computed from the logits)")
        if measure == "modalities" and not hasattr(network, "forward_with_modality_logits"):
            raise ValueError(
                f"uncertainty 'modalities' needs a DMAFNet (its shared uni-modal decoder), got {type(network).__name__}"
            )
        self.network = network
        self.measure = measure

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:  # type: ignore[override]
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.network.load_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor, modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.network.training:
            raise RuntimeError("UncertaintyNet is for inference: call .eval() first")
        if self.measure == "modalities":
            pred = self.network.forward_with_modality_logits(x, modality_mask)
            logits, probs = pred.logits, modality_probabilities(pred.modality_logits, pred.modality_mask)
        else:
            logits = self.network(x, modality_mask)
            probs = flip_probabilities(self.network, x, modality_mask, logits=logits)
        return torch.cat([logits.float(), probs], dim=1)


def uncertainty_network(network: nn.Module, enabled: Any = False, measure: str = DEFAULT_MEASURE) -> nn.Module:
    """``network`` itself, or with ``enabled`` (``--save_uncertainty True``) and a measure that needs more than the
    logits an :class:`UncertaintyNet` around it (for bundle configs: a misfit ends the run with one line,
    :class:`~dmaf_components.errors.BundleExit`)."""
    try:
        if not as_bool(enabled, "save_uncertainty") or check_measure(measure) in LOGIT_MEASURES:
            return network
        return UncertaintyNet(network, measure)
    except (ValueError, DMAFError) as exc:
        raise BundleExit(str(exc)) from None


class UncertaintyMapd(MapTransform):
    """The per-voxel uncertainty of a prediction, from the network's stitched output (placed first in
    postprocessing).

    ``data[key]`` holds the logits ``(K, *spatial)``, for ``modalities`` and ``flips`` followed by the K channels of
    :class:`UncertaintyNet` (then anything else, e.g. the modality weights). ``data[uncertainty_key]`` gets
    ``(1, *spatial)`` float32 in [0, 1] with the prediction's metadata (``Invertd`` brings it to the input grid),
    and the extra K channels are removed from ``data[key]``. With ``enabled`` off (the bundle's default) every sample
    passes unchanged.

    Args:
        keys: the prediction key.
        enabled: ``--save_uncertainty``.
        measure: one of :data:`UNCERTAINTY_MEASURES`.
        num_classes: K.
        uncertainty_key: where the map goes.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        enabled: Any = False,
        measure: str = DEFAULT_MEASURE,
        num_classes: int = 2,
        uncertainty_key: str = "uncertainty",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.enabled = as_bool(enabled, "save_uncertainty")
        self.measure = check_measure(measure) if self.enabled else str(measure)  # run_inference checks it first
        self.num_classes = int(num_classes)
        self.uncertainty_key = uncertainty_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self.enabled:
            return d
        k = self.num_classes
        for key in self.key_iterator(d):
            pred = d[key]
            plain = pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)
            if self.measure == "entropy":
                u = normalized_entropy(plain[None, :k])[0]
            elif self.measure == "margin":
                u = margin_uncertainty(plain[None, :k])[0]
            else:
                if plain.shape[0] < 2 * k:
                    raise DMAFDataError(
                        f"uncertainty {self.measure!r}: the prediction has {plain.shape[0]} "
                        f"channels, expected at least {2 * k} (logits and {k} probabilities)"
                    )
                u = label_disagreement(plain[None, :k], plain[None, k : 2 * k])[0]
                rest = torch.cat([plain[:k], plain[2 * k :]], dim=0)
                d[key] = (
                    MetaTensor(rest, meta=pred.meta, applied_operations=pred.applied_operations)
                    if isinstance(pred, MetaTensor)
                    else rest
                )
            if isinstance(pred, MetaTensor):
                u = MetaTensor(u, meta=pred.meta, applied_operations=pred.applied_operations)
            d[self.uncertainty_key] = u
        return d


def uncertainty_summary(
    uncertainty: Any,
    label: Any,
    affine: Any,
    regions: Mapping[str, Sequence[int]],
    threshold: float,
    label_values: Sequence[int] | None = None,
    measure: str = DEFAULT_MEASURE,
) -> dict[str, Any]:
    """The uncertain voxels of one study, per predicted region (the report's ``uncertainty`` entry).

    Args:
        uncertainty: ``(1, *spatial)`` or ``(*spatial)`` map in [0, 1] on the label's grid.
        label: the predicted label map on the same grid, in ``label_values`` (class indices when None).
        affine: ``(4, 4)`` voxel-to-world affine of the grid (mm); a voxel's volume is ``|det(affine[:3, :3])|``.
        regions: ``{name: class indices}`` (``dmaf_components.evaluation.REGIONS[dataset]``).
        threshold: a voxel is uncertain when its value is at least ``threshold``.
        label_values: label value of each class index.
        measure: recorded.

    Returns:
        ``{"measure", "threshold", "voxel_volume_mm3", "uncertain": {"voxels", "volume_mm3"}, "regions": {name:
        {"voxels", "volume_mm3", "uncertain_voxels", "uncertain_volume_mm3", "uncertain_fraction",
        "mean_uncertainty"}}, "background": {"uncertain_voxels", "uncertain_volume_mm3"}}``: ``regions`` count the
        predicted region's voxels (fraction and mean None when it is empty); ``background`` the uncertain voxels
        predicted as background (where a missed structure would show); volumes in mm³, rounded to 1e-3.
    """
    u = torch.as_tensor(uncertainty).as_subclass(torch.Tensor).float().reshape(-1)
    lab = torch.as_tensor(label).as_subclass(torch.Tensor).reshape(-1).to(u.device)
    if u.numel() != lab.numel():
        raise ValueError(f"uncertainty map of {u.numel()} voxels, label map of {lab.numel()}")
    a = np.asarray(torch.as_tensor(affine).cpu().numpy() if isinstance(affine, torch.Tensor) else affine, np.float64)
    voxel = float(abs(np.linalg.det(a[:3, :3])))
    uncertain = u >= float(threshold)

    def volume(n: int) -> float:
        return round(n * voxel, 3)

    out_regions: dict[str, Any] = {}
    foreground = torch.zeros_like(uncertain)
    for name, classes in regions.items():
        values = [int(label_values[c]) if label_values is not None else int(c) for c in classes]
        inside = torch.isin(lab, torch.as_tensor(values, device=lab.device, dtype=lab.dtype))
        foreground |= inside
        n, nu = int(inside.sum()), int((inside & uncertain).sum())
        out_regions[name] = {
            "voxels": n,
            "volume_mm3": volume(n),
            "uncertain_voxels": nu,
            "uncertain_volume_mm3": volume(nu),
            "uncertain_fraction": round(nu / n, 6) if n else None,
            "mean_uncertainty": round(float(u[inside].mean()), 6) if n else None,
        }
    total, outside = int(uncertain.sum()), int((uncertain & ~foreground).sum())
    return {
        "measure": measure,
        "threshold": float(threshold),
        "voxel_volume_mm3": round(voxel, 6),
        "uncertain": {"voxels": total, "volume_mm3": volume(total)},
        "regions": out_regions,
        "background": {"uncertain_voxels": outside, "uncertain_volume_mm3": volume(outside)},
    }


def uncertainty_line(case: str, summary: Mapping[str, Any], target: str) -> str:
    """The log line of one study's uncertainty."""
    regions = ", ".join(f"{name} {r['uncertain_voxels']}/{r['voxels']}" for name, r in summary["regions"].items())
    return (
        f"study {case} uncertainty ({summary['measure']} >= {summary['threshold']:g}): "
        f"{summary['uncertain']['voxels']} voxels, {summary['uncertain']['volume_mm3']:.1f} mm³ "
        f"(uncertain/predicted: {regions}; background {summary['background']['uncertain_voxels']}) -> {target}"
    )


class SaveUncertaintyd(MapTransform):
    """Write a study's uncertainty map next to its label map and summarise it for the report.

    - ``<case>_uncertainty.nii.gz``: ``data[key]`` ``(1, *spatial)`` as a float32 NIfTI on the grid and affine of
      the image (after ``Invertd``: the input's), written atomically
      (:class:`~dmaf_components.outputs.AtomicSaveImaged`; an existing file is kept unless ``overwrite``). Outside
      the region the network saw (the foreground box or the centre crop) the map is 0;
    - ``data[summary_key]``: :func:`uncertainty_summary` against the label map ``data[pred_key]`` (in
      ``label_values``), which :class:`~dmaf_components.inference.StudyEvaluator` puts in ``<case>_report.json``
      and logs in one line.

    A sample without ``data[key]`` (uncertainty off, MONAI Label) passes unchanged.

    Args:
        keys: the uncertainty key.
        pred_key: the predicted label map ``(1, *spatial)``.
        regions, label_values, threshold, measure: as :func:`uncertainty_summary`.
        save_map: write the map (``--save_uncertainty_map``; off for a server such as MONAI Label, whose response
            carries the summary only, :class:`~dmaf_components.quality.StudyReportd`).
        output_dir, output_postfix, separate_folder, name_key, overwrite: where and how, as
            :class:`~dmaf_components.outputs.AtomicSaveImaged`.
        summary_key: where the summary goes.
    """

    def __init__(
        self,
        keys: KeysCollection = "uncertainty",
        pred_key: str = "pred",
        regions: Mapping[str, Sequence[int]] | None = None,
        label_values: Sequence[int] | None = None,
        threshold: Any = None,
        measure: str = DEFAULT_MEASURE,
        save_map: Any = True,
        output_dir: str = "./",
        output_postfix: str = UNCERTAINTY_POSTFIX,
        separate_folder: Any = False,
        name_key: str = "case",
        overwrite: Any = False,
        summary_key: str = UNCERTAINTY_SUMMARY_KEY,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pred_key = pred_key
        self.regions = dict(regions or {})
        self.label_values = None if label_values is None else [int(v) for v in label_values]
        self.threshold, self.measure = threshold, measure  # checked at the first study (run_inference checks first)
        self.save_map = as_bool(save_map, "save_uncertainty_map")
        self.output_dir = str(output_dir)
        self.output_postfix = str(output_postfix)
        self.separate_folder = as_bool(separate_folder, "separate_folder")
        self.name_key = name_key
        self.overwrite = as_bool(overwrite)
        self.summary_key = summary_key
        self._saver = float_map_saver(
            self.keys[0], self.output_dir, self.output_postfix, self.separate_folder, self.name_key, self.overwrite
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            case = str(d.get(self.name_key, "study"))
            u = d[key]
            u = u.float().clamp(0.0, 1.0) if isinstance(u, torch.Tensor) else torch.as_tensor(u).float()
            if isinstance(d[key], MetaTensor) and not isinstance(u, MetaTensor):
                u = MetaTensor(u, meta=d[key].meta)
            d[key] = u
            if self.save_map:
                self._saver({key: u, self.name_key: case})
            pred = d[self.pred_key]
            affine = pred.affine if isinstance(pred, MetaTensor) else getattr(u, "affine", np.eye(4))
            measure = check_measure(self.measure)
            summary = uncertainty_summary(
                u, pred, affine, self.regions, check_threshold(self.threshold, measure), self.label_values, measure
            )
            summary["map"] = (
                os.path.basename(
                    output_path(case, self.output_dir, self.output_postfix, ".nii.gz", self.separate_folder)
                )
                if self.save_map
                else None
            )
            d[self.summary_key] = summary
        return d
