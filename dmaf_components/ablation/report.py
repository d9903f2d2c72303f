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
"""A study's summary from its runs' records: Table 3 (mean ± std over seeds per setting and region), the
per-combination means, the paired differences to the baseline (or to a reference study's same setting) and each
component's effect in the factorial design, written as ``table3.csv``/``.md``/``.png``, ``combinations.csv`` and
``effects.csv``.

Every interval is :func:`~dmaf_components.stats.seed_interval`'s (the seed is the unit of replication); the case
bootstrap (:func:`~dmaf_components.stats.paired_bootstrap`) is only a labelled second column.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..bundle_args import canonical_overrides
from ..stats import PairedInterval, paired_bootstrap, seed_interval
from .settings import COMPONENT_KEYS, COMPONENTS, SETTINGS, components

__all__ = ["INTERVAL_NOTE", "summarize_records", "component_effects", "write_summary"]

#: what every paired difference of a summary reports: the seed-level interval
#: (:func:`~dmaf_components.stats.seed_interval`) and, as a second labelled column, the case-resampling bootstrap (too
#: narrow with few seeds)
INTERVAL_NOTE = (
    "Δ: paired difference (same seeds, same test cases) with a 95 % t-interval whose unit of replication is the seed "
    "(seed-to-seed spread of the paired means plus the test cases' share, t with seeds − 1 degrees of freedom); p: "
    "exact two-sided sign-flip test over the seeds (its smallest possible value is 0.25 with 3 seeds, 0.0625 with 5, "
    "0.002 with 10); detectable: the smallest true effect these seeds detect with 80 % power; seeds for Δ: the seeds "
    "a test needs to detect an effect of the observed size with 80 % power. The case bootstrap (seeds and cases "
    "resampled) is listed last for comparison only: with few seeds it is too narrow. Per-combination intervals are "
    "uncorrected for the many, strongly correlated combinations: they describe, they are not separate tests."
)


def summarize_records(
    records: Sequence[dict], reference: Sequence[dict] | None = None, reference_name: str | None = None
) -> dict:
    """Mean ± std over seeds per setting and region (averaged over every modality combination, as Table 3), the
    per-combination means, and the paired difference of each setting's average DSC/HD95 to the baseline with the
    seed-level interval of :func:`~dmaf_components.stats.seed_interval` (and, labelled ``_boot``, the case-resampling
    bootstrap for comparison); with ``reference`` records, to the reference's same setting instead."""
    by_setting: dict[str, dict[int, dict]] = {}
    for r in records:
        by_setting.setdefault(r["setting"], {})[r["seed"]] = r
    rows, combo_rows = [], []
    if not records:
        return {"rows": rows, "combinations": combo_rows, "regions": [], "n_records": 0, "compared_to": "baseline"}
    regions = records[0]["evaluation"]["regions"]
    combos = list(records[0]["evaluation"]["per_case"]["raw"])
    ref_by_setting: dict[str, dict[int, dict]] = {}
    for r in reference or []:
        ref_by_setting.setdefault(r["setting"], {})[r["seed"]] = r
    unpaired: list[str] = []
    pairs: list[tuple[dict, dict]] = []
    for setting in [s for s in SETTINGS if s in by_setting]:
        base = by_setting.get("baseline", {}) if reference is None else ref_by_setting.get(setting, {})
        runs = by_setting[setting]
        seeds = sorted(runs)
        row: dict[str, Any] = {
            "setting": setting,
            **dict(zip(COMPONENT_KEYS, components(runs[seeds[0]], setting))),
            "seeds": len(seeds),
        }
        if setting != "baseline" or reference is not None:
            row["paired_seeds"] = sum(s in base for s in seeds)
            unpaired += [f"{setting} seed {s}" for s in seeds if s not in base]
            pairs += [(runs[s], base[s]) for s in seeds if s in base]
        for metric, name in (("dice", "DSC"), ("hd95", "HD95")):
            vals = np.stack([_case_values(runs[s], metric) for s in seeds])  # (seeds, combos, cases, regions)
            per_seed = np.nanmean(vals, axis=2).mean(axis=1)  # combination means, then their mean (Table 3)
            for r, region in enumerate(regions):
                row[f"{name}_{region}"] = float(per_seed[:, r].mean())
                row[f"{name}_{region}_std"] = float(per_seed[:, r].std(ddof=1)) if len(seeds) > 1 else math.nan
            avg = np.nanmean(per_seed, axis=1)
            row[f"{name}_avg"] = float(avg.mean())
            row[f"{name}_avg_std"] = float(avg.std(ddof=1)) if len(seeds) > 1 else math.nan
            paired = [s for s in seeds if s in base]
            if (setting != "baseline" or reference is not None) and paired:
                cell = lambda rec: np.nanmean(np.nanmean(_case_values(rec, metric), axis=2), axis=0)  # noqa: E731
                diffs = np.stack([cell(runs[s]) - cell(base[s]) for s in paired])  # (seeds, cases)
                _interval_columns(row, f"{name}_avg_diff", diffs)
                for s, d in zip(paired, diffs):  # the same difference, seed by seed
                    row[f"{name}_avg_diff_seed{s}"] = float(np.nanmean(d))
            for c, combo in enumerate(combos):
                if metric != "dice":
                    continue
                crow: dict[str, Any] = {
                    "setting": setting,
                    "combination": combo,
                    "DSC_avg": float(np.nanmean(vals[:, c])),
                    "seeds": len(seeds),
                }
                for r, region in enumerate(regions):
                    crow[f"DSC_{region}"] = float(np.nanmean(vals[:, c, :, r]))
                    if (setting != "baseline" or reference is not None) and paired:
                        ref_vals = np.stack([_case_values(base[s_], metric)[c, :, r] for s_ in paired])
                        run_vals = np.stack([_case_values(runs[s_], metric)[c, :, r] for s_ in paired])
                        iv = seed_interval(run_vals - ref_vals, power_analysis=False)  # (seeds, cases), one region
                        crow[f"DSC_{region}_diff"], crow[f"DSC_{region}_diff_low"] = iv.mean, iv.low
                        crow[f"DSC_{region}_diff_high"], crow[f"DSC_{region}_diff_p"] = iv.high, iv.p
                combo_rows.append(crow)
        rows.append(row)
    compared_to = "baseline" if reference is None else f"reference {reference_name or 'study'}"
    return {
        "rows": rows,
        "combinations": combo_rows,
        "regions": regions,
        "n_records": len(records),
        "compared_to": compared_to,
        "unpaired": unpaired,
        "effects": component_effects(by_setting),
        "changes": _override_changes(pairs) if reference is not None else {},
    }


