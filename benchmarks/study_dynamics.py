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
"""What the paper's learnt and adaptive weights did during an ablation study's training runs (issue 13 §3).

Reads the per-iteration TensorBoard scalars each run of ``dmaf ablation`` wrote (``runs/<setting>/seed<k>/eval/
events*``; kept next to the records, not committed) and prints, per setting over its seeds:

- **L_sep under Eq. 16.** DTM's weights w(m) sum to 1, against 1 per modality without DTM. At iteration 1 a setting
  and the same setting plus DTM start from the same weights and batch (same seed), so the ratio of their logged
  L_sep is exactly the factor by which DTM rescales lambda2 at the start; over the run the factor is
  sum_m p_m w_m / sum_m p_m (p_m: the modality's presence rate in the training split).
- **w(m) and gamma(m) (Eq. 16, 18)**: their mean over the run per modality, how often gamma hit its clip range, and
  how often the conflict rule (cos < -0.5, factor 0.7) fired on an iteration where the modality was present.
- **alpha1's drift (Eq. 8).** alpha1 = sigmoid(a) is learnt by the optimizer. Under Adam a scalar whose gradient
  keeps one sign moves by about the learning rate per step, so ``|a_end - a_start| / sum(lr)`` says how consistent
  the drift is: near 1 it would keep going (and saturate alpha1 over a long run), near 0 it is noise.

    python benchmarks/study_dynamics.py studies/myops_table3
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
from collections import defaultdict

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def load_scalars(run_dir: str) -> dict[str, list[float]] | None:
    """The run's training scalars by tag (index i = iteration i + 1), or None when its events are not here.

    A resumed run wrote one events file per start; they are merged by iteration (a later start's value wins), and a
    run whose iterations are not all there (1..N without a gap) is refused rather than read shifted.
    """
    by_step: dict[str, dict[int, float]] = defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "events.out.tfevents.*")), key=os.path.getmtime):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        if "loss/total" not in tags:
            continue
        for t in tags:
            by_step[t].update({s.step: s.value for s in acc.Scalars(t)})
    if not by_step:
        return None
    out = {}
    for t, values in by_step.items():
        steps = sorted(values)
        if steps != list(range(1, len(steps) + 1)):
            raise SystemExit(f"{run_dir}: {t} has iterations {steps[0]}..{steps[-1]} with gaps; events incomplete")
        out[t] = [values[s] for s in steps]
    return out


def validation_dice(run_dir: str) -> dict[int, float]:
    """The run's logged validation mean Dice by epoch (``val_mean_dice``; a later start's value wins)."""
    out: dict[int, float] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "events.out.tfevents.*")), key=os.path.getmtime):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        if "val_mean_dice" in acc.Tags()["scalars"]:
            out.update({s.step: s.value for s in acc.Scalars("val_mean_dice")})
    return dict(sorted(out.items()))


def presence_rates(datalist: str, modalities: list[str]) -> list[float]:
    with open(datalist) as f:
        items = json.load(f)["training"]
    counts = [0] * len(modalities)
    for item in items:
        mask = item.get("modality_mask", [1] * len(modalities))
        for m, v in enumerate(mask):
            counts[m] += bool(v)
    return [c / len(items) for c in counts]


def lr_sum(record: dict, iterations: int) -> float:
    """Sum of the learning rate over the run's iterations (AdamW, PolynomialLR(power 0.9) stepped per epoch); NaN
    when the study did not set ``epochs`` (``max_epochs`` in older records) and ``learning_rate`` (the schedule is then
    not in the record)."""
    overrides = record["overrides"]
    epochs = overrides.get("epochs", overrides.get("max_epochs"))
    if epochs is None or "learning_rate" not in overrides:
        return math.nan
    epochs = int(epochs)
    base = float(record["overrides"]["learning_rate"])
    per_epoch = iterations // epochs
    return sum(base * (1 - e / epochs) ** 0.9 * per_epoch for e in range(epochs))


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", help="a dmaf ablation study folder (with runs/<setting>/seed<k>/)")
    args = parser.parse_args()

    runs: dict[str, dict[int, tuple[dict, dict[str, list[float]]]]] = defaultdict(dict)
    record_paths: dict[tuple[str, int], str] = {}
    missing = []
    for rec_path in sorted(glob.glob(os.path.join(args.study, "runs", "*", "seed*", "record.json"))):
        with open(rec_path) as f:
            record = json.load(f)
        scalars = load_scalars(os.path.dirname(rec_path))
        if scalars is None:
            missing.append(os.path.dirname(rec_path))
            continue
        runs[record["setting"]][int(record["seed"])] = (record, scalars)
        record_paths[(record["setting"], int(record["seed"]))] = rec_path
    if missing:
        print(f"no training events (not kept here) for {len(missing)} runs: {', '.join(missing)}")
    if not runs:
        raise SystemExit(f"{args.study}: no run with training events")
    any_record = next(iter(next(iter(runs.values())).values()))[0]
    with open(any_record["datalist"]) as f:
        modalities = json.load(f)["modalities"]
    p = presence_rates(any_record["datalist"], modalities)
    print(
        f"study {args.study}: {sum(len(s) for s in runs.values())} runs with events; modalities {modalities}, "
        f"presence in the training split {[round(x, 3) for x in p]}"
    )

    print("\n## Training curves: validation mean Dice at each validation (epoch: value), and the fused segmentation")
    print("  loss (loss/fuse) averaged over the first and last 10 % of the iterations, per run")
    for setting in sorted(runs):
        for seed, (record, sc) in sorted(runs[setting].items()):
            val = validation_dice(os.path.dirname(record_paths[(setting, seed)]))
            fuse = sc["loss/fuse"]
            tenth = max(len(fuse) // 10, 1)
            print(
                f"  {setting:>12} seed {seed}: val "
                + ", ".join(f"{e}: {v:.3f}" for e, v in val.items())
                + f"; loss/fuse first 10 % {statistics.mean(fuse[:tenth]):.3f}, last 10 % "
                f"{statistics.mean(fuse[-tenth:]):.3f}"
            )

    print("\n## L_sep under Eq. 16: logged L_sep at iteration 1, setting + DTM over setting (same seed)")
    for base, with_dtm in (
        ("baseline", "dtm"),
        ("distill", "distill+dtm"),
        ("dmaf", "dmaf+dtm"),
        ("dmaf+distill", "full"),
    ):
        ratios = [
            runs[with_dtm][s][1]["loss/sep"][0] / runs[base][s][1]["loss/sep"][0]
            for s in sorted(set(runs.get(base, {})) & set(runs.get(with_dtm, {})))
        ]
        if ratios:
            print(f"  {with_dtm:>12} / {base:<12} {fmt(ratios)}  (seeds: {len(ratios)}; 1/M = {1 / len(p):.3f})")

    print("\n## DTM: mean over the run of w(m) (Eq. 16) and gamma(m) (Eq. 18); L_sep factor sum p w / sum p")
    print("  gamma at clip: iterations with gamma at 0.1 or 10; conflict: iterations where the modality was present")
    print("  and 0.7 was applied (cos < -0.5), as a share of its present iterations")
    for setting in ("dtm", "distill+dtm", "dmaf+dtm", "full"):
        if setting not in runs:
            continue
        print(f"  {setting}:")
        factors = []
        per_mod: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in modalities}
        for _, (record, sc) in sorted(runs[setting].items()):
            n = len(sc["loss/total"])
            w = [sc[f"dtm/w/{m}"] for m in modalities]  # Eq. 16's w, as logged
            scale = len(p) if record["overrides"].get("dtm_reweight_norm") == "mean" else 1.0  # what L_sep got
            factors.append(
                scale * statistics.mean(sum(p[m] * w[m][i] for m in range(len(p))) / sum(p) for i in range(n))
            )
            for m, name in enumerate(modalities):
                g, a = sc[f"dtm/gamma/{name}"], sc[f"dtm/applied_scale/{name}"]
                present = [i for i in range(n) if not math.isclose(a[i], 1.0) or math.isclose(g[i], 1.0)]
                fired = [i for i in present if math.isclose(a[i], 0.7 * g[i], rel_tol=1e-3)]
                per_mod[name]["w"].append(statistics.mean(w[m]))
                per_mod[name]["w_last"].append(statistics.mean(w[m][-n // 10 :]))
                per_mod[name]["gamma"].append(statistics.mean(g))
                per_mod[name]["clip"].append(sum(x <= 0.1 + 1e-6 or x >= 10 - 1e-6 for x in g) / n)
                per_mod[name]["conflict"].append(len(fired) / max(len(present), 1))
        print(f"    L_sep factor over the run {fmt(factors)} (seeds: {len(factors)})")
        for name in modalities:
            d = per_mod[name]
            print(
                f"    {name:>6}: w {fmt(d['w'])} (last 10 %: {fmt(d['w_last'])}), gamma {fmt(d['gamma'], 2)}, "
                f"at clip {fmt(d['clip'], 3)}, conflict {fmt(d['conflict'], 3)}"
            )

    print("\n## alpha1 (Eq. 8, learnt): start, end, range over the run, drift consistency |a_end - a_start| / sum(lr)")
    for setting in ("distill", "dmaf+distill", "distill+dtm", "full"):
        if setting not in runs:
            continue
        rows = []
        for seed, (record, sc) in sorted(runs[setting].items()):
            a1 = sc["loss/alpha1"]
            logit = [math.log(x / (1 - x)) for x in (a1[0], a1[-1])]
            rows.append((seed, a1[0], a1[-1], min(a1), max(a1), abs(logit[1] - logit[0]) / lr_sum(record, len(a1))))
        print(f"  {setting}: end {fmt([r[2] for r in rows])}; consistency {fmt([r[5] for r in rows], 2)}")
        for seed, start, end, lo, hi, cons in rows:
            print(f"    seed {seed}: {start:.3f} -> {end:.3f} (range {lo:.3f}..{hi:.3f}), consistency {cons:.2f}")


if __name__ == "__main__":
    main()
