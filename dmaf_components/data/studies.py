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

import logging
import os
from collections.abc import Sequence

from .constants import BRATS_MODALITIES, MODALITY_ALIASES, DMAFDataError
from .names import classify_files, is_label_file, is_nifti, nifti_stem

__all__ = ["find_studies", "check_output_dir", "STUDY_ERROR_KEY", "STUDY_NOTES_KEY"]

logger = logging.getLogger(__name__)

#: key of a study entry that cannot be used: one line naming the folder/file and what is wrong
STUDY_ERROR_KEY = "error"
#: key of a study entry's notes: one line per file of its folder that is not used
STUDY_NOTES_KEY = "notes"


def find_studies(input_dir: str, modalities: Sequence[str] = BRATS_MODALITIES, log: bool = True) -> list[dict]:
    """Studies below ``input_dir`` for inference.

    - every sub-folder (names starting with ``.`` aside) is one study ``{"case": folder name, "image": {modality:
      path}}`` made of its ``.nii``/``.nii.gz`` files whose names denote a modality, any subset of them
      (:func:`~dmaf_components.data.names.modality_of`: case-insensitive, with the aliases of real releases in
      ``MODALITY_ALIASES``, e.g. BraTS ``_flair/_t1/_t1ce/_t2``, ``-t2f/-t1n/-t1c/-t2w``, ``T1Gd``, MyoPS ``C0/DE/T2``);
    - every other ``.nii``/``.nii.gz`` file directly in ``input_dir`` is a 4-D study in canonical channel order
      (segmentation-like names, ``*_seg``, ``*_gd``, ``*Segm``..., are ignored and reported).

    Nothing is dropped silently. A NIfTI in a study folder that matches no modality is listed in the study's
    ``"notes"`` (and logged as a warning when ``log``). A study folder that cannot be used (no modality file, or two
    files for one modality) is kept with an ``"error"`` line, so that the caller reports it as a failed study; it is
    never skipped.

    Raises:
        DMAFDataError: ``input_dir`` is not a folder, or holds no study at all.
    """
    if not os.path.isdir(input_dir):
        raise DMAFDataError(f"{input_dir}: input folder not found")
    studies: list[dict] = []
    entries = sorted(os.listdir(input_dir))
    expected = ", ".join(f"*_{MODALITY_ALIASES.get(m, (m,))[0]}.nii.gz" for m in modalities)
    for name in entries:
        folder = os.path.join(input_dir, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        files = [os.path.join(folder, f) for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))]
        image, notes, errors = classify_files(files, modalities)
        study: dict = {"case": name, "image": image}
        if notes:
            study[STUDY_NOTES_KEY] = notes
        if errors:
            study[STUDY_ERROR_KEY] = errors[0]
        elif not image:
            others = sorted(os.path.basename(f) for f in files)
            found = f"holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}" if others else "is empty"
            study[STUDY_ERROR_KEY] = f"{folder}: no modality file (the folder {found}; expected {expected})"
        studies.append(study)
    for name in entries:
        path = os.path.join(input_dir, name)
        if name.startswith(".") or not os.path.isfile(path) or not is_nifti(name):
            continue
        if is_label_file(name):
            if log:
                logger.warning(f"{path}: ignored (a segmentation/label file, not a study)")
            continue
        studies.append({"case": nifti_stem(name), "image": path})
    if log:
        for study in studies:
            for note in study.get(STUDY_NOTES_KEY, []):
                logger.warning(note)
    if not studies:
        raise DMAFDataError(
            f"{input_dir}: no study found (expected study folders with modality files, or 4-D .nii.gz files)"
        )
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
