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
"""Full-study inference time: a 240 x 240 x 155 BraTS study, from loading the files to the saved label map.

Runs the bundle's own ``configs/inference.json`` (the same preprocessing, sliding-window inferer, Invertd and
SaveImaged a user gets) on one synthetic full-size study, with all four modalities and with only FLAIR + T1ce, and
prints the wall time of each (model weights are freshly initialised: timing does not depend on them).

    python benchmarks/inference.py                 # defaults: roi 128^3, overlap as in inference.json
    python benchmarks/inference.py --overlap 0.25
    for k in false true false true; do python benchmarks/inference.py --keep-freed-memory $k; done   # allocator A/B
    python benchmarks/inference.py --uncertainty off margin --rounds 2 --studies pair   # what the uncertainty costs

``--uncertainty`` runs each value in turn (``off``: the bundle's default; a measure: ``--save_uncertainty True
--uncertainty <measure>``, map and report written), alternating for ``--rounds`` rounds in this process, and prints
each one's time over ``off``'s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
from machine import machine_line

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: config's)")
    parser.add_argument("--roi", type=int, default=128)
    parser.add_argument(
        "--keep-freed-memory",
        default="true",
        choices=["true", "false"],
        help="the bundle key keep_freed_memory (glibc keeps freed memory; a fresh process per value)",
    )
    parser.add_argument(
        "--uncertainty",
        nargs="+",
        default=["off"],
        help="off and/or measures (margin entropy flips modalities), alternated",
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--studies",
        nargs="+",
        default=["all", "pair"],
        choices=["all", "pair"],
        help="all 4 modalities and/or FLAIR + T1ce",
    )
    args = parser.parse_args()

    from monai.bundle import ConfigWorkflow

    from dmaf_components.data import synthesize_brats
    from dmaf_components.networks import DMAFNet

    work = tempfile.mkdtemp(prefix="dmaf_infer_bench_")
    try:
        synthesize_brats(os.path.join(work, "src"), cases=1, seed=7)  # 240 x 240 x 155, 1 mm
        case = os.path.join(work, "src", "MICCAI_BraTS2020_TrainingData", "BraTS20_Training_001")
        os.makedirs(os.path.join(work, "root", "models"))
        torch.save(DMAFNet().state_dict(), os.path.join(work, "root", "models", "model.pt"))
        print(
            f"{machine_line()}; cuda {torch.cuda.is_available()}; roi {args.roi}^3; keep_freed_memory "
            f"{args.keep_freed_memory}"
        )
        chosen = {
            "all": ("all 4 modalities", ("flair", "t1", "t1ce", "t2")),
            "pair": ("FLAIR + T1ce", ("flair", "t1ce")),
        }
        for key in args.studies:
            label, modalities = chosen[key]
            studies = os.path.join(work, f"studies_{len(modalities)}", "study")
            os.makedirs(studies)
            for m in modalities:
                shutil.copy(os.path.join(case, f"BraTS20_Training_001_{m}.nii.gz"), studies)
            times: dict[str, list[float]] = {u: [] for u in args.uncertainty}
            for _ in range(args.rounds):
                for u in args.uncertainty:
                    out = os.path.join(work, f"out_{len(modalities)}_{u}")
                    shutil.rmtree(out, ignore_errors=True)
                    overrides = {
                        "dataset_dir": os.path.dirname(studies),
                        "bundle_root": os.path.join(work, "root"),
                        "output_dir": out,
                        "num_workers": 0,
                        "roi_size": [args.roi] * 3,
                        "keep_freed_memory": args.keep_freed_memory == "true",
                    }
                    if u != "off":
                        overrides.update(save_uncertainty=True, uncertainty=u)
                    if args.overlap is not None:
                        overrides["sw_overlap"] = args.overlap
                    start = time.perf_counter()
                    wf = ConfigWorkflow(
                        config_file=os.path.join(BUNDLE, "configs", "inference.json"),
                        workflow_type="infer",
                        **overrides,
                    )
                    wf.initialize()
                    wf.run()
                    wf.finalize()
                    elapsed = time.perf_counter() - start
                    times[u].append(elapsed)
                    saved = sorted(os.listdir(out))
                    print(
                        f"{label:<18} uncertainty {u:<10} {elapsed:6.1f} s from config to saved files "
                        f"({', '.join(saved)}); target <= 60 s on 2 cores",
                        flush=True,
                    )
            if len(args.uncertainty) > 1:
                base = statistics.median(times[args.uncertainty[0]])
                for u, t in times.items():
                    print(
                        f"{label:<18} uncertainty {u:<10} median {statistics.median(t):6.1f} s, "
                        f"x{statistics.median(t) / base:.3f} of {args.uncertainty[0]}"
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
