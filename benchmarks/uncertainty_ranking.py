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
"""Which per-voxel uncertainty ranks a model's wrong voxels best, per modality combination, and at what cost.

Trained models of a ``dmaf ablation`` study (default: study 1, the 2-D MyoPS layout, ``studies/myops_table3``) are
run on the study's test split exactly as its evaluation runs them (``train.json`` + ``train_myops.json`` with the
run's recorded overrides: the same preprocessing, crop and slice inferer; every modality combination, the missing
channels zeroed). For every voxel, four scores in [0, 1] (``dmaf_components.uncertainty``):

- ``entropy``: entropy of the fused softmax / log K;
- ``margin``: 1 - (the largest fused probability - the second largest);
- ``modalities``: 1 - the mean probability that the present modalities' own decoders (D_s on each) give the label
  written (the fused argmax);
- ``flips``: 1 - the mean probability that the predictions of the input flipped along every subset of the in-plane
  axes (4 in 2-D, identity included) give the label written;
- ``flips_entropy``: entropy of that mean flipped prediction / log K.

Per combination, pooled over the test cases, on the voxels of a band (the predicted or true foreground, dilated by
``--band`` voxels in-plane, a square neighbourhood; the band holds every wrong voxel, and leaves out the easy
background far from the heart that would inflate every AUROC alike) and, for comparison, on the whole crop the
network saw:

- AUROC of the score against voxel error (predicted label != true label; ties count half);
- the error rate among the most uncertain ``--top`` (5 %) of the voxels against the rest, and the share of all errors
  they hold;
- per score, the error rate and the share of voxels and of errors above thresholds 0.1 ... 0.9 (all combinations
  pooled), from which a threshold for "uncertain" is chosen.

Each model's Dice per combination is printed beside the study's recorded one (the network is built as trained).
Then the cost: the test cases with every combination, plain inference against each score's inference (interleaved,
``--rounds`` rounds, median seconds per case).

    python benchmarks/uncertainty_ranking.py --settings full --bundle-studies 2 --bundle-measures margin flips \
        | tee benchmarks/results/uncertainty_ranking_myops.txt
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from machine import cpu_model, load_average  # noqa: E402  (benchmarks/machine.py, beside this script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(ROOT, "bundle")
SCORES = ("entropy", "margin", "modalities", "flips", "flips_entropy")
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class ModalityScore(nn.Module):
    """What inference with the ``modalities`` score computes: fused logits and the mean modality softmax."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        from dmaf_components.uncertainty import modality_probabilities

        pred = self.net.forward_with_modality_logits(x, modality_mask)
        return torch.cat([pred.logits.float(), modality_probabilities(pred.modality_logits, pred.modality_mask)], 1)


class FlipScore(nn.Module):
    """What inference with the ``flips`` scores computes: fused logits and the mean flip softmax."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        from dmaf_components.uncertainty import flip_probabilities

        logits = self.net(x, modality_mask)
        return torch.cat([logits.float(), flip_probabilities(self.net, x, modality_mask, logits=logits)], 1)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` (Mann-Whitney U with mid-ranks: ties count half)."""
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def top_fraction(scores: np.ndarray, error: np.ndarray, fraction: float) -> tuple[float, float, float]:
    """Error rate among the ``fraction`` most uncertain voxels (ties at the cut broken by position), in the rest, and
    the share of all errors in the top."""
    k = max(1, int(math.ceil(fraction * scores.size)))
    order = np.argsort(-scores, kind="stable")
    top = np.zeros(scores.size, dtype=bool)
    top[order[:k]] = True
    errors = max(int(error.sum()), 1)
    rest = error[~top]
    return float(error[top].mean()), float(rest.mean()) if rest.size else float("nan"), float(error[top].sum() / errors)


def dice(pred: torch.Tensor, label: torch.Tensor, regions: dict) -> list[float]:
    out = []
    for classes in regions.values():
        p, t = torch.isin(pred, torch.tensor(classes)), torch.isin(label, torch.tensor(classes))
        denom = int(p.sum() + t.sum())
        out.append(200.0 * int((p & t).sum()) / denom if denom else float("nan"))
    return out


