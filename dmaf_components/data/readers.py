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
"""Reading one image: a NIfTI file, a NRRD or MetaImage file, or one DICOM series of a folder, as a channel-first
``MetaTensor``, with one line naming the file for every failure.

NIfTI files are read with MONAI's ``NibabelReader``; NRRD (``.nrrd``/``.nhdr``), MetaImage (``.mha``/``.mhd``) and
DICOM series (a folder) with MONAI's ``ITKReader``, whose affine is converted to RAS like nibabel's, so that the
formats mix within a study. Whether the voxels make an image the pipeline can use is
:mod:`dmaf_components.data.image_checks`' question.
"""

from __future__ import annotations

import os
import re
import warnings

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage

from .constants import DMAFDataError
from .formats import check_slice_spacing, find_series, is_itk_file

__all__ = ["ImageReader", "first_line", "itk_reason", "stores_float64"]


def first_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception's text (its type alone when the text is empty)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def itk_reason(exc: BaseException) -> str:
    """One line from an ITK exception, whose text starts with the C++ source location: the ``ITK ERROR`` line
    without the object's address, followed by the innermost cause (e.g. NRRD's ``fread got only ...``)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    at = next((i for i, ln in enumerate(lines) if "ITK ERROR" in ln), None)
    if at is None:
        return first_line(exc) if not lines or len(lines) > 1 else lines[0]
    head = re.sub(r"^.*?ITK ERROR:\s*(\w+\(0x[0-9a-fA-F]+\):\s*)?", "", lines[at])
    detail = re.sub(r"^\[\w+\]\s*", "", lines[-1]) if len(lines) > at + 1 else ""
    return f"{head} {detail}".strip()


def stores_float64(path: str) -> bool:
    """Whether ``path`` is a NIfTI file that stores float64 voxels (read as float32, values beyond float32's range
    become inf); False for other formats and for a file whose header cannot be read."""
    if not os.path.isfile(path) or is_itk_file(path):
        return False
    try:
        return nib.load(path).get_data_dtype() == np.float64
    except Exception:
        return False


class ImageReader:
    """Read one image file, or one DICOM series of a folder, channel first, with one-line errors.

    Every failure (file not found, unreadable or truncated file, a DICOM folder without the series asked for, or
    holding several and none named, a series with missing, doubled or unevenly spaced slices) raises
    :class:`~dmaf_components.data.DMAFDataError` with one line naming the file.

    Args:
        dtype: dtype of the image read; None keeps the stored one.
    """

    def __init__(self, dtype: torch.dtype | np.dtype | None = np.float32) -> None:
        self.dtype = dtype
        self.loader = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=dtype)

    def __call__(self, path: str, series: str | None = None) -> MetaTensor:
        """Read ``path``: a NIfTI, NRRD or MetaImage file, or a DICOM folder (``series``: its identifier when the
        folder holds several series)."""
        if os.path.isdir(path) or (os.path.isfile(path) and is_itk_file(path)):
            return self.read_itk(path, series)
        if not os.path.isfile(path):
            raise DMAFDataError(f"{path}: file not found")
        return self.read_nifti(path)

    def read_nifti(self, path: str) -> MetaTensor:
        """A NIfTI file through MONAI's ``NibabelReader``."""
        try:
            return self.loader(path)
        except Exception as exc:  # nibabel / gzip / MONAI reader errors
            if "cannot find a suitable reader" in str(exc):  # MONAI hides the reason: ask nibabel for it
                try:
                    nib.load(path).get_fdata()
                except Exception as reason:
                    raise DMAFDataError(f"{path}: not a readable NIfTI file ({first_line(reason)})") from None
            raise DMAFDataError(f"{path}: cannot read ({first_line(exc)})") from None

    def read_itk(self, path: str, series: str | None = None) -> MetaTensor:
        """A NRRD/MetaImage file, or one DICOM series of a folder, through MONAI's ``ITKReader`` (RAS affine)."""
        from monai.data import ITKReader

        if os.path.isdir(path):
            try:
                found = find_series(path, series)
                check_slice_spacing(found)
            except ValueError as exc:
                raise DMAFDataError(str(exc)) from None
            reader = ITKReader(series_name=found.identifier)
        else:
            reader = ITKReader()
        try:
            with warnings.catch_warnings():  # "contains more than one DICOM series": the series is chosen above
                warnings.filterwarnings("ignore", message=".*more than one DICOM series")
                return LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=self.dtype)(path)
        except Exception as exc:
            if "cannot find a suitable reader" in str(exc) and not os.path.isdir(path):  # MONAI hides ITK's reason
                import itk

                try:
                    itk.imread(path)
                except Exception as reason:
                    raise DMAFDataError(f"{path}: not a readable image file (ITK: {itk_reason(reason)})") from None
            raise DMAFDataError(f"{path}: cannot read (ITK: {itk_reason(exc)})") from None
