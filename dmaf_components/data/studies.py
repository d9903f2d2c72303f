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

import errno
import logging
import os
import re
from collections.abc import Mapping, Sequence

from .constants import BRATS_MODALITIES, MODALITY_ALIASES, DMAFDataError
from .formats import SERIES_POSTFIX, DicomSeries, has_dicom_files, list_dicom_series
from .names import (
    case_of,
    classify_files,
    image_stem,
    is_image_file,
    is_label_file,
    is_nifti,
    modality_of,
    nifti_stem,
)

__all__ = ["find_studies", "check_output_dir", "STUDY_ERROR_KEY", "STUDY_NOTES_KEY"]

logger = logging.getLogger(__name__)

#: key of a study entry that cannot be used: one line naming the folder/file and what is wrong
STUDY_ERROR_KEY = "error"
#: key of a study entry's notes: one line per file of its folder that is not used
STUDY_NOTES_KEY = "notes"


def _mapped(name: str, modality_map: dict[str, str]) -> str | None:
    """The modality ``modality_map`` gives a folder name, SeriesDescription or file name (without extension)."""
    return modality_map.get(name.strip().lower()) or modality_map.get(image_stem(name).lower())


def _check_modality_map(modality_map: Mapping[str, str] | None, modalities: Sequence[str]) -> dict[str, str]:
    out = {}
    for name, modality in (modality_map or {}).items():
        if modality not in modalities:
            raise DMAFDataError(
                f"modality_map: {name!r} -> {modality!r}: unknown modality; expected one of {list(modalities)}"
            )
        out[str(name).strip().lower()] = modality
    return out


