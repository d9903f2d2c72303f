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
"""Where a trained DMAF fusion puts its weight: the modality weights a_m (paper Eq. 3) of an ablation study's DMAF
runs, inside the ground-truth regions of the test split, with all modalities present.

For each run of the given settings (``runs/<setting>/seed<k>/models/model.pt``) it runs the bundle's own inference
(``configs/inference.json`` with ``--save_weights True``, the first fusion level, sliding windows of ``--roi``) on
every test case with every modality, and prints the mean weight of each modality inside the ground truth's
edema-only voxels (label 2), tumour core (1, 4), enhancing tumour (4) and the rest of the brain (non-zero, label 0),
averaged over cases, per run and over seeds. A uniform fusion would give 1/M everywhere.

    python benchmarks/study_weights.py studies/brats_baseline_full --settings dmaf,full --roi 64
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import nibabel as nib
import numpy as np

REGIONS = {"edema": (2,), "core": (1, 4), "enhancing": (4,), "brain": (0,)}
BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")


def run_weights(model: str, cases: list[dict], roi: int, work: str, data_dir: str) -> dict[str, np.ndarray]:
    """``{region: (cases, M)}`` mean weight per modality inside each ground-truth region."""
    from monai.bundle import ConfigWorkflow

    data = [{"case": c["case"], "image": c["image"]} for c in cases]
    wf = ConfigWorkflow(
        config_file=os.path.join(BUNDLE, "configs", "inference.json"),
        workflow_type="infer",
        logging_file=False,
        bundle_root=BUNDLE,
        data=data,
        dataset_dir=data_dir,
        output_dir=work,
        checkpoint=model,
        roi_size=[roi] * 3,
        save_weights=True,
        overwrite=True,
        num_workers=0,
    )
    wf.initialize()
    wf.run()
    out: dict[str, list] = {r: [] for r in REGIONS}
    for c in cases:
        w = np.asarray(nib.load(os.path.join(work, f"{c['case']}_modality_weights.nii.gz")).dataobj)
        label = np.asarray(nib.load(c["label"]).dataobj)
        brain = np.asarray(nib.load(next(iter(c["image"].values()))).dataobj) != 0
        for region, values in REGIONS.items():
            inside = np.isin(label, values) & (brain if region == "brain" else True)
            out[region].append(w[inside].mean(axis=0) if inside.any() else np.full(w.shape[-1], np.nan))
    return {r: np.array(v) for r, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("--settings", default="dmaf,full")
    parser.add_argument("--roi", type=int, default=64)
    args = parser.parse_args()
    first = json.load(
        open(
            next(
                os.path.join(args.study, "runs", s, d, "record.json")
                for s in args.settings.split(",")
                for d in sorted(os.listdir(os.path.join(args.study, "runs", s)))
                if os.path.isfile(os.path.join(args.study, "runs", s, d, "record.json"))
            )
        )
    )
    with open(first["datalist"]) as f:
        datalist = json.load(f)
    base = os.path.dirname(first["datalist"])
    modalities = ("flair", "t1", "t1ce", "t2")
    cases = []
    for e in datalist["testing"]:
        image = e["image"]
        paths = image if isinstance(image, dict) else dict(zip(modalities, image))
        cases.append(
            {
                "case": e.get("case", os.path.basename(os.path.dirname(paths["flair"]))),
                "image": {m: os.path.join(base, p) for m, p in paths.items()},
                "label": os.path.join(base, e["label"]),
            }
        )
    print(
        f"study {args.study}: {len(cases)} test cases, all modalities; weights of the first DMAF level "
        f"(FLAIR, T1, T1ce, T2), mean over each case's voxels of the region, then over cases"
    )
    for setting in args.settings.split(","):
        per_seed = []
        for d in sorted(os.listdir(os.path.join(args.study, "runs", setting))):
            model = os.path.join(args.study, "runs", setting, d, "models", "model.pt")
            if not os.path.isfile(model):
                continue
            with tempfile.TemporaryDirectory() as work:
                res = run_weights(model, cases, args.roi, work, base)
            per_seed.append(res)
            print(
                f"{setting} {d}: "
                + "; ".join(f"{r} " + " ".join(f"{v:.3f}" for v in np.nanmean(res[r], axis=0)) for r in REGIONS)
            )
        if per_seed:
            print(
                f"{setting} over {len(per_seed)} seeds: "
                + "; ".join(
                    f"{r} "
                    + " ".join(f"{v:.3f}" for v in np.mean([np.nanmean(p[r], axis=0) for p in per_seed], axis=0))
                    for r in REGIONS
                )
            )


if __name__ == "__main__":
    main()