def build(run_dir: str, data_dir: str, datalist: str):
    """The run's network (weights loaded strictly), preprocessing and inferer, from its record's overrides."""
    from monai.bundle import ConfigParser

    record = json.load(open(os.path.join(run_dir, "record.json")))
    overrides = record["overrides"]
    parser = ConfigParser()
    parser.read_config([os.path.join(BUNDLE, "configs", c) for c in ("train.json", "train_myops.json")])
    parser.update(
        {
            "bundle_root": run_dir,
            "dataset_dir": data_dir,
            "datalist": datalist,
            "num_workers": 0,
            **{
                k: v
                for k, v in overrides.items()
                if k in ("fusion", "roi_size", "crop_size", "channels", "token_grid", "num_layers", "num_heads")
            },
        }
    )
    net = parser.get_parsed_content("network_def")
    state = torch.load(os.path.join(run_dir, "models", "model.pt"), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    net.eval()
    return (
        record,
        net,
        parser.get_parsed_content("validate#preprocessing"),
        parser.get_parsed_content("validate#inferer"),
        parser.get_parsed_content("modalities"),
    )


def band_mask(pred: torch.Tensor, label: torch.Tensor, radius: int) -> torch.Tensor:
    """``(H, W, D)`` bool: predicted or true foreground, dilated in-plane by ``radius`` (square neighbourhood)."""
    fg = ((pred > 0) | (label > 0)).float().permute(2, 0, 1)[:, None]  # (D, 1, H, W)
    return F.max_pool2d(fg, 2 * radius + 1, stride=1, padding=radius)[:, 0].permute(1, 2, 0) > 0


def case_scores(model, case: dict, combos, args, regions, group: str) -> dict[str, np.ndarray]:
    """One test case's scores, every combination: ``group`` ``base`` (entropy, modalities: one pass of
    :class:`ModalityScore`) or ``flips`` (flips, flips_entropy: :class:`FlipScore`). Kept in ``--cache`` per case, so
    that an interrupted run goes on where it stopped.

    Returns:
        ``{"<combination>|<score or error>|<band or crop>": values, "<combination>|dice": (3,)}``.
    """
    from dmaf_components.uncertainty import label_disagreement, margin_uncertainty, normalized_entropy

    record, net, preprocessing, inferer = model()
    wrapper = (ModalityScore(net) if group == "base" else FlipScore(net)).eval()
    item = preprocessing(dict(case))
    image, label = item["image"].as_tensor()[None], item["label"].as_tensor()[0].long()
    out: dict[str, np.ndarray] = {}
    for name, pattern in combos:
        mask = torch.tensor([pattern])
        x = image * mask.float().reshape(1, -1, 1, 1, 1)
        with torch.no_grad():
            y = inferer(x, wrapper, modality_mask=mask)
        k = y.shape[1] // 2
        logits, probs = y[:, :k], y[:, k:]
        pred = logits.argmax(1)[0]
        if group == "base":
            scores = {
                "entropy": normalized_entropy(logits),
                "margin": margin_uncertainty(logits),
                "modalities": label_disagreement(logits, probs),
            }
        else:
            entropy = -(probs.clamp_min(1e-12).log() * probs).sum(1, keepdim=True) / math.log(k)
            scores = {"flips": label_disagreement(logits, probs), "flips_entropy": entropy.clamp(0, 1)}
        band = band_mask(pred, label, args.band)
        error = pred != label
        for score, v in list(scores.items()) + [("error", error[None, None])]:
            v = v[0, 0].numpy()
            out[f"{name}|{score}|band"] = v[band.numpy()]
            out[f"{name}|{score}|crop"] = v.reshape(-1)
        out[f"{name}|dice"] = np.asarray(dice(pred, label, regions))
    return out


def measure_model(run_dir, args, cases, combos, regions, groups: Sequence[str]) -> dict:
    """Pool the cases' scores per combination (cached per case and group) and rank."""
    built: list = []

    def model():
        if not built:
            record, net, preprocessing, inferer, _ = build(run_dir, args.data, args.datalist)
            built.append((record, net, preprocessing, inferer))
        return built[0]

    tag = "_".join(os.path.normpath(run_dir).split(os.sep)[-2:])
    folder = os.path.join(args.cache, tag)
    os.makedirs(folder, exist_ok=True)
    per_case = []
    for c, case in enumerate(cases):
        values: dict[str, np.ndarray] = {}
        for group in groups:
            path = os.path.join(folder, f"{case['case']}_{group}_band{args.band}.npz")
            if os.path.isfile(path):
                with np.load(path) as f:
                    got = dict(f)
            else:
                print(f"  {tag} case {c + 1}/{len(cases)} {case['case']} {group}", file=sys.stderr, flush=True)
                got = case_scores(model, case, combos, args, regions, group)
                tmp = path + ".tmp.npz"
                np.savez(tmp, **got)
                os.replace(tmp, path)
            for key, v in got.items():
                if key.split("|")[1] in ("error", "dice") and key in values:
                    assert np.array_equal(values[key], v), f"{key}: the groups' predictions differ"
                values[key] = v
        per_case.append(values)
    scores_used = tuple(s for s in SCORES if f"{combos[0][0]}|{s}|band" in per_case[0])
    record = json.load(open(os.path.join(run_dir, "record.json")))
    result = {"record": record, "combinations": {}, "scores": scores_used}
    for name, _ in combos:
        entry = {"dice": float(np.nanmean(np.stack([v[f"{name}|dice"] for v in per_case]))), "sets": {}}
        for where in ("band", "crop"):
            error = np.concatenate([v[f"{name}|error|{where}"] for v in per_case]).astype(bool)
            per = {"voxels": int(error.size), "error_rate": float(error.mean())}
            for score in scores_used:
                u = np.concatenate([v[f"{name}|{score}|{where}"] for v in per_case])
                top, rest, share = top_fraction(u, error, args.top)
                per[score] = {"auroc": auroc(u, error), "top": top, "rest": rest, "share": share}
                if where == "band":
                    per[score]["values"] = u
            per["error"] = error
            entry["sets"][where] = per
        result["combinations"][name] = entry
    return result


def report_model(label: str, result: dict, args) -> None:
    recorded = {row["combination"]: row["dice_avg"] for row in result["record"]["evaluation"]["tables"]["raw"]}
    print(f"\n## {label} (code {result['record']['code_commit'][:7]}, seed {result['record']['seed']})")
    print(
        f"{'combination':<16}{'Dice':>7}{'rec.':>7}  {'set':<5}{'voxels':>8}{'err %':>7}  "
        + "  ".join(f"{s + ' AUROC top/rest % (share)':>40}" for s in result["scores"])
    )
    for name, entry in result["combinations"].items():
        for where in ("band", "crop"):
            per = entry["sets"][where]
            head = (
                f"{name:<16}{entry['dice']:7.2f}{recorded.get(name, float('nan')):7.2f}  "
                if where == "band"
                else " " * 30 + "  "
            )
            cells = "  ".join(
                f"{per[s]['auroc']:>10.3f} {100 * per[s]['top']:6.1f}/{100 * per[s]['rest']:5.2f} "
                f"({100 * per[s]['share']:4.1f} % of errors)"
                for s in result["scores"]
            )
            print(f"{head}{where:<5}{per['voxels']:>8}{100 * per['error_rate']:7.2f}  {cells}")


def report_thresholds(label: str, results: Sequence[dict]) -> None:
    print(f"\n### {label}: above a threshold (band voxels, all combinations and models pooled)")
    print(f"{'score':<14}{'t':>5}{'voxels %':>10}{'error % above':>15}{'errors caught %':>17}{'error % below':>15}")
    for s in results[0]["scores"]:
        v = np.concatenate([e["sets"]["band"][s]["values"] for r in results for e in r["combinations"].values()])
        err = np.concatenate([e["sets"]["band"]["error"] for r in results for e in r["combinations"].values()])
        for t in THRESHOLDS:
            above = v >= t
            n = int(above.sum())
            print(
                f"{s:<14}{t:5.1f}{100 * above.mean():10.2f}"
                f"{(100 * err[above].mean() if n else float('nan')):15.1f}"
                f"{100 * err[above].sum() / max(int(err.sum()), 1):17.1f}"
                f"{(100 * err[~above].mean() if n < v.size else float('nan')):15.2f}"
            )


def summary(label: str, results: Sequence[dict]) -> None:
    print(f"\n### {label}: range over combinations (and models)")
    print(
        f"{'score':<14}{'band AUROC min':>15}{'median':>8}{'max':>8}{'crop AUROC min':>16}{'median':>8}{'max':>8}"
        f"{'top-5% err %':>14}{'rest err %':>12}{'lift':>7}   (band, medians)"
    )
    entries = [e for r in results for e in r["combinations"].values()]
    for s in results[0]["scores"]:
        band = [e["sets"]["band"][s]["auroc"] for e in entries]
        crop = [e["sets"]["crop"][s]["auroc"] for e in entries]
        top = [e["sets"]["band"][s]["top"] for e in entries]
        rest = [e["sets"]["band"][s]["rest"] for e in entries]
        lift = [t / r_ if r_ > 0 else float("inf") for t, r_ in zip(top, rest)]
        print(
            f"{s:<14}{min(band):15.3f}{statistics.median(band):8.3f}{max(band):8.3f}{min(crop):16.3f}"
            f"{statistics.median(crop):8.3f}{max(crop):8.3f}{100 * statistics.median(top):14.1f}"
            f"{100 * statistics.median(rest):12.2f}{statistics.median(lift):7.1f}"
        )
    if len(results) > 1:  # per model: each combination's best score, and the mean band AUROC per score
        print(
            f"{'model (seed)':<14}"
            + "".join(f"{s:>15}" for s in results[0]["scores"])
            + "   mean band AUROC over combinations"
        )
        for r in results:
            print(
                f"{r['record']['seed']:<14}"
                + "".join(
                    f"{statistics.mean(e['sets']['band'][s]['auroc'] for e in r['combinations'].values()):15.3f}"
                    for s in r["scores"]
                )
            )


def timing(run_dir: str, args, cases, combos) -> None:
    from dmaf_components.uncertainty import margin_uncertainty, normalized_entropy

    _, net, preprocessing, inferer, _ = build(run_dir, args.data, args.datalist)
    variants = {
        "plain": (net, None),
        "margin": (net, margin_uncertainty),
        "entropy": (net, normalized_entropy),
        "modalities": (ModalityScore(net).eval(), None),
        "flips": (FlipScore(net).eval(), None),
    }
    items = [preprocessing(dict(c)) for c in cases[: args.timing_cases]]
    inputs = []
    for item in items:
        image = item["image"].as_tensor()[None]
        for _, pattern in combos:
            mask = torch.tensor([pattern])
            inputs.append((image * mask.float().reshape(1, -1, 1, 1, 1), mask))
    times: dict[str, list[float]] = {v: [] for v in variants}
    with torch.no_grad():
        inferer(inputs[0][0], net, modality_mask=inputs[0][1])  # warm-up
        for _ in range(args.rounds):
            for name, (model, post) in variants.items():
                start = time.perf_counter()
                for x, mask in inputs:
                    out = inferer(x, model, modality_mask=mask)
                    if post is not None:
                        post(out)
                times[name].append((time.perf_counter() - start) / len(inputs))
    base = statistics.median(times["plain"])
    print(
        f"\n## cost ({len(items)} test cases x {len(combos)} combinations, {args.rounds} interleaved rounds, "
        f"seconds per case-combination, median; each round: {', '.join(variants)})"
    )
    for name, t in times.items():
        med = statistics.median(t)
        print(f"{name:<12}{med:8.3f} s  x{med / base:5.2f} of plain  (rounds: {', '.join(f'{v:.3f}' for v in t)})")


def bundle_timing(run_dir: str, args, cases) -> None:
    """The bundle's own 2-D inference (``inference.json`` + ``inference_myops.json``, files to files) on the first
    ``--bundle-studies`` test studies, uncertainty off against on (each measure), alternating, in this process."""
    import logging
    import shutil

    from monai.bundle import ConfigWorkflow

    record = json.load(open(os.path.join(run_dir, "record.json")))
    overrides = record["overrides"]
    work = tempfile.mkdtemp(prefix="dmaf_uncertainty_bench_")
    logging.getLogger("dmaf_components").setLevel(logging.WARNING)
    try:
        studies = os.path.join(work, "in")
        os.makedirs(studies)
        for case in cases[: args.bundle_studies]:
            for path in case["image"].values():
                os.symlink(path, os.path.join(studies, os.path.basename(path)))
        configs = [os.path.join(BUNDLE, "configs", c) for c in ("inference.json", "inference_myops.json")]
        variants = [("off", {})] + [(m, {"save_uncertainty": True, "uncertainty": m}) for m in args.bundle_measures]
        times: dict[str, list[float]] = {name: [] for name, _ in variants}
        for _ in range(args.rounds):
            for name, extra in variants:
                out = os.path.join(work, "out")
                shutil.rmtree(out, ignore_errors=True)
                wf = ConfigWorkflow(
                    config_file=configs,
                    workflow_type="infer",
                    logging_file=False,
                    bundle_root=BUNDLE,
                    dataset_dir=studies,
                    output_dir=out,
                    checkpoint=os.path.join(run_dir, "models", "model.pt"),
                    roi_size=overrides["roi_size"],
                    crop_size=overrides["crop_size"],
                    fusion=overrides["fusion"],
                    num_workers=0,
                    **extra,
                )
                wf.initialize()
                start = time.perf_counter()
                wf.run()
                times[name].append(time.perf_counter() - start)
                files = sorted(os.listdir(out))
        print(
            f"\n## bundle inference, files to files ({args.bundle_studies} studies, all 3 modalities, "
            f"{args.rounds} alternating rounds, seconds per run; the last run wrote {len(files)} files)"
        )
        base = statistics.median(times["off"])
        for name, t in times.items():
            med = statistics.median(t)
            print(f"{name:<12}{med:8.2f} s  x{med / base:5.3f} of off  (rounds: {', '.join(f'{v:.2f}' for v in t)})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=os.path.join(ROOT, "studies", "myops_table3"))
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "study_myops"))
    parser.add_argument("--datalist", default=None, help="default: <data>/datalist.json")
    parser.add_argument("--settings", nargs="+", default=["full"])
    parser.add_argument(
        "--seeds", nargs="*", type=int, default=None, help="default: every seed of the setting with a models/model.pt"
    )
    parser.add_argument("--cases", type=int, default=None, help="first N test cases (default all)")
    parser.add_argument("--band", type=int, default=5)
    parser.add_argument("--top", type=float, default=0.05)
    parser.add_argument("--timing-cases", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-flips", action="store_true", help="rank the base scores only (3x cheaper)")
    parser.add_argument(
        "--cache",
        default=os.path.join(tempfile.gettempdir(), "uncertainty_ranking_cache"),
        help="per-case scores, kept so that an interrupted run goes on where it stopped",
    )
    parser.add_argument(
        "--bundle-studies",
        type=int,
        default=0,
        help="also time the bundle's inference on this many test studies, uncertainty off and on",
    )
    parser.add_argument("--bundle-measures", nargs="+", default=["margin"])
    parser.add_argument("--only-timing", action="store_true", help="skip the ranking (timing of the first model)")
    args = parser.parse_args()
    args.datalist = args.datalist or os.path.join(args.data, "datalist.json")

    from dmaf_components.data import load_datalist
    from dmaf_components.evaluation import REGIONS, combination_name, modality_combinations

    cases = load_datalist(args.datalist, "testing", args.data)[: args.cases]
    modalities = json.load(open(args.datalist))["modalities"]
    combos = [(combination_name(p, modalities), p) for p in modality_combinations(len(modalities))]
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), load average {load_average()} (other jobs were running)"
    )
    print(
        f"data: {args.datalist}, testing split, {len(cases)} cases; modalities {modalities}; {len(combos)} combinations"
    )
    print(
        f"voxel sets: band = predicted or true foreground dilated by {args.band} voxels in-plane (square); "
        f"crop = the whole crop the network saw. top = the {100 * args.top:g} % most uncertain voxels"
    )
    print("Dice = this run's mean region Dice (LVB, RVB, MYO) per combination; rec. = the study's recorded one")
    first = None
    for setting in args.settings:
        runs = sorted(glob.glob(os.path.join(args.study, "runs", setting, "seed*", "models", "model.pt")))
        seeds = {int(p.split(os.sep)[-3][4:]): os.path.dirname(os.path.dirname(p)) for p in runs}
        chosen = sorted(seeds) if args.seeds is None else [s for s in args.seeds if s in seeds]
        results = []
        if args.only_timing:
            first = first or (seeds[chosen[0]] if chosen else None)
            chosen = []
        for seed in chosen:
            start = time.perf_counter()
            groups = ("base",) if args.no_flips else ("base", "flips")
            result = measure_model(seeds[seed], args, cases, combos, REGIONS["myops"], groups)
            report_model(f"{setting} seed {seed}: {seeds[seed]}/models/model.pt", result, args)
            print(f"({time.perf_counter() - start:.0f} s)")
            results.append(result)
            first = first or seeds[seed]
        if results:
            label = f"{setting}, {len(results)} model(s), seeds {chosen}"
            if len(results) == 1:
                label += " (one trained model: one seed's answer)"
            summary(label, results)
            report_thresholds(label, results)
    if first is not None and not args.no_timing:
        timing(first, args, cases, combos)
    if first is not None and args.bundle_studies:
        bundle_timing(first, args, cases)
    print(f"\nload average at the end {load_average()}")


if __name__ == "__main__":
    main()