def component_effects(by_setting: Mapping[str, Mapping[int, dict]]) -> list[dict]:
    """Each component's effect on the average DSC in the factorial design of Table 3, when all eight settings are
    there: ``averaged`` is its paired difference (with - without, the other two components held fixed) averaged over
    the four combinations of the other two (its main effect); ``in_full`` is the full model minus the full model
    without it. Paired by seed and test case over the seeds every setting has, with
    :func:`~dmaf_components.stats.seed_interval`.

    Returns:
        one dict per component: ``component``, ``averaged`` and ``in_full`` as
        :class:`~dmaf_components.stats.PairedInterval`, ``seeds``.
    """
    if not all(name in by_setting for name in SETTINGS):
        return []
    seeds = sorted(set.intersection(*(set(by_setting[name]) for name in SETTINGS)))
    if not seeds:
        return []
    name_of = {flags: name for name, flags in SETTINGS.items()}

    def cell(setting: str) -> np.ndarray:  # (seeds, cases): average DSC over combinations and regions
        return np.stack(
            [np.nanmean(np.nanmean(_case_values(by_setting[setting][s], "dice"), axis=2), axis=0) for s in seeds]
        )

    out = []
    for c, component in enumerate(COMPONENTS):
        contexts = []
        for flags in SETTINGS.values():
            if flags[c]:
                without = tuple(False if i == c else f for i, f in enumerate(flags))
                contexts.append(cell(name_of[flags]) - cell(name_of[without]))
        in_full = cell("full") - cell(name_of[tuple(i != c for i in range(len(COMPONENTS)))])
        out.append(
            {
                "component": component,
                "averaged": seed_interval(np.mean(contexts, axis=0)),
                "in_full": seed_interval(in_full),
                "seeds": len(seeds),
            }
        )
    return out


def _case_values(record: dict, metric: str) -> np.ndarray:
    """``(combinations, cases, regions)`` per-case values of one run (raw predictions)."""
    per_case = record["evaluation"]["per_case"]["raw"]
    return np.array([per_case[c][metric] for c in per_case], dtype=np.float64)


