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
"""The Table-2-shaped result of an evaluation: per modality combination and region, the mean Dice and HD95 (and the
count of empty-region pairs), written as ``evaluation.csv``/``.json`` and a Dice heat map, and printed.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import evenly_divisible_all_gather

from .combinations import REGIONS, combination_name, modality_combinations
from .metrics import EMPTY_BOTH, EMPTY_GT, EMPTY_PRED

__all__ = ["format_table", "summarize", "write_evaluation", "CombinationTables"]


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
            from ..quality import write_quality_table

            write_quality_table(
                self.result, self.quality_table, self.dataset, self.model_path, self.datalist, self.quality_variant
            )
