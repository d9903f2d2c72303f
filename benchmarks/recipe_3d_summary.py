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
"""The 3-D recipe study's figures and its decision (studies/recipe_3d/README.md, fixed before any run).

For each setting (baseline, full) and arm (uniform, foreground patch sampling): the validation mean Dice after 96,
240 and 480 iterations, mean and sample standard deviation over the seeds recorded; the decision rule at 240
iterations; and the test split's average DSC (Table 3's: mean over the 15 combinations and the regions), foreground
minus uniform paired by seed and case, with the seed-level interval of ``dmaf_components.stats``. Reads the records
only; arms or seeds not recorded yet are shown as missing, and the decision is given only when both arms have all
the seeds named.

    python benchmarks/recipe_3d_summary.py studies/recipe_3d --seeds 3
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from study_pairs import case_average, dice, load

from dmaf_components.stats import seed_interval

ITERATIONS = (96, 240, 480)
ARMS = ("uniform", "foreground")
SETTINGS = ("baseline", "full")


def validation_at(record: dict, iteration: int) -> float:
    """The validation mean Dice recorded at ``iteration`` (NaN when that validation did not run)."""
    curve = record.get("validation") or {}
    for it, value in zip(curve.get("iteration", []), curve.get("val_mean_dice", [])):
        if int(it) == iteration:
            return float(value)
    return float("nan")


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN below 2 values)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()) if v.size else float("nan"), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="the study folder, with uniform/ and foreground/ inside")
    parser.add_argument("--seeds", type=int, default=3, help="seeds the design names (0 .. N-1)")
    args = parser.parse_args()
    runs = {arm: load(os.path.join(args.study, arm)) for arm in ARMS}
    wanted = list(range(args.seeds))
    print("validation mean Dice: mean ± sd over seeds (seeds recorded)")
    print(f"{'setting':10s}{'arm':12s}" + "".join(f"{f'{i} it':>18s}" for i in ITERATIONS))
    table: dict[tuple[str, str], dict[int, tuple[float, float, int]]] = {}
    for setting in SETTINGS:
        for arm in ARMS:
            records = runs[arm].get(setting, {})
            row = {}
            for it in ITERATIONS:
                values = [validation_at(records[s], it) for s in wanted if s in records]
                row[it] = (*spread([v for v in values if np.isfinite(v)]), len(values))
            table[(setting, arm)] = row
            cells = "".join(f"{f'{m:.3f} ± {sd:.3f} ({n})':>18s}" if n else f"{'-':>18s}" for m, sd, n in row.values())
            print(f"{setting:10s}{arm:12s}{cells}")
    complete = all(set(wanted) <= set(runs[arm].get(setting, {})) for arm in ARMS for setting in SETTINGS)
    if complete:
        better = []
        for setting in SETTINGS:
            (mu, su, _), (mf, sf, _) = table[(setting, "uniform")][240], table[(setting, "foreground")][240]
            ok = mf > mu and sf <= su
            better.append(ok)
            print(
                f"decision rule, {setting}: foreground mean {mf:.3f} {'>' if mf > mu else '<='} uniform {mu:.3f}, "
                f"sd {sf:.3f} {'<=' if sf <= su else '>'} {su:.3f}: {'met' if ok else 'not met'}"
            )
        print("decision: foreground sampling becomes the default" if all(better) else "decision: uniform stays")
    else:
        print(f"decision: not yet (each arm and setting needs seeds {wanted})")
    print("test split average DSC, foreground - uniform, paired by seed and case (95 % interval over seeds)")
    for setting in SETTINGS:
        seeds = sorted(set(runs["uniform"].get(setting, {})) & set(runs["foreground"].get(setting, {})))
        if not seeds:
            print(f"  {setting}: no seed both arms have")
            continue
        fg = np.stack([dice(runs["foreground"][setting][s])[0] for s in seeds])
        un = np.stack([dice(runs["uniform"][setting][s])[0] for s in seeds])
        iv = seed_interval(case_average(fg) - case_average(un))
        print(
            f"  {setting}, seeds {seeds}: {iv.mean:+.2f} [{iv.low:+.2f}, {iv.high:+.2f}], sign-flip p {iv.p:.3g}, "
            f"detectable {iv.detectable:.2f}"
        )
    for arm in ARMS:
        for setting in SETTINGS:
            records = runs[arm].get(setting, {})
            if records:
                per_seed = case_average(np.stack([dice(records[s])[0] for s in sorted(records)])).mean(axis=1)
                print(
                    f"test average DSC, {arm} {setting}: "
                    + ", ".join(f"seed {s} {v:.2f}" for s, v in zip(sorted(records), per_seed))
                )


if __name__ == "__main__":
    main()