def _interval_columns(row: dict, key: str, diffs: np.ndarray) -> PairedInterval:
    """Write the paired difference ``diffs`` ``(seeds, cases)`` into ``row`` under ``key``: the mean, the seed-level
    interval (``_low``/``_high``), its sign-flip ``_p``, ``_detectable`` and ``_needs_seeds``, and the case
    bootstrap (``_boot_low``/``_boot_high``)."""
    iv = seed_interval(diffs)
    row[key], row[f"{key}_low"], row[f"{key}_high"], row[f"{key}_p"] = iv.mean, iv.low, iv.high, iv.p
    row[f"{key}_detectable"], row[f"{key}_needs_seeds"] = iv.detectable, iv.seeds_needed
    _, row[f"{key}_boot_low"], row[f"{key}_boot_high"] = paired_bootstrap(diffs)
    return iv


def _override_changes(pairs: Sequence[tuple[dict, dict]]) -> dict[str, str]:
    """What the runs' overrides set differently from their reference runs': ``{key: "value (reference: value)"}``."""
    changes: dict[str, set[str]] = {}
    for run, ref in pairs:
        # records of older versions name a key by its old name (max_epochs): compare the model zoo's names
        a, b = canonical_overrides(run.get("overrides") or {}), canonical_overrides(ref.get("overrides") or {})
        for key in sorted(set(a) | set(b)):
            if a.get(key, "default") != b.get(key, "default"):
                changes.setdefault(key, set()).add(f"{a.get(key, 'default')} (reference: {b.get(key, 'default')})")
    return {key: "; ".join(sorted(values)) for key, values in changes.items()}


