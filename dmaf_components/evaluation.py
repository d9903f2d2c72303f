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
"""Evaluation over every combination of available modalities (paper Table 2): Dice and HD95 per region."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from .inferers import study_modality_mask

__all__ = [
    "REGIONS",
    "modality_combinations",
    "combination_name",
    "suppress_small_et",
    "format_table",
    "CombinationEvaluation",
]

#: evaluation regions in trained class indices (BraTS: 1 NCR, 2 edema, 3 ET; MyoPS: 1 LVB, 2 RVB, 3 MYO)
REGIONS = {
    "brats": {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
    "myops": {"LVB": (1,), "RVB": (2,), "MYO": (3,)},
}


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


def _regions(label: torch.Tensor, regions: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """(B, 1, *s) class indices -> (B, R, *s) binary regions."""
    return torch.cat([torch.isin(label, torch.as_tensor(c, device=label.device)) for c in regions.values()], 1).float()


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


class CombinationEvaluation:
    """Evaluate a DMAF-Net on a labelled split under every modality combination.

    Each case is loaded and preprocessed once; the 2^M - 1 inferences run on it in turn (the combination's missing
    channels zeroed and masked). Metrics are MONAI's ``DiceMetric`` (empty ground truth and empty prediction count
    as 1, the BraTS convention) and ``HausdorffDistanceMetric`` (95th percentile, in mm using the image spacing;
    cases where it is undefined because the prediction or the ground truth is empty are left out of the mean and
    counted). For BraTS every metric is also reported after the ET post-processing (:func:`suppress_small_et`).

    Args:
        network: the trained network (eval mode is set here).
        dataloader: batches of one case with ``image`` (1, M, *s), ``label`` (1, 1, *s) class indices and
            ``image_available`` (1, M).
        inferer: e.g. MONAI ``SlidingWindowInferer`` (2-D nets on stacks: ``SliceInferer``).
        device: where to run.
        modalities: names in channel order.
        dataset: ``brats`` or ``myops`` (selects the regions).
        output_dir: where ``evaluation.{csv,json}`` and the heatmap PNG go.
        amp: autocast on CUDA.
        et_min_voxels: threshold of the ET post-processing (BraTS).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        dataloader: Iterable,
        inferer,
        device: str | torch.device,
        modalities: Sequence[str],
        dataset: str = "brats",
        output_dir: str = "eval",
        amp: bool = False,
        et_min_voxels: int = 500,
    ) -> None:
        self.network = network
        self.dataloader = dataloader
        self.inferer = inferer
        self.device = torch.device(device)
        self.modalities = list(modalities)
        self.dataset = dataset.lower()
        if self.dataset not in REGIONS:
            raise ValueError(f"dataset must be one of {sorted(REGIONS)}, got {dataset!r}.")
        self.regions = REGIONS[self.dataset]
        self.output_dir = output_dir
        self.amp = amp and self.device.type == "cuda"
        self.et_min_voxels = et_min_voxels
        self.variants = ["raw", "et_postprocessed"] if self.dataset == "brats" else ["raw"]

    def _metrics(self):
        return {
            v: (DiceMetric(include_background=True, reduction="none", ignore_empty=False),
                HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none"))
            for v in self.variants
        }

    @torch.no_grad()
    def run(self) -> dict:
        """Evaluate, write CSV/JSON/PNG into ``output_dir``, print the tables and return them."""
        self.network.eval()
        combos = modality_combinations(len(self.modalities))
        metrics = {c: self._metrics() for c in combos}
        cases = 0
        for batch in self.dataloader:
            image = torch.as_tensor(batch["image"]).to(self.device)
            label = torch.as_tensor(batch["label"]).to(self.device)
            available = batch.get("image_available")  # the loader's record; else scan the voxels (once)
            available = study_modality_mask(image) if available is None else torch.as_tensor(available).bool()
            available = available.to(self.device).reshape(1, -1)
            spacing = getattr(batch["image"], "pixdim", None)
            if isinstance(spacing, (list, tuple)):  # batched MetaTensor: one per case
                spacing = spacing[0]
            if spacing is not None:
                spacing = [float(v) for v in torch.as_tensor(spacing).flatten()[: image.ndim - 2]]
            gt = _regions(label, self.regions)
            cases += 1
            for combo in combos:
                mask = torch.tensor(combo, device=self.device)[None] & available
                if not mask.any():
                    continue
                x = image * mask.reshape(1, -1, *([1] * (image.ndim - 2))).to(image.dtype)
                with torch.autocast("cuda", enabled=self.amp):
                    logits = self.inferer(x, self.network, modality_mask=mask)
                pred = torch.as_tensor(logits).argmax(1, keepdim=True)
                for variant in self.variants:
                    p = suppress_small_et(pred, min_voxels=self.et_min_voxels) if variant != "raw" else pred
                    dice, hd = metrics[combo][variant]
                    pr = _regions(p, self.regions)
                    dice(pr, gt)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # empty prediction/ground truth: HD undefined, counted
                        hd(pr, gt, spacing=spacing)
        tables = {v: self._table(combos, metrics, v) for v in self.variants}
        result = {"cases": cases, "modalities": self.modalities, "regions": list(self.regions), "tables": tables,
                  "per_case": {v: self._per_case(combos, metrics, v) for v in self.variants}}
        self._write(result)
        return result

    def _per_case(self, combos, metrics, variant) -> dict[str, dict[str, list]]:
        """Per-case values in loader order, ``{combination: {"dice": (cases, R) in %, "hd95": (cases, R)}}`` (NaN
        where undefined): what paired comparisons between trained models need (``dmaf ablation``)."""
        out = {}
        for combo in combos:
            dice, hd = metrics[combo][variant]
            d, h = dice.get_buffer(), hd.get_buffer()
            out[combination_name(combo, self.modalities)] = {
                "dice": [] if d is None else (d * 100).tolist(),
                "hd95": [] if h is None else torch.where(torch.isfinite(h), h, torch.nan).tolist(),
            }
        return out

    def _table(self, combos, metrics, variant) -> list[dict]:
        rows = []
        for combo in combos:
            dice, hd = metrics[combo][variant]
            row = {"combination": combination_name(combo, self.modalities)}
            d = dice.get_buffer() if dice.get_buffer() is not None else torch.empty(0, len(self.regions))
            h = hd.get_buffer() if hd.get_buffer() is not None else torch.empty(0, len(self.regions))
            for r, region in enumerate(self.regions):
                row[f"dice_{region}"] = float(d[:, r].nanmean()) * 100 if len(d) else math.nan
                finite = h[:, r][torch.isfinite(h[:, r])] if len(h) else h
                row[f"hd95_{region}"] = float(finite.mean()) if len(finite) else math.nan
                row[f"hd95_{region}_undefined"] = int(len(h) - len(finite))
            row["dice_avg"] = float(np.nanmean([row[f"dice_{r}"] for r in self.regions]))
            row["hd95_avg"] = float(np.nanmean([row[f"hd95_{r}"] for r in self.regions]))
            rows.append(row)
        avg = {"combination": "Avg."}
        for key in rows[0]:
            if key != "combination":
                vals = [r[key] for r in rows]
                avg[key] = int(sum(vals)) if key.endswith("undefined") else float(np.nanmean(vals))
        rows.append(avg)
        return rows

    def _write(self, result: dict) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "evaluation.json"), "w") as f:
            json.dump(result, f, indent=2)
        for variant, rows in result["tables"].items():
            suffix = "" if variant == "raw" else f"_{variant}"
            with open(os.path.join(self.output_dir, f"evaluation{suffix}.csv"), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            print(format_table(rows, list(self.regions), f"{self.dataset} {variant} ({result['cases']} cases)"))
        self._heatmap(result["tables"]["raw"], os.path.join(self.output_dir, "evaluation_dice.png"))

    def _heatmap(self, rows: Sequence[dict], path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        regions = list(self.regions) + ["avg"]
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
