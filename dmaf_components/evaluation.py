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
"""Evaluation over every combination of available modalities (paper Table 2): Dice and HD95 per region.

The evaluation is a MONAI ``SupervisedEvaluator`` (``bundle/configs/evaluate.json``) whose data are (case,
combination) pairs: :class:`CombinationPairs` loads each case once and hands it on once per combination with the
combination's missing channels zeroed and ``modality_mask`` set. Postprocessing maps prediction and label to
region channels (:class:`~dmaf_components.transforms.LabelToRegionsd`, BraTS also after :class:`SuppressSmallETd`),
:class:`RegionDice` / :class:`RegionHausdorffDistance` keep every pair's value per region, and
:class:`CombinationTables` turns them into the Table-2-shaped CSV/JSON/PNG (rank 0 writes; the values of all ranks
are gathered first, so multi-GPU evaluation writes the same table).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics.metric import reinit__is_reduced
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler
from monai.metrics import Cumulative, DiceMetric, HausdorffDistanceMetric, compute_hausdorff_distance
from monai.transforms import MapTransform
from monai.utils import evenly_divisible_all_gather

from .inferers import study_modality_mask
from .transforms.label import class_map

__all__ = [
    "REGIONS",
    "check_enough_cases",
    "modality_combinations",
    "combination_name",
    "suppress_small_et",
    "format_table",
    "CombinationPairs",
    "skip_absent_combinations",
    "SuppressSmallETd",
    "RegionDice",
    "BRATS_EMPTY_HD95",
    "RegionHausdorffDistance",
    "PairNames",
    "summarize",
    "write_evaluation",
    "CombinationTables",
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
        from .data.constants import DMAFDataError

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


def format_table(rows: Sequence[dict], regions: Sequence[str], title: str) -> str:
    """The evaluation table as text: one row per combination, Dice and HD95 per region and their averages."""
    head = f"{'combination':<24}" + "".join(f"{'DSC ' + r:>9}" for r in regions) + f"{'DSC avg':>9}"
    head += "".join(f"{'HD95 ' + r:>10}" for r in regions) + f"{'HD95 avg':>10}"
    lines = [title, head, "-" * len(head)]
    for row in rows:
        line = f"{row['combination']:<24}" + "".join(f"{row['dice_' + r]:9.2f}" for r in regions)
        line += f"{row['dice_avg']:9.2f}" + "".join(f"{row['hd95_' + r]:10.2f}" for r in regions)
        lines.append(line + f"{row['hd95_avg']:10.2f}")
    return "\n".join(lines)


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
    after gathering), which :class:`CombinationTables` splits by combination.

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


def _table(buffers: Mapping[str, tuple[torch.Tensor, ...]], regions: Sequence[str]) -> list[dict]:
    """Rows of one variant: per combination the mean Dice in % (NaN-mean over cases) and the mean of the defined
    HD95 values per region, the count of undefined ones and, where the empty codes of
    :class:`RegionHausdorffDistance` are given, the pairs with exactly one side empty (``_one_empty``) and with
    both empty (``_both_empty``); the averages over regions; then the "Avg." row (counts summed)."""
    rows = []
    for name, (d, h, *rest) in buffers.items():
        e = rest[0] if rest else None
        row: dict[str, Any] = {"combination": name}
        for r, region in enumerate(regions):
            row[f"dice_{region}"] = float(d[:, r].nanmean()) * 100 if len(d) else math.nan
            finite = h[:, r][torch.isfinite(h[:, r])] if len(h) else h
            row[f"hd95_{region}"] = float(finite.mean()) if len(finite) else math.nan
            row[f"hd95_{region}_undefined"] = int(len(h) - len(finite))
            if e is not None:
                codes = e[:, r] if len(e) else e
                row[f"hd95_{region}_one_empty"] = int(((codes == EMPTY_PRED) | (codes == EMPTY_GT)).sum())
                row[f"hd95_{region}_both_empty"] = int((codes == EMPTY_BOTH).sum())
        row["dice_avg"] = float(np.nanmean([row[f"dice_{r}"] for r in regions]))
        row["hd95_avg"] = float(np.nanmean([row[f"hd95_{r}"] for r in regions]))
        rows.append(row)
    avg: dict[str, Any] = {"combination": "Avg."}
    for key in rows[0]:
        if key != "combination":
            vals = [r[key] for r in rows]
            avg[key] = int(sum(vals)) if key.endswith(("undefined", "empty")) else float(np.nanmean(vals))
    rows.append(avg)
    return rows


def summarize(
    pair_ids: torch.Tensor,
    values: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]],
    modalities: Sequence[str],
    regions: Sequence[str],
) -> dict[str, Any]:
    """The evaluation result from per-pair values.

    Args:
        pair_ids: ``(N, 2)`` long, the case index and the combination index of each row.
        values: per variant (``raw``, ``et_postprocessed``), the Dice ``(N, R)`` in [0, 1] and the HD95 ``(N, R)``
            (NaN/inf where undefined) of each row, optionally followed by the ``(N, R)`` empty codes of
            :class:`RegionHausdorffDistance`; None when no pair was evaluated.
        modalities: names in channel order.
        regions: region names in channel order.

    Returns:
        ``{"cases", "modalities", "regions", "tables": {variant: rows}, "per_case": {variant: {combination:
        {"dice": (cases, R) in %, "hd95": (cases, R) with NaN where undefined, "empty": (cases, R) codes when
        given}}}}``, rows of each combination in case (loader) order.
    """
    combos = modality_combinations(len(modalities))
    pair_ids = torch.as_tensor(pair_ids, dtype=torch.long).reshape(-1, 2).cpu()
    case_idx, combo_idx = pair_ids[:, 0], pair_ids[:, 1]
    empty = torch.empty(0, len(regions))
    tables, per_case = {}, {}
    for variant, (dice, hd, *rest) in values.items():
        dice = empty if dice is None else dice
        hd = empty if hd is None else hd
        codes = rest[0] if rest and rest[0] is not None else None
        if len(dice) != len(pair_ids) or len(hd) != len(pair_ids):
            raise RuntimeError(f"{variant}: {len(dice)} Dice and {len(hd)} HD rows for {len(pair_ids)} pairs.")
        if codes is not None and len(codes) != len(pair_ids):
            raise RuntimeError(f"{variant}: {len(codes)} empty-region rows for {len(pair_ids)} pairs.")
        buffers = {}
        for k, combo in enumerate(combos):
            rows = torch.nonzero(combo_idx == k).flatten()
            rows = rows[torch.argsort(case_idx[rows], stable=True)]
            picked = (dice[rows.to(dice.device)], hd[rows.to(hd.device)])
            if codes is not None:
                picked += (codes[rows.to(codes.device)],)
            buffers[combination_name(combo, modalities)] = picked
        tables[variant] = _table(buffers, regions)
        per_case[variant] = {
            name: {
                "dice": (d * 100).tolist(),
                "hd95": torch.where(torch.isfinite(h), h, torch.nan).tolist(),
                **({"empty": rest[0].long().tolist()} if rest else {}),
            }
            for name, (d, h, *rest) in buffers.items()
        }
    cases = int(torch.unique(case_idx).numel())
    return {
        "cases": cases,
        "modalities": list(modalities),
        "regions": list(regions),
        "tables": tables,
        "per_case": per_case,
    }


def write_evaluation(result: Mapping[str, Any], output_dir: str, dataset: str) -> None:
    """Write ``evaluation.json``, ``evaluation[_<variant>].csv`` and ``evaluation_dice.png``; print the tables."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "evaluation.json"), "w") as f:
        json.dump(result, f, indent=2)
    regions = list(result["regions"])
    for variant, rows in result["tables"].items():
        suffix = "" if variant == "raw" else f"_{variant}"
        with open(os.path.join(output_dir, f"evaluation{suffix}.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(format_table(rows, regions, f"{dataset} {variant} ({result['cases']} cases)"), flush=True)
    _heatmap(result["tables"]["raw"], regions, os.path.join(output_dir, "evaluation_dice.png"))


def _heatmap(rows: Sequence[dict], regions: Sequence[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions = list(regions) + ["avg"]
    data = np.array([[row[f"dice_{r}"] for r in regions] for row in rows])
    fig, ax = plt.subplots(figsize=(1.2 * len(regions) + 3, 0.35 * len(rows) + 1.5))
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(regions)), [f"DSC {r}" for r in regions])
    ax.set_yticks(range(len(rows)), [row["combination"] for row in rows])
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                colour = "k" if data[i, j] > 60 else "w"  # readable on viridis' bright end
                ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center", color=colour, fontsize=8)
    fig.colorbar(im, ax=ax, label="Dice [%]")
    ax.set_title("Dice per modality combination")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class CombinationTables:
    """Ignite handler: the Table-2-shaped evaluation over every modality combination, written at the end of a run.

    It records the ``(case_index, combination)`` of every evaluated pair, and at ``EPOCH_COMPLETED`` (after the
    metrics have computed) gathers them across ranks in the order the metrics gather their values, splits the
    per-pair values of ``metric_details[dice_name + suffix]`` / ``[hd_name + suffix]`` by combination, in case
    order, and on ``save_rank`` writes ``evaluation.csv`` (``evaluation_<variant>.csv`` for the other variants),
    ``evaluation.json`` (``cases``, ``modalities``, ``regions``, ``tables``, ``per_case``) and
    ``evaluation_dice.png`` into ``output_dir`` and prints the tables. Every rank must attach it (the gather is
    collective). The result is also kept as ``self.result`` (on ``save_rank``).

    Args:
        modalities: names in channel order.
        dataset: ``brats`` or ``myops`` (selects the regions and the default variants).
        output_dir: where the files go.
        variants: metric name suffixes to tabulate (``raw`` has none, others ``_<variant>``); default ``raw`` and,
            for BraTS, ``et_postprocessed``.
        dice_name: name the Dice metric is attached under.
        hd_name: name the HD95 metric is attached under.
        save_rank: the rank that writes.
        quality_table: where to write the quality table of ``quality_variant``
            (:func:`~dmaf_components.quality.write_quality_table`, bound to ``model_path`` by its SHA-256; the bundle
            writes ``quality.json`` beside the weights); None: not written.
        model_path: the evaluated weights file.
        datalist: the datalist's path (recorded with its SHA-256).
        quality_variant: the variant tabulated (``raw``: the labels inference writes).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        dataset: str = "brats",
        output_dir: str = "eval",
        variants: Sequence[str] | None = None,
        dice_name: str = "dice",
        hd_name: str = "hd95",
        save_rank: int = 0,
        quality_table: str | None = None,
        model_path: str | None = None,
        datalist: Any = None,
        quality_variant: str = "raw",
    ) -> None:
        self.modalities = list(modalities)
        self.dataset = dataset.lower()
        if self.dataset not in REGIONS:
            raise ValueError(f"dataset must be one of {sorted(REGIONS)}, got {dataset!r}.")
        self.regions = list(REGIONS[self.dataset])
        self.output_dir = output_dir
        default = ["raw", "et_postprocessed"] if self.dataset == "brats" else ["raw"]
        self.variants = list(default if variants is None else variants)
        self.dice_name = dice_name
        self.hd_name = hd_name
        self.save_rank = save_rank
        self.quality_table = quality_table
        self.model_path = model_path
        self.datalist = datalist
        self.quality_variant = quality_variant
        self._ids: list[tuple[int, int]] = []
        self.result: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _started(self, _engine: Engine) -> None:
        self._ids = []

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        for item in batch if isinstance(batch, list) else []:  # decollated; [] for a skipped pair
            self._ids.append((int(item["case_index"]), int(item["combination"])))

    def __call__(self, engine: Engine) -> None:
        ids = evenly_divisible_all_gather(torch.tensor(self._ids, dtype=torch.long).reshape(-1, 2), concat=True)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank != self.save_rank:
            return
        details = getattr(engine.state, "metric_details", {})
        values = {}
        for variant in self.variants:
            suffix = "" if variant == "raw" else f"_{variant}"
            values[variant] = (
                details.get(self.dice_name + suffix),
                details.get(self.hd_name + suffix),
                details.get(f"{self.hd_name}{suffix}_empty"),
            )
        self.result = summarize(ids, values, self.modalities, self.regions)
        write_evaluation(self.result, self.output_dir, self.dataset)
        if self.quality_table is not None:
            from .quality import write_quality_table

            write_quality_table(
                self.result, self.quality_table, self.dataset, self.model_path, self.datalist, self.quality_variant
            )
