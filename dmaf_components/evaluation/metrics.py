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
"""Dice and HD95 per region of every evaluated (case, combination) pair, as Ignite metrics whose per-pair values
:class:`~dmaf_components.evaluation.tables.CombinationTables` splits by combination; HD95's rule for an empty region
(the BraTS challenge's 373.13 mm by default) and the per-pair codes that count such pairs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from ignite.metrics.metric import reinit__is_reduced
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler
from monai.metrics import Cumulative, DiceMetric, HausdorffDistanceMetric, compute_hausdorff_distance

__all__ = [
    "RegionDice",
    "BRATS_EMPTY_HD95",
    "EMPTY_NONE",
    "EMPTY_PRED",
    "EMPTY_GT",
    "EMPTY_BOTH",
    "RegionHausdorffDistance",
]


def _spacing(label: Any) -> list[float] | None:
    """Voxel spacing of a channel-first ``(R, *s)`` MetaTensor (from its affine); None for a plain tensor."""
    if not isinstance(label, MetaTensor) or label.is_batch:
        return None
    return [float(v) for v in torch.as_tensor(label.pixdim).flatten()[: label.ndim - 1]]


class _PairMetric(IgniteMetricHandler):
    """An ``IgniteMetricHandler`` that a skipped pair (empty engine output, :func:`skip_absent_combinations`) does
    not reach."""

    def iteration_completed(self, engine: Engine) -> None:
        if isinstance(engine.state.output, list) and not engine.state.output:
            return
        super().iteration_completed(engine)


class RegionDice(_PairMetric):
    """Dice per region of every evaluated (case, combination) pair, as an Ignite metric.

    MONAI ``DiceMetric(include_background=True, ignore_empty=False)``: an empty ground truth with an empty
    prediction counts as 1 (the BraTS convention). ``engine.state.metrics[name]`` is the mean over pairs and
    regions; ``engine.state.metric_details[name]`` is ``(N, R)``, one row per pair in iteration order (rank by rank
    after gathering), which :class:`~dmaf_components.evaluation.tables.CombinationTables` splits by combination.

    Args:
        output_transform: engine output -> ``(y_pred, y)``, lists of ``(R, *s)`` binary region maps, e.g.
            ``from_engine(["pred", "label"])``.
        save_details: keep the per-pair values in ``engine.state.metric_details``.
    """

    def __init__(self, output_transform: Callable = lambda x: x, save_details: bool = True) -> None:
        super().__init__(
            metric_fn=DiceMetric(include_background=True, reduction="mean", ignore_empty=False),
            output_transform=output_transform,
            save_details=save_details,
        )


#: the BraTS challenge's HD95 when exactly one of prediction and ground truth is empty: the diagonal of the
#: 240 x 240 x 155 mm BraTS volume, sqrt(240^2 + 240^2 + 155^2)
BRATS_EMPTY_HD95 = 373.13

#: per-pair codes of :class:`RegionHausdorffDistance`'s ``<name>_empty`` details
EMPTY_NONE, EMPTY_PRED, EMPTY_GT, EMPTY_BOTH = 0, 1, 2, 3


class RegionHausdorffDistance(_PairMetric):
    """Hausdorff distance (95th percentile by default) per region of every evaluated pair, in the label's units.

    The distance is MONAI's ``compute_hausdorff_distance`` (``include_background=True``, undirected: the larger of
    the two directed ``percentile``-th percentiles of the surface distances) with each label's own voxel spacing
    (read from its MetaTensor affine, so millimetres for NIfTI input).

    Where the prediction or the ground truth of a region is empty the distance is undefined. ``empty_distance``
    decides what is scored instead (the BraTS rule by default in ``evaluate.json``):

    - a number, e.g. :data:`BRATS_EMPTY_HD95` (373.13 mm): that value when exactly one side is empty, 0 when both
      are (nothing to find, nothing found);
    - ``"diagonal"``: the diagonal of the label's volume (``sqrt(sum((shape * spacing)^2))``) when exactly one side
      is empty, 0 when both are: the same rule for data without BraTS's fixed grid (MyoPS);
    - None: NaN, left out of every mean (deleting a region then improves its score: use only to compare with
      tools that do so).

    ``engine.state.metrics[name]`` is the mean over pairs and regions of the defined values;
    ``metric_details[name]`` is ``(N, R)`` and ``metric_details[name + "_empty"]`` ``(N, R)`` codes
    (:data:`EMPTY_NONE`, :data:`EMPTY_PRED`, :data:`EMPTY_GT`, :data:`EMPTY_BOTH`), which :class:`CombinationTables`
    counts in every table.

    Args:
        percentile: the percentile of the surface distances (95: HD95).
        empty_distance: the score of a pair with exactly one side empty: a number, ``"diagonal"`` or None (above).
        output_transform: engine output -> ``(y_pred, y)``, lists of ``(R, *s)`` binary region maps.
        save_details: keep the per-pair values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        percentile: float = 95.0,
        empty_distance: float | str | None = BRATS_EMPTY_HD95,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        if not (
            empty_distance is None
            or empty_distance == "diagonal"
            or (
                isinstance(empty_distance, (int, float))
                and not isinstance(empty_distance, bool)
                and math.isfinite(empty_distance)
                and empty_distance >= 0
            )
        ):
            raise ValueError(
                f"empty_distance must be a non-negative number, 'diagonal' or None, got {empty_distance!r}."
            )
        self._empty_codes = Cumulative()  # before the base class, whose constructor resets
        super().__init__(
            metric_fn=HausdorffDistanceMetric(include_background=True, percentile=percentile, reduction="mean"),
            output_transform=output_transform,
            save_details=save_details,
        )
        self.percentile = percentile
        self.empty_distance = empty_distance

    def reset(self) -> None:
        super().reset()
        self._empty_codes.reset()

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        y_pred, y = output
        for p, g in zip(y_pred, y):
            spacing = _spacing(g)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # empty prediction/ground truth: scored by the rule below
                dist = (
                    compute_hausdorff_distance(
                        torch.as_tensor(p)[None],
                        torch.as_tensor(g)[None],
                        include_background=True,
                        percentile=self.percentile,
                        spacing=spacing,
                    )[0]
                    .float()
                    .cpu()
                )
            pred_empty = ~torch.as_tensor(p).reshape(len(p), -1).bool().any(dim=1).cpu()
            gt_empty = ~torch.as_tensor(g).reshape(len(g), -1).bool().any(dim=1).cpu()
            code = pred_empty.long() * EMPTY_PRED + gt_empty.long() * EMPTY_GT
            if self.empty_distance is not None:
                if self.empty_distance == "diagonal":
                    sp = torch.tensor(spacing if spacing is not None else [1.0] * (g.ndim - 1), dtype=torch.float64)
                    extent = torch.tensor(g.shape[1:], dtype=torch.float64) * sp
                    one_empty = float(torch.sqrt((extent**2).sum()))
                else:
                    one_empty = float(self.empty_distance)
                dist = torch.where(code == EMPTY_BOTH, torch.zeros_like(dist), dist)
                dist = torch.where((code == EMPTY_PRED) | (code == EMPTY_GT), torch.full_like(dist, one_empty), dist)
            self.metric_fn.extend(dist[None])
            self._empty_codes.extend(code[None])

    def compute(self) -> Any:
        result = super().compute()
        if self.save_details and self._engine is not None:
            self._engine.state.metric_details[f"{self._name}_empty"] = self._empty_codes.get_buffer()
        return result
