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
"""The README demo: the whole bundle on the embedded synthetic dataset, on CPU in minutes.

Steps (each printed as the command a user would type): generate the synthetic BraTS2020-layout set when it is not
there yet, write its IDT datalist, train briefly (``run training``), evaluate all 15 modality combinations
(``evaluate.json``), and segment a new study that has only FLAIR and T1ce (``inference.json``, with its snapshot
PNG: slices through the predicted tumour with the labels overlaid, and the uncertainty map and its row in the PNG).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

__all__ = ["run_demo", "DEMO_DATA", "DEMO_EPOCHS", "DEMO_OVERRIDES", "prepare_demo_data"]

BUNDLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
#: the demo's data: many small cases, so that even the rarest modality (T2, missing in 80 % of the training cases at
#: the paper's rates) is present in several training cases, with exact-count masks
DEMO_DATA = {"cases": 40, "shape": (64, 64, 48), "split": (28, 4, 8)}
#: the demo's training budget and the overrides of the bundle's defaults (which are the paper's: 128^3 patches,
#: lr 2e-4, 300 epochs): small patches centred on the tumour half the time, a higher learning rate, few epochs -- a
#: model that finds the tumour on 2 CPU cores in minutes. ``benchmarks/demo_seeds.sh`` trains with exactly these.
DEMO_EPOCHS = 25
DEMO_OVERRIDES = [
    "--roi_size",
    "[32,32,32]",
    "--patch_sampling",
    "foreground",
    "--foreground_ratio",
    "0.5",
    "--num_workers",
    "2",
    "--sw_overlap",
    "0.25",
    "--learning_rate",
    "0.001",
]


def _override(flag: str) -> str:
    """The value the demo gives a bundle key (``DEMO_OVERRIDES``)."""
    return DEMO_OVERRIDES[DEMO_OVERRIDES.index(flag) + 1]


def _run(cmd: list[str], cwd: str) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-6000:])
        raise SystemExit(f"[demo] failed: {' '.join(cmd[:6])} ... (exit {proc.returncode})")


def prepare_demo_data(data_dir: str) -> str:
    """Generate the demo's synthetic BraTS2020-layout set in ``data_dir`` (existing cases are reused) and its IDT
    datalist at the paper's missing rates (exact counts) when missing; returns the datalist's path."""
    from .data import build_datalist, synthesize_brats, write_datalist

    synthesize_brats(data_dir, cases=DEMO_DATA["cases"], shape=DEMO_DATA["shape"], seed=0)
    datalist = os.path.join(data_dir, "datalist.json")
    if not os.path.exists(datalist):
        write_datalist(build_datalist(data_dir, "brats", split=DEMO_DATA["split"], exact=True, seed=0), datalist)
    return datalist


def run_demo(data_dir: str = "data/demo_brats", work_dir: str = "runs/demo", epochs: int = DEMO_EPOCHS) -> None:
    """Run the demo; outputs go to ``work_dir`` (weights, TensorBoard logs, evaluation tables, segmentation)."""
    from .evaluation import format_table

    start = time.time()
    data_dir, work_dir = os.path.abspath(data_dir), os.path.abspath(work_dir)
    py = sys.executable
    print(f"[demo] 1/5 synthetic BraTS2020-layout dataset: {data_dir}")
    datalist = prepare_demo_data(data_dir)
    realised = json.load(open(datalist))["realised_missing_rates"]
    print(
        "[demo] 2/5 datalist with IDT masks, realised missing rates: "
        + ", ".join(f"{k} {v:.2f}" for k, v in realised.items())
    )

    root = os.path.join(work_dir, "bundle_root")
    os.makedirs(root, exist_ok=True)
    common = ["--dataset_dir", data_dir, "--bundle_root", root] + DEMO_OVERRIDES
    print(f"[demo] 3/5 training for {epochs} epochs (DMAF fusion, distillation, DTM)")
    _run(
        [
            py,
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            "configs/train.json",
            "--epochs",
            str(epochs),
            "--val_interval",
            str(max(1, epochs // 5)),
            "--overwrite",
            "True",
        ]  # a rerun retrains
        + common,
        BUNDLE_DIR,
    )

    print("[demo] 4/5 evaluation over all 15 modality combinations of the test split")
    _run(
        [py, "-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/evaluate.json']"] + common,
        BUNDLE_DIR,
    )
    result = json.load(open(os.path.join(root, "eval", "evaluation.json")))
    table = format_table(result["tables"]["raw"], result["regions"], f"Dice/HD95 on {result['cases']} test cases")

    print("[demo] 5/5 inference on a new study that has only FLAIR and T1ce")
    new_dir = os.path.join(work_dir, "new_studies")
    study = os.path.join(new_dir, "new_study")
    os.makedirs(study, exist_ok=True)
    test_case = json.load(open(datalist))["testing"][0]
    for modality in ("flair", "t1ce"):
        src = os.path.join(data_dir, test_case["image"][modality])
        shutil.copy(src, os.path.join(study, os.path.basename(src).replace(test_case["case"], "new_study")))
    seg_dir = os.path.join(work_dir, "segmentations")
    _run(
        [
            py,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.json",
            "--dataset_dir",
            new_dir,
            "--bundle_root",
            root,
            "--output_dir",
            seg_dir,
            "--roi_size",
            _override("--roi_size"),
            "--num_workers",
            "0",
            "--overwrite",
            "True",
            "--save_snapshot",
            "True",
            "--save_uncertainty",
            "True",
        ],
        BUNDLE_DIR,
    )  # --overwrite: a rerun replaces its own results (kept otherwise)

    print("\n" + table.strip())
    iterations = epochs * len(json.load(open(datalist))["training"])
    print(
        f"\n[demo] done in {time.time() - start:.0f} s. The table is the demo model's Dice (%) and HD95 (mm) on "
        f"{result['cases']} synthetic test cases, for each combination of present modalities, after {iterations} "
        "training iterations on small patches: it shows that the model learns, and is not comparable with the "
        "paper's BraTS2020 tables (real scans, 300 epochs of 128^3 patches). The project's measured evidence, over "
        "several seeds: docs/accuracy.md."
    )
    print(f"[demo] weights:        {os.path.join(root, 'models', 'model.pt')}")
    print(f"[demo] evaluation:     {os.path.join(root, 'eval', 'evaluation.csv')} (+ .json, _dice.png)")
    print(f"[demo] TensorBoard:    tensorboard --logdir {os.path.join(root, 'eval')}")
    print(f"[demo] segmentation:   {os.path.join(seg_dir, 'new_study_seg.nii.gz')}")
    print(f"[demo] picture:        {os.path.join(seg_dir, 'new_study_snapshot.png')} (open this first)")
    print(
        f"[demo] report:         {os.path.join(seg_dir, 'new_study_report.json')} (expected Dice from "
        f"{os.path.join(root, 'models', 'quality.json')}, advice on the missing modalities, uncertain volume)"
    )
    print(
        f"[demo] uncertainty:    {os.path.join(seg_dir, 'new_study_uncertainty.nii.gz')} (where the model is unsure; "
        "its row in the picture)"
    )
