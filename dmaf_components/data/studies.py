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
"""Finding new studies for inference: BraTS-style folders with any subset of modality files, or 4-D NIfTIs."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence

from .constants import BRATS_FILE_SUFFIX, BRATS_MODALITIES, MYOPS_FILE_SUFFIX, MYOPS_MODALITIES, DMAFDataError

__all__ = ["find_studies", "check_output_dir"]


def _suffixes(modalities: Sequence[str]) -> dict[str, str]:
    if tuple(modalities) == BRATS_MODALITIES:
        return dict(BRATS_FILE_SUFFIX)
    if tuple(modalities) == MYOPS_MODALITIES:
        return dict(MYOPS_FILE_SUFFIX)
    return {m: m for m in modalities}


def find_studies(input_dir: str, modalities: Sequence[str] = BRATS_MODALITIES) -> list[dict]:
    """Studies below ``input_dir`` for inference.

    - a folder holding files ``<anything>_<suffix>.nii[.gz]`` for any subset of the modalities (BraTS suffixes
      flair/t1/t1ce/t2, MyoPS C0/DE/T2) is one study ``{"case": folder name, "image": {modality: path}}``;
    - every other ``.nii``/``.nii.gz`` file directly in ``input_dir`` is a 4-D study in canonical channel order.

    Segmentation files (``*_seg``, ``*_gd``, ``*Segm``) are ignored.
    """
    if not os.path.isdir(input_dir):
        raise DMAFDataError(f"{input_dir}: input folder not found")
    suffixes = _suffixes(modalities)
    pattern = re.compile(r"^(.*)_(" + "|".join(re.escape(s) for s in suffixes.values()) + r")\.nii(\.gz)?$")
    by_suffix = {v: k for k, v in suffixes.items()}
    studies = []
    for folder in sorted(d for d in glob.glob(os.path.join(input_dir, "*")) if os.path.isdir(d)):
        image = {}
        for path in sorted(glob.glob(os.path.join(folder, "*.nii*"))):
            match = pattern.match(os.path.basename(path))
            if match:
                image[by_suffix[match.group(2)]] = path
        if image:
            studies.append({"case": os.path.basename(folder), "image": image})
    skip = re.compile(r"(_seg|_gd|Segm)\.nii(\.gz)?$")
    for path in sorted(glob.glob(os.path.join(input_dir, "*.nii*"))):
        if os.path.isfile(path) and not skip.search(path):
            studies.append({"case": re.sub(r"\.nii(\.gz)?$", "", os.path.basename(path)), "image": path})
    if not studies:
        raise DMAFDataError(f"{input_dir}: no study found (study folders with modality files, or 4-D .nii.gz files)")
    return studies


def check_output_dir(output_dir: str, studies: Sequence[dict]) -> str:
    """Refuse an output folder that holds input files, so that no input can be overwritten. Returns it."""
    out = os.path.realpath(output_dir)
    for study in studies:
        paths = study["image"].values() if isinstance(study["image"], dict) else [study["image"]]
        for path in paths:
            if os.path.realpath(os.path.dirname(path)) == out:
                raise DMAFDataError(f"output_dir {output_dir}: holds input {path}; choose a separate output folder")
    os.makedirs(out, exist_ok=True)
    return output_dir
