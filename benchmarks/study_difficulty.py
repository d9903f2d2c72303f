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
"""How hard each modality combination of a synthetic study set is from the intensities alone, before any training.

A per-voxel quadratic discriminant (one Gaussian per label over the present modalities' z-scored intensities) is
fitted on half of the cases and scored on the other half: its Dice per region (MyoPS: LV blood pool, RV blood pool,
myocardium incl. edema and scar; BraTS: whole tumour, tumour core, enhancing tumour) says how much each
combination's intensities tell, with no shape prior. A study set is designed with it (docs/accuracy.md): single and
rare-modality combinations should be clearly harder than the full set. It never trains a network, so it cannot
favour a setting.

    python benchmarks/study_difficulty.py --dataset myops --profile study --cases 12
    python benchmarks/study_difficulty.py --dataset brats --profile study --cases 8 --shape 96 96 64
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from dmaf_components.data.constants import BRATS_MODALITIES, MYOPS_MODALITIES
from dmaf_components.data.synthetic import brats_case, myops_case

#: per dataset: case generator, modalities, the classifier's classes (label values each) and the scored regions
#: (classes each); BraTS is scored inside the brain (skull-stripped: zero outside), MyoPS over the whole slice
DATASETS = {
    "myops": (
        myops_case,
        MYOPS_MODALITIES,
        ((0,), (500,), (600,), (200, 1220, 2221)),
        {"LVB": (1,), "RVB": (2,), "MYO": (3,)},
    ),
    "brats": (brats_case, BRATS_MODALITIES, ((0,), (1,), (2,), (4,)), {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}),
}


def _target(label: np.ndarray, classes) -> np.ndarray:
    y = np.zeros(label.size, dtype=np.int64)
    for k, values in enumerate(classes):
        y[np.isin(label.ravel(), values)] = k
    return y


def _features(images: dict, modalities) -> np.ndarray:
    out = []
    for m in modalities:
        v = images[m].astype(np.float64)
        nz = v[v > 0]
        out.append((v - nz.mean()) / (nz.std() + 1e-8))
    return np.stack([o.ravel() for o in out], 1)


def difficulty(dataset: str, profile: str, cases: int, shape, seed: int = 2026) -> dict[str, dict[str, float]]:
    make, modalities, classes, regions = DATASETS[dataset]
    data = [make(shape, seed * 100003 + i + (dataset == "brats"), profile) for i in range(cases)]  # the sets' seeds
    half = cases // 2
    brain = [
        np.any([im[m] > 0 for m in modalities], 0).ravel() if dataset == "brats" else slice(None) for im, _ in data
    ]
    out = {}
    for r in range(1, len(modalities) + 1):
        for combo in itertools.combinations(modalities, r):
            x_tr = np.concatenate([_features(im, combo)[b] for (im, _), b in zip(data[:half], brain[:half])])
            y_tr = np.concatenate([_target(lab, classes)[b] for (_, lab), b in zip(data[:half], brain[:half])])
            params = []
            for k in range(len(classes)):
                xk = x_tr[y_tr == k]
                cov = np.atleast_2d(np.cov(xk.T)) + 1e-6 * np.eye(len(combo))
                params.append((xk.mean(0), np.linalg.inv(cov), np.linalg.slogdet(cov)[1], np.log(len(xk) / len(x_tr))))
            dice = {name: [] for name in regions}
            for (images, lab), b in zip(data[half:], brain[half:]):
                x, y = _features(images, combo)[b], _target(lab, classes)[b]
                scores = np.stack(
                    [
                        prior - 0.5 * logdet - 0.5 * np.einsum("ij,jk,ik->i", x - mu, inv, x - mu)
                        for mu, inv, logdet, prior in params
                    ],
                    1,
                )
                pred = scores.argmax(1)
                for name, values in regions.items():
                    p, t = np.isin(pred, values), np.isin(y, values)
                    denom = p.sum() + t.sum()
                    dice[name].append(2.0 * (p & t).sum() / denom if denom else 1.0)
            out["+".join(combo)] = {k: 100 * float(np.mean(v)) for k, v in dice.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="myops")
    parser.add_argument("--profile", default="study")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 6])
    args = parser.parse_args()
    result = difficulty(args.dataset, args.profile, args.cases, tuple(args.shape))
    regions = DATASETS[args.dataset][3]
    print(f"intensity-only Dice (QDA per voxel), {args.dataset}, profile {args.profile}, {args.cases} cases:")
    print(f"{'combination':<22}" + "".join(f"{c:>8}" for c in regions) + f"{'avg':>8}")
    for combo, d in result.items():
        print(f"{combo:<22}" + "".join(f"{v:8.1f}" for v in d.values()) + f"{np.mean(list(d.values())):8.1f}")


if __name__ == "__main__":
    main()
