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
"""How hard each modality combination of a synthetic MyoPS set is from the intensities alone, before any training.

A per-voxel quadratic discriminant (one Gaussian per class over the present modalities' z-scored intensities) is
fitted on half of the cases and scored on the other half: its Dice per class (LV blood pool, RV blood pool,
myocardium incl. edema and scar) says how much each combination's intensities tell, with no shape prior. A study
set is designed with it (docs/accuracy.md): single and rare-modality combinations should be clearly harder than the
full set. It never trains a network, so it cannot favour a setting.

    python benchmarks/study_difficulty.py --profile study --cases 12
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from dmaf_components.data.constants import MYOPS_MODALITIES
from dmaf_components.data.synthetic import myops_case

CLASSES = {"LVB": (500,), "RVB": (600,), "MYO": (200, 1220, 2221)}


def _features(images: dict, modalities) -> np.ndarray:
    out = []
    for m in modalities:
        v = images[m].astype(np.float64)
        nz = v[v > 0]
        out.append((v - nz.mean()) / (nz.std() + 1e-8))
    return np.stack([o.ravel() for o in out], 1)


def _target(label: np.ndarray) -> np.ndarray:
    y = np.zeros(label.size, dtype=np.int64)
    for k, values in enumerate(CLASSES.values(), start=1):
        y[np.isin(label.ravel(), values)] = k
    return y


def difficulty(profile: str, cases: int, shape, seed: int = 2026) -> dict[str, dict[str, float]]:
    data = [myops_case(shape, seed * 100003 + i, profile) for i in range(cases)]
    half = cases // 2
    out = {}
    for r in range(1, len(MYOPS_MODALITIES) + 1):
        for combo in itertools.combinations(MYOPS_MODALITIES, r):
            x_tr = np.concatenate([_features(im, combo) for im, _ in data[:half]])
            y_tr = np.concatenate([_target(lab) for _, lab in data[:half]])
            params = []
            for k in range(len(CLASSES) + 1):
                xk = x_tr[y_tr == k]
                cov = np.atleast_2d(np.cov(xk.T)) + 1e-6 * np.eye(len(combo))
                params.append((xk.mean(0), np.linalg.inv(cov), np.linalg.slogdet(cov)[1], np.log(len(xk) / len(x_tr))))
            dice = {name: [] for name in CLASSES}
            for images, lab in data[half:]:
                x, y = _features(images, combo), _target(lab)
                scores = np.stack([prior - 0.5 * logdet - 0.5 * np.einsum("ij,jk,ik->i", x - mu, inv, x - mu)
                                   for mu, inv, logdet, prior in params], 1)
                pred = scores.argmax(1)
                for k, name in enumerate(CLASSES, start=1):
                    denom = (pred == k).sum() + (y == k).sum()
                    dice[name].append(2.0 * ((pred == k) & (y == k)).sum() / denom if denom else 1.0)
            out["+".join(combo)] = {k: 100 * float(np.mean(v)) for k, v in dice.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="study")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 6])
    args = parser.parse_args()
    result = difficulty(args.profile, args.cases, tuple(args.shape))
    print(f"intensity-only Dice (QDA per voxel), profile {args.profile}, {args.cases} cases:")
    print(f"{'combination':<16}" + "".join(f"{c:>8}" for c in CLASSES) + f"{'avg':>8}")
    for combo, d in result.items():
        print(f"{combo:<16}" + "".join(f"{v:8.1f}" for v in d.values()) + f"{np.mean(list(d.values())):8.1f}")


if __name__ == "__main__":
    main()
