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
"""Paired differences between any two settings of one ablation study (``table3.md`` compares each with the baseline).

For each pair ``A-B`` it prints, over the seeds both settings have: the average DSC difference with the 95 % interval
over seeds of ``dmaf ablation`` (:func:`dmaf_components.stats.seed_interval`), its sign-flip p, the smallest effect the
seeds can detect and the seeds an effect of the observed size needs; the difference seed by seed; per region and per
modality combination (mean and interval; uncorrected for the many combinations, so no count of "significant" ones).
Average DSC is Table 3's: the mean over modality combinations and regions of the per-case Dice.

    python benchmarks/study_pairs.py studies/brats_baseline_full dmaf-baseline full-dmaf full-baseline
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

from dmaf_components.stats import seed_interval


def load(study: str) -> dict[str, dict[int, dict]]:
    """``{setting: {seed: record}}`` of a study folder's finished runs."""
    out: dict[str, dict[int, dict]] = {}
    for path in sorted(glob.glob(os.path.join(study, "runs", "*", "seed*", "record.json"))):
        with open(path) as f:
            record = json.load(f)
        out.setdefault(record["setting"], {})[int(record["seed"])] = record
    return out


def dice(record: dict) -> tuple[np.ndarray, list[str], list[str]]:
    """``(combinations, cases, regions)`` per-case Dice (raw predictions), the combinations and the regions."""
    per_case = record["evaluation"]["per_case"]["raw"]
    combos = list(per_case)
    return np.array([per_case[c]["dice"] for c in combos], np.float64), combos, record["evaluation"]["regions"]


def case_average(v: np.ndarray) -> np.ndarray:
    """``(seeds, combos, cases, regions)`` per-case Dice -> ``(seeds, cases)``: mean over regions and combinations."""
    return np.nanmean(np.nanmean(v, axis=3), axis=1)


def describe(runs: dict[str, dict[int, dict]], setting: str) -> None:
    """One setting's average DSC: mean and sd over its seeds, and each seed's."""
    seeds = sorted(runs.get(setting, {}))
    if not seeds:
        print(f"{setting}: no finished run")
        return
    per_seed = case_average(np.stack([dice(runs[setting][s])[0] for s in seeds])).mean(axis=1)
    sd = f" ± {per_seed.std(ddof=1):.2f} (sd over seeds)" if len(seeds) > 1 else ""
    print(
        f"{setting}, seeds {seeds}: average DSC {per_seed.mean():.2f}{sd}; per seed: "
        + ", ".join(f"{s}: {v:.2f}" for s, v in zip(seeds, per_seed))
    )


def compare(runs: dict[str, dict[int, dict]], a: str, b: str) -> None:
    seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
    if not seeds:
        print(f"{a} - {b}: no seed both settings have")
        return
    va = np.stack([dice(runs[a][s])[0] for s in seeds])  # (seeds, combos, cases, regions)
    vb = np.stack([dice(runs[b][s])[0] for s in seeds])
    _, combos, regions = dice(runs[a][seeds[0]])
    avg = case_average
    iv = seed_interval(avg(va) - avg(vb))
    print(
        f"{a} - {b}, seeds {seeds}: average DSC {iv.mean:+.2f} [{iv.low:+.2f}, {iv.high:+.2f}] (95 % over seeds), "
        f"sign-flip p {iv.p:.3g}, detectable {iv.detectable:.2f}, seeds for this effect {iv.seeds_needed:g}"
    )
    print("  per seed: " + ", ".join(f"{s}: {np.nanmean(avg(va)[i] - avg(vb)[i]):+.2f}" for i, s in enumerate(seeds)))
    for r, region in enumerate(regions):
        region_of = lambda v: np.nanmean(v[..., r], axis=1)  # noqa: E731  (seeds, cases)
        iv = seed_interval(region_of(va) - region_of(vb), power_analysis=False)
        print(f"  {region}: {iv.mean:+.2f} [{iv.low:+.2f}, {iv.high:+.2f}]")
    print("  per combination (average over regions): mean [95 % CI over seeds], uncorrected")
    for c, combo in enumerate(combos):
        d = np.nanmean(va[:, c], axis=2) - np.nanmean(vb[:, c], axis=2)  # (seeds, cases)
        iv = seed_interval(d, power_analysis=False)
        print(f"    {combo:24s} {iv.mean:+6.2f} [{iv.low:+6.2f}, {iv.high:+6.2f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="an ablation study folder (with runs/<setting>/seed<k>/record.json)")
    parser.add_argument("pairs", nargs="+", help="A-B: setting A minus setting B, e.g. dmaf-baseline")
    args = parser.parse_args()
    runs = load(args.study)
    print(f"study {args.study}: " + ", ".join(f"{k} ({len(v)} seeds)" for k, v in sorted(runs.items())))
    pairs = [pair.partition("-")[::2] for pair in args.pairs]
    for setting in dict.fromkeys(name for pair in pairs for name in pair):
        describe(runs, setting)
    for a, b in pairs:
        compare(runs, a, b)


if __name__ == "__main__":
    main()
