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
"""Recognising modality files by name, with the aliases of real releases (one table: ``MODALITY_ALIASES``)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from functools import lru_cache

from .constants import LABEL_FILE_MARKERS, MODALITY_ALIASES

__all__ = [
    "is_nifti",
    "nifti_stem",
    "is_image_file",
    "image_stem",
    "modality_of",
    "case_of",
    "is_label_file",
    "classify_files",
]

_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_IMAGE = re.compile(r"\.(nii(\.gz)?|nrrd|nhdr|mha|mhd)$", re.IGNORECASE)
_SEP = r"(?:^|[-_. ])"
#: BIDS suffixes of anatomical MR images that the alias table knows (lower case)
_BIDS_SUFFIXES = ("t1w", "t2w", "flair")
#: BIDS ``ce-<label>`` entity (contrast agent, e.g. ``sub-01_ce-gadolinium_T1w``), between ``_``-separated entities
_BIDS_CE = re.compile(r"(?:^|_)ce-[a-z0-9]+_")


def is_nifti(name: str) -> bool:
    """Whether a file name ends with ``.nii`` or ``.nii.gz`` (any case, surrounding whitespace ignored)."""
    return bool(_NIFTI.search(os.path.basename(name).strip()))


def nifti_stem(name: str) -> str:
    """The file name without folder, surrounding whitespace and ``.nii``/``.nii.gz`` extension."""
    return _NIFTI.sub("", os.path.basename(name).strip()).strip()


def is_image_file(name: str) -> bool:
    """Whether a file name ends with an image extension read by inference: ``.nii``/``.nii.gz`` (NIfTI),
    ``.nrrd``/``.nhdr`` (NRRD) or ``.mha``/``.mhd`` (MetaImage); any case, surrounding whitespace ignored."""
    return bool(_IMAGE.search(os.path.basename(name).strip()))


def image_stem(name: str) -> str:
    """The file name without folder, surrounding whitespace and image extension (:func:`is_image_file`)."""
    return _IMAGE.sub("", os.path.basename(name).strip()).strip()


def _alias_regex(alias: str) -> str:
    return r"[-_ ]?".join(re.escape(part) for part in re.split(r"[-_ ]", alias))


@lru_cache(maxsize=None)
def _patterns(modalities: tuple[str, ...]) -> list[tuple[re.Pattern, str, int]]:
    patterns = []
    for modality in modalities:
        for alias in MODALITY_ALIASES.get(modality, (modality,)):
            patterns.append((re.compile(_SEP + "(" + _alias_regex(alias) + ")$"), modality, len(alias)))
    return patterns


def _best_match(name: str, modalities: Sequence[str]) -> tuple[str, int, tuple[int, int] | None] | None:
    """The modality whose longest alias ends the name, where the case name ends in the lower-case stem, and the span
    of a BIDS ``ce-<label>`` entity to leave out of the case name (or None); None if no alias ends the name.

    A BIDS name (suffix ``T1w``, ``T2w`` or ``FLAIR`` after ``_``) with a ``ce-<label>`` entity is contrast-enhanced:
    ``sub-01_ce-gadolinium_T1w`` is T1ce (no modality when ``t1ce`` is not one of ``modalities``); T2w and FLAIR keep
    their modality (post-contrast T2/FLAIR are T2/FLAIR-weighted images). The entity is not part of the case name
    (``sub-01_ce-gadolinium_T1w`` and ``sub-01_T2w`` are both of case ``sub-01``).
    """
    stem = image_stem(name).lower()
    best, best_len = None, -1
    for pattern, modality, length in _patterns(tuple(modalities)):
        if length > best_len:
            found = pattern.search(stem)
            if found:
                best, best_len = (modality, found), length
    if best is None:
        return None
    modality, found = best
    ce = None
    if found.group(1) in _BIDS_SUFFIXES and stem[found.start()] == "_":
        entity = None
        for entity in _BIDS_CE.finditer(stem[: found.start() + 1]):
            pass  # the last ce- entity before the suffix
        if entity is not None:
            ce = (entity.start(), entity.end() - 1)
            if modality == "t1":  # never a native T1: T1ce, or no modality of this model
                if "t1ce" not in modalities:
                    return None
                modality = "t1ce"
    return modality, found.start(), ce


def modality_of(name: str, modalities: Sequence[str]) -> str | None:
    """The modality a file name denotes, or None.

    Case-insensitive; surrounding whitespace is ignored; the alias must be the whole name or end it after a ``-``,
    ``_``, ``.`` or space (``BraTS20_Training_001_t1ce``, ``BraTS-GLI-00000-000-t1c``, ``s1_T1Gd``, ``FLAIR``,
    ``patient 3 T2-FLAIR``, ``myops_training_101_C0``). When several aliases end the name, the longest wins
    (``t2-flair`` is FLAIR, not T2). A BIDS name with a ``ce-<label>`` entity and the suffix ``T1w`` is T1ce
    (``sub-01_ce-gadolinium_T1w``). The same rule names DICOM series by folder name or SeriesDescription.
    """
    best = _best_match(name, modalities)
    return best[0] if best else None


def case_of(name: str, modalities: Sequence[str]) -> str | None:
    """The case a modality file's name denotes: its name without the modality alias :func:`modality_of` matched and
    the separator before it (``myops_training_101_C0.nii.gz`` -> ``myops_training_101``); None when the name denotes
    no modality or is the alias alone."""
    best = _best_match(name, modalities)
    if best is None:
        return None
    stem = image_stem(name)
    _, start, ce = best
    stem = stem if len(stem) == len(stem.lower()) else stem.lower()
    return ((stem[: ce[0]] + stem[ce[1] : start]) if ce else "") or stem[:start] or None


def is_label_file(name: str) -> bool:
    """Whether a file name looks like a segmentation/label (``*_seg``, ``*_gd``, ``*Segm``, ``*_label``...)."""
    stem = image_stem(name).lower()
    return stem.endswith("segm") or any(re.search(_SEP + re.escape(m) + "$", stem) for m in LABEL_FILE_MARKERS)


def classify_files(
    paths: Sequence[str], modalities: Sequence[str], report_labels: bool = True, any_format: bool = False
) -> tuple[dict[str, str], list[str], list[str]]:
    """Sort the files of one study folder by modality.

    Args:
        paths: the folder's files (non-NIfTI files are left out).
        modalities: the canonical modality names.
        report_labels: also list segmentation-like files (:func:`is_label_file`) in ``notes``.
        any_format: take NRRD and MetaImage files too (:func:`is_image_file`), not only NIfTI.

    Returns:
        ``(image, notes, errors)``: ``image`` maps each recognised modality to its file; ``notes`` has one line per
        NIfTI that matches no modality (naming the file and why it is ignored); ``errors`` has one line per
        modality matched by more than one file.
    """
    image: dict[str, str] = {}
    notes: list[str] = []
    errors: list[str] = []
    dupes: dict[str, list[str]] = {}
    for path in sorted(paths):
        base = os.path.basename(path)
        if not (is_image_file(base) if any_format else is_nifti(base)):
            continue
        modality = modality_of(base, modalities)
        if modality is None:
            label = is_label_file(base)
            if label and not report_labels:
                continue
            kind = "a segmentation/label file" if label else "no modality name"
            expected = "/".join(MODALITY_ALIASES.get(m, (m,))[0] for m in modalities)
            notes.append(f"{path}: ignored ({kind}; modality files end with _{expected}, any case)")
        elif modality in image:
            dupes.setdefault(modality, [image[modality]]).append(path)
        else:
            image[modality] = path
    for modality, files in dupes.items():
        errors.append(f"{files[1]}: a second file for {modality} (also {', '.join(files[:1] + files[2:])})")
    return image, notes, errors