def _link_problem(path: str) -> str | None:
    """One line when ``path`` is a symbolic link that leads nowhere: dangling, a loop, or a target that cannot be
    reached; None otherwise (not a link, or a link to an existing file or folder)."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as exc:
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        if exc.errno == errno.ELOOP:
            return f"{path}: a symbolic link loop (-> {target})"
        if exc.errno == errno.ENOENT:
            return f"{path}: a dangling symbolic link (its target {target} does not exist)"
        return f"{path}: a symbolic link whose target {target} cannot be reached ({exc.strerror or exc})"
    return None


def _dicom_candidates(
    folder: str, modalities: Sequence[str], modality_map: dict[str, str], notes: list[str]
) -> list[tuple[str, DicomSeries]]:
    """``(modality, series)`` for the DICOM series of a study folder: those of its own files (named by their
    SeriesDescription) and of each sub-folder (named by the sub-folder's name when it holds one series, else by
    description); ``modality_map`` comes first. Series and sub-folders that name no modality go to ``notes``."""
    found: list[tuple[str, DicomSeries]] = []
    subs = sorted(
        os.path.join(folder, n)
        for n in os.listdir(folder)
        if not n.startswith(".") and os.path.isdir(os.path.join(folder, n))
    )
    for where in [folder] + subs:
        if not has_dicom_files(where):
            if where != folder:
                notes.append(f"{where}: ignored (a sub-folder without DICOM files)")
            continue
        series = list_dicom_series(where)
        by_folder = None
        if where != folder and len(series) == 1:
            name = os.path.basename(where)
            by_folder = _mapped(name, modality_map) or modality_of(name, modalities)
        for s in series:
            modality = by_folder or _mapped(s.description, modality_map) or modality_of(s.description, modalities)
            if modality is None:
                hint = " or folder name" if where != folder and len(series) == 1 else ""
                notes.append(
                    f"{s.label()}: ignored (no modality in its description{hint}; name its folder after the modality, "
                    "e.g. flair/, or map the description with --modality_map)"
                )
                continue
            found.append((modality, s))
    return found


def find_studies(
    input_dir: str,
    modalities: Sequence[str] = BRATS_MODALITIES,
    log: bool = True,
    modality_map: Mapping[str, str] | None = None,
) -> list[dict]:
    """Studies below ``input_dir`` for inference.

    - every sub-folder (names starting with ``.`` aside) is one study ``{"case": folder name, "image": {modality:
      path}}`` made of its image files whose names denote a modality, any subset of them
      (:func:`~dmaf_components.data.names.modality_of`: case-insensitive, with the aliases of real releases in
      ``MODALITY_ALIASES``, e.g. BraTS ``_flair/_t1/_t1ce/_t2``, ``-t2f/-t1n/-t1c/-t2w``, ``T1Gd``, MyoPS ``C0/DE/T2``):
      NIfTI ``.nii``/``.nii.gz``, NRRD ``.nrrd``/``.nhdr`` and MetaImage ``.mha``/``.mhd``;
    - and of its DICOM series, one per modality: in sub-folders (one series each, named by the sub-folder, e.g.
      ``flair/``, else by its SeriesDescription) or as files of the study folder itself (several series told apart
      by their SeriesDescription, e.g. ``AX T2 FLAIR``). A DICOM modality's ``path`` is the series' folder and
      ``study["image_series"][modality]`` its series identifier (``ITKReader(series_name=...)``);
    - image files directly in ``input_dir`` whose names denote a modality are grouped by the rest of their name into
      one study each (the MyoPS release's flat layout: ``myops_training_101_C0.nii.gz``, ``..._DE``, ``..._T2`` make
      the study ``myops_training_101``; :func:`~dmaf_components.data.names.case_of`); a NIfTI named after such a
      case without a modality name (``p1_dwi.nii.gz`` beside ``p1_flair.nii.gz``) is noted and not used;
      ``modality_map`` applies to study folders only;
    - every other ``.nii``/``.nii.gz`` file directly in ``input_dir`` is a 4-D study in canonical channel order
      (segmentation-like names, ``*_seg``, ``*_gd``, ``*Segm``..., are ignored and reported).

    Nothing is dropped silently. An image file or DICOM series of a study folder that matches no modality is listed
    in the study's ``"notes"`` (and logged as a warning when ``log``). A study folder that cannot be used (no
    modality image, two images for one modality, a modality file or series folder that is a dangling symbolic link
    or a link loop) is kept with an ``"error"`` line, so that the caller reports it as a failed study; it is never
    skipped. So is a study folder or a modality file of ``input_dir`` that is such a link (the error names the link
    and the cause); a dangling link in a study folder that names no modality is noted.

    Args:
        input_dir: the folder of studies.
        modalities: canonical modality names.
        log: log the notes as warnings.
        modality_map: explicit modality of folder names, SeriesDescriptions or file names (compared without case
            and extension), e.g. ``{"AX 3D SPACE": "flair"}``; it comes before the alias table.

    Raises:
        DMAFDataError: ``input_dir`` is not a folder, or holds no study at all, or ``modality_map`` names an
            unknown modality.
    """
    if not os.path.isdir(input_dir):
        raise DMAFDataError(f"{input_dir}: input folder not found")
    mapping = _check_modality_map(modality_map, modalities)
    studies: list[dict] = []
    entries = sorted(os.listdir(input_dir))
    expected = ", ".join(f"*_{MODALITY_ALIASES.get(m, (m,))[0]}.nii.gz" for m in modalities) + " or DICOM series"
    for name in entries:
        folder = os.path.join(input_dir, name)
        broken = None if name.startswith(".") or is_image_file(name) else _link_problem(folder)
        if broken is not None:  # a study folder that is a dangling link or a loop: a failed study, not a gap
            studies.append({"case": name, "image": {}, STUDY_ERROR_KEY: broken})
            continue
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        links = {}  # the folder's links that lead nowhere: a failed study when one names a modality
        for f in sorted(os.listdir(folder)):
            problem = _link_problem(os.path.join(folder, f))
            if problem is not None:
                links[f] = problem
        files = [os.path.join(folder, f) for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))]
        mapped = {f: _mapped(os.path.basename(f), mapping) for f in files if is_image_file(f)} if mapping else {}
        image, notes, errors = classify_files([f for f in files if not mapped.get(f)], modalities, any_format=True)
        candidates: list[tuple[str, str, DicomSeries | None]] = [(m, f, None) for m, f in image.items()]
        candidates += [(m, f, None) for f, m in sorted(mapped.items()) if m]
        candidates += [(m, s.folder, s) for m, s in _dicom_candidates(folder, modalities, mapping, notes)]
        image, series = {}, {}
        sources: dict[str, str] = {}
        for modality, path, dicom in candidates:
            source = dicom.label() if dicom is not None else path
            if modality in image:
                if not errors:
                    kind = "file" if dicom is None and modality not in series else "image"
                    errors.append(f"{source}: a second {kind} for {modality} (also {sources[modality]})")
                continue
            image[modality], sources[modality] = path, source
            if dicom is not None:
                series[modality] = dicom.identifier
        link_errors = []
        for f, problem in links.items():
            named = _mapped(f, mapping) or modality_of(f, modalities)
            if named is not None and (is_image_file(f) or "." not in f.strip()):  # a file or a series folder
                link_errors.append(f"{problem}; it names {named}")
            else:
                notes.append(f"{problem}: ignored")
        errors = link_errors + errors
        study: dict = {"case": name, "image": image}
        if series:
            study["image" + SERIES_POSTFIX] = series
        if notes:
            study[STUDY_NOTES_KEY] = notes
        if errors:
            study[STUDY_ERROR_KEY] = errors[0]
        elif not image:
            others = sorted(os.path.basename(f) for f in files) + sorted(
                n + "/" for n in os.listdir(folder) if not n.startswith(".") and os.path.isdir(os.path.join(folder, n))
            )
            found = f"holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}" if others else "is empty"
            study[STUDY_ERROR_KEY] = f"{folder}: no modality file (the folder {found}; expected {expected})"
        studies.append(study)
    flat: dict[str, list[str]] = {}  # case -> its modality files directly in input_dir (MyoPS's release layout)
    four_d: list[str] = []
    broken_files: dict[str, str] = {}  # image files of input_dir that are links leading nowhere
    for name in entries:
        path = os.path.join(input_dir, name)
        problem = None if name.startswith(".") or not is_image_file(name) else _link_problem(path)
        if problem is not None:
            broken_files[path] = problem
        elif name.startswith(".") or not os.path.isfile(path) or not is_image_file(name):
            continue
        if is_label_file(name):
            if log:
                logger.warning(f"{path}: ignored (a segmentation/label file, not a study)")
            continue
        case = case_of(name, modalities)
        if case is not None:
            flat.setdefault(case, []).append(path)
        elif is_nifti(name):
            four_d.append(path)
    siblings: dict[str, list[str]] = {}
    for path in four_d:  # p1_dwi.nii.gz beside p1_flair.nii.gz is another sequence of p1, not a 4-D study
        stem = nifti_stem(os.path.basename(path))
        owner = next((c for c in flat if re.match(re.escape(c) + r"[-_. ]", stem)), None)
        if owner is None:
            studies.append({"case": stem, "image": path})
            if path in broken_files:
                studies[-1][STUDY_ERROR_KEY] = broken_files[path]
        else:
            siblings.setdefault(owner, []).append(path)
    for case, files in sorted(flat.items()):  # a sibling is noted by classify_files, as in a study folder
        image, notes, errors = classify_files(files + siblings.get(case, []), modalities, any_format=True)
        errors = [broken_files[f] for f in sorted(files) if f in broken_files] + errors
        study = {"case": case, "image": image}
        if notes:
            study[STUDY_NOTES_KEY] = notes
        if errors:
            study[STUDY_ERROR_KEY] = errors[0]
        studies.append(study)
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
            if out in (os.path.realpath(os.path.dirname(path)), os.path.realpath(path)):  # a file's or series' folder
                raise DMAFDataError(f"output_dir {output_dir}: holds input {path}; choose a separate output folder")
    os.makedirs(out, exist_ok=True)
    return output_dir
