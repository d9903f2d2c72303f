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
PNG: slices through the predicted tumour with the labels overlaid).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

__all__ = ["run_demo", "DEMO_OVERRIDES"]

BUNDLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
#: small patches, a higher learning rate and few epochs: the pipeline on 2 CPU cores in minutes (the bundle's own
#: defaults are the paper's: 128^3 patches, lr 2e-4, 300 epochs)
DEMO_OVERRIDES = ["--roi_size", "[48,48,48]", "--num_workers", "2", "--sw_overlap", "0.25", "--learning_rate", "0.001"]


def _run(cmd: list[str], cwd: str) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-6000:])
        raise SystemExit(f"[demo] failed: {' '.join(cmd[:6])} ... (exit {proc.returncode})")


def run_demo(
    data_dir: str = "data/synthetic_brats",
    work_dir: str = "runs/demo",
    cases: int = 16,
    shape: tuple[int, int, int] = (80, 80, 56),
    epochs: int = 12,
) -> None:
    """Run the demo; outputs go to ``work_dir`` (weights, TensorBoard logs, evaluation tables, segmentation)."""
    from .data import build_datalist, synthesize_brats, write_datalist
    from .evaluation import format_table

    start = time.time()
    data_dir, work_dir = os.path.abspath(data_dir), os.path.abspath(work_dir)
    py = sys.executable
    print(f"[demo] 1/5 synthetic BraTS2020-layout dataset: {data_dir}")
    synthesize_brats(data_dir, cases=cases, shape=shape, seed=0)  # existing cases are reused
    datalist = os.path.join(data_dir, "datalist.json")
    if not os.path.exists(datalist):
        write_datalist(build_datalist(data_dir, "brats", split=(10, 2, 4), seed=0), datalist)
    realised = json.load(open(datalist))["realised_missing_rates"]
    print("[demo] 2/5 datalist with IDT masks, realised missing rates: "
          + ", ".join(f"{k} {v:.2f}" for k, v in realised.items()))

    root = os.path.join(work_dir, "bundle_root")
    os.makedirs(root, exist_ok=True)
    common = ["--dataset_dir", data_dir, "--bundle_root", root] + DEMO_OVERRIDES
    print(f"[demo] 3/5 training for {epochs} epochs (DMAF fusion, distillation, DTM)")
    _run([py, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json", "--max_epochs",
          str(epochs), "--val_interval", str(max(1, epochs // 3)), "--overwrite", "True"]  # a rerun retrains
         + common, BUNDLE_DIR)

    print("[demo] 4/5 evaluation over all 15 modality combinations of the test split")
    _run([py, "-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/evaluate.json']"] + common,
         BUNDLE_DIR)
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
    _run([py, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--dataset_dir", new_dir,
          "--bundle_root", root, "--output_dir", seg_dir, "--roi_size", "[48,48,48]", "--num_workers", "0",
          "--overwrite", "True", "--save_snapshot", "True"],  # a rerun replaces its own results (kept otherwise)
         BUNDLE_DIR)

    print("\n" + table.strip())
    print(f"\n[demo] done in {time.time() - start:.0f} s. This checks the pipeline end to end; it does not measure the "
          "model: 120 training iterations give very different models from seed to seed (average WT Dice 4 to 58 over "
          "six runs, docs/performance.md), and nothing here is comparable with the paper's tables.")
    print(f"[demo] weights:        {os.path.join(root, 'models', 'model.pt')}")
    print(f"[demo] evaluation:     {os.path.join(root, 'eval', 'evaluation.csv')} (+ .json, _dice.png)")
    print(f"[demo] TensorBoard:    tensorboard --logdir {os.path.join(root, 'eval')}")
    print(f"[demo] segmentation:   {os.path.join(seg_dir, 'new_study_seg.nii.gz')}")
    print(f"[demo] picture:        {os.path.join(seg_dir, 'new_study_snapshot.png')} (open this first)")
    print(f"[demo] report:         {os.path.join(seg_dir, 'new_study_report.json')} (expected Dice from "
          f"{os.path.join(root, 'models', 'quality.json')}, advice on the missing modalities)")