def write_summary(summary: dict, out: str) -> None:
    """``table3.csv`` (every column), ``table3.md`` (Table 3's layout, mean ± std, paired differences, each
    component's effect), ``combinations.csv`` (average DSC per setting and modality combination), ``effects.csv``
    (:func:`component_effects`, when all eight settings are there) and ``table3.png``."""
    rows, regions = summary["rows"], summary["regions"]
    os.makedirs(out, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(out, "table3.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    for stale in ("effects.csv", "table3.png"):  # written again below only when this summary has them
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    if summary.get("effects"):
        with open(os.path.join(out, "effects.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                [
                    "component",
                    "averaged",
                    "averaged_low",
                    "averaged_high",
                    "averaged_p",
                    "in_full",
                    "in_full_low",
                    "in_full_high",
                    "in_full_p",
                    "seeds",
                ]
            )
            for e in summary["effects"]:
                a, f_ = e["averaged"], e["in_full"]
                writer.writerow(
                    [e["component"], a.mean, a.low, a.high, a.p, f_.mean, f_.low, f_.high, f_.p, e["seeds"]]
                )
    with open(os.path.join(out, "combinations.csv"), "w", newline="") as f:
        fields = list(dict.fromkeys(k for c in summary["combinations"] for k in c))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(summary["combinations"])

    def pm(row, key):
        std = row.get(key + "_std", math.nan)
        return f"{row[key]:.2f}" + ("" if math.isnan(std) else f" ± {std:.2f}")

    def diff(row, name):
        if f"{name}_avg_diff" not in row:
            return "–"
        key = f"{name}_avg_diff"
        text = f"{row[key]:+.2f} {_ci(row[f'{key}_low'], row[f'{key}_high'])}"
        paired = row.get("paired_seeds", row["seeds"])
        return text + (f" ({paired} of {row['seeds']} seeds paired)" if paired < row["seeds"] else "")

    compared_to = summary.get("compared_to", "baseline")
    vs = "baseline" if compared_to == "baseline" else "reference"
    tick = lambda v: "•" if v else "–"  # noqa: E731
    head = (
        ["DMAF", "Distillation", "DTM"]
        + [f"DSC {r}" for r in regions]
        + ["DSC Avg."]
        + [f"HD95 {r}" for r in regions]
        + ["HD95 Avg.", f"Δ DSC Avg. vs {vs} [95% CI over seeds]", "Δ HD95 Avg. [95% CI over seeds]", "seeds"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [tick(row["dmaf"]), tick(row["distillation"]), tick(row["dtm"])]
        cells += [pm(row, f"DSC_{r}") for r in regions] + [pm(row, "DSC_avg")]
        cells += [pm(row, f"HD95_{r}") for r in regions] + [pm(row, "HD95_avg")]
        cells += [diff(row, "DSC"), diff(row, "HD95"), str(row["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    combos = list(dict.fromkeys(c["combination"] for c in summary["combinations"]))
    settings = [r["setting"] for r in rows]
    value = {(c["setting"], c["combination"]): c["DSC_avg"] for c in summary["combinations"]}
    lines += [
        "",
        "Average DSC [%] per modality combination (mean over seeds):",
        "",
        "| combination | " + " | ".join(settings) + " |",
        "|" + "---|" * (len(settings) + 1),
    ]
    for combo in combos:
        lines.append(f"| {combo} | " + " | ".join(f"{value[(s, combo)]:.2f}" for s in settings) + " |")
    seeds = sorted({int(k.rsplit("seed", 1)[1]) for r in rows for k in r if k.startswith("DSC_avg_diff_seed")})
    tested = [r for r in rows if "DSC_avg_diff" in r]
    if tested:
        lines += [
            "",
            f"Δ DSC Avg. vs {vs}: the evidence behind each interval:",
            "",
            "| setting | Δ [95% CI over seeds] | p (sign-flip) | detectable (80% power) | seeds for Δ "
            "| case bootstrap [95%] (too narrow) |",
            "|---|---|---|---|---|---|",
        ]
        for row in tested:
            k = "DSC_avg_diff"
            need = row[f"{k}_needs_seeds"]
            need_text = "–" if math.isnan(need) else ("> 1000" if math.isinf(need) else f"{need:.0f}")
            lines.append(
                f"| {row['setting']} | {row[k]:+.2f} {_ci(row[f'{k}_low'], row[f'{k}_high'])} | "
                f"{row[f'{k}_p']:.3g} | {row[f'{k}_detectable']:.2f} | {need_text} | "
                f"{_ci(row[f'{k}_boot_low'], row[f'{k}_boot_high'])} |"
            )
    if seeds:
        lines += [
            "",
            f"Paired difference of the average DSC to the {vs}, seed by seed:",
            "",
            "| setting | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|" + "---|" * (len(seeds) + 1),
        ]
        for row in [r for r in rows if "DSC_avg_diff" in r]:
            lines.append(
                f"| {row['setting']} | "
                + " | ".join(
                    f"{row[f'DSC_avg_diff_seed{s}']:+.2f}" if f"DSC_avg_diff_seed{s}" in row else "–" for s in seeds
                )
                + " |"
            )
    effects = summary.get("effects") or []
    if effects:
        ci = lambda e: f"{e.mean:+.2f} {_ci(e.low, e.high)} (p {e.p:.3g})"  # noqa: E731
        lines += [
            "",
            f"Each component's effect on the average DSC ({effects[0]['seeds']} seeds; "
            "paired differences with "
            "a 95 % interval over seeds and the sign-flip p): averaged over the four combinations of the other "
            "two components, and in the full model (full minus full without it):",
            "",
            "| component | averaged over the other two | in the full model |",
            "|---|---|---|",
        ]
        lines += [f"| {e['component']} | {ci(e['averaged'])} | {ci(e['in_full'])} |" for e in effects]
    against = "the baseline" if compared_to == "baseline" else f"the same setting of the {compared_to}"
    note = (
        "Mean ± std over seeds of the average over every modality combination of the test split (as the paper's "
        f"Table 3), compared with {against}. " + INTERVAL_NOTE
    )
    if summary.get("changes"):
        note += (
            " The runs differ from the reference in: "
            + ", ".join(f"{key} = {value}" for key, value in summary["changes"].items())
            + "."
        )
    if summary.get("unpaired"):
        note += " Without a counterpart (left out of Δ): " + ", ".join(summary["unpaired"]) + "."
    with open(os.path.join(out, "table3.md"), "w") as f:
        f.write(note + "\n\n" + "\n".join(lines) + "\n")
    _plot(rows, os.path.join(out, "table3.png"), vs)


def _ci(low: float, high: float) -> str:
    """``[low, high]`` with signs; ``[n/a]`` where one seed cannot give an interval."""
    return "[n/a]" if math.isnan(low) or math.isnan(high) else f"[{low:+.2f}, {high:+.2f}]"


def _plot(rows: Sequence[dict], path: str, vs: str = "baseline") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [r for r in rows if "DSC_avg_diff" in r]
    if not others:
        return
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(others) + 1.5))
    y = np.arange(len(others))
    mean = np.array([r["DSC_avg_diff"] for r in others])
    err = np.array([[m - r["DSC_avg_diff_low"], r["DSC_avg_diff_high"] - m] for m, r in zip(mean, others)]).T
    ax.errorbar(mean, y, xerr=np.nan_to_num(err), fmt="o", capsize=3)  # one seed: no interval
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(y, [r["setting"] for r in others])
    ax.set_xlabel(f"Δ average DSC vs {vs} [%] (95 % interval over seeds)")
    ax.set_title("Table 3 ablation: paired differences")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
