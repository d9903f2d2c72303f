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
"""Clinical image formats besides NIfTI: NRRD, MetaImage and DICOM series, read through ITK (MONAI ``ITKReader``).

DICOM series are grouped exactly as MONAI's ``ITKReader`` groups them when it is given a folder
(``itk.GDCMSeriesFileNames`` with series details and the series-date restriction), so that a series identifier found
here selects the same files in ``ITKReader(series_name=...)``. ``itk`` is imported only when a DICOM folder is
listed: a NIfTI-only run never pays for it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ITK_EXTENSIONS",
    "SERIES_POSTFIX",
    "DicomSeries",
    "is_itk_file",
    "is_dicom_file",
    "has_dicom_files",
    "list_dicom_series",
    "find_series",
    "check_slice_spacing",
]

#: file formats read through ITK (besides DICOM series): NRRD (attached or detached header) and MetaImage
ITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd")
#: a study entry's ``key + SERIES_POSTFIX`` maps a modality whose image is a DICOM folder to its series identifier
SERIES_POSTFIX = "_series"

_ITK = re.compile(r"\.(nrrd|nhdr|mha|mhd)$", re.IGNORECASE)
_DICOM_EXT = re.compile(r"\.(dcm|dicom|ima)$", re.IGNORECASE)


@dataclass
class DicomSeries:
    """One DICOM series of a folder.

    Attributes:
        folder: the folder holding its files.
        identifier: the series identifier as ``ITKReader(series_name=...)`` takes it (the SeriesInstanceUID with
            GDCM's series details).
        uid: SeriesInstanceUID (0020,000E).
        description: SeriesDescription (0008,103E), stripped ("" when absent).
        files: the slice files, in GDCM's order.
    """

    folder: str
    identifier: str
    uid: str = ""
    description: str = ""
    files: list[str] = field(default_factory=list)

    def label(self) -> str:
        """``FOLDER (DICOM series 'DESCRIPTION', N files)`` for messages."""
        desc = f"'{self.description}'" if self.description else f"without description, uid {self.uid}"
        return f"{self.folder} (DICOM series {desc}, {len(self.files)} files)"


def is_itk_file(name: str) -> bool:
    """Whether a file name ends with ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` (any case; whitespace ignored)."""
    return bool(_ITK.search(os.path.basename(name).strip()))


def is_dicom_file(path: str) -> bool:
    """Whether ``path`` is a DICOM file: the ``DICM`` marker at byte 128 (DICOM Part 10), or a ``.dcm``/``.ima``
    name. Reads 132 bytes; an unreadable file is not DICOM."""
    if _DICOM_EXT.search(path):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def has_dicom_files(folder: str) -> bool:
    """Whether a folder holds at least one DICOM file (not looking into its sub-folders)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return any(
        not n.startswith(".") and os.path.isfile(os.path.join(folder, n)) and is_dicom_file(os.path.join(folder, n))
        for n in names
    )


def _tag(io, tag: str) -> str:
    found = io.GetValueFromTag(tag, "")
    value = found[1] if isinstance(found, (tuple, list)) else found
    return str(value or "").strip().strip("\x00").strip()


def list_dicom_series(folder: str) -> list[DicomSeries]:
    """The DICOM series of a folder (its own files, not its sub-folders), grouped as MONAI's ``ITKReader`` groups
    them, sorted by series description then identifier.

    Args:
        folder: a folder holding DICOM slice files.

    Returns:
        one :class:`DicomSeries` per series; empty when the folder holds no readable DICOM file.
    """
    import itk  # noqa: PLC0415  (heavy: only when DICOM is actually met)

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # Series Date, as monai.data.ITKReader
    names.SetDirectory(folder)
    series: list[DicomSeries] = []
    for identifier in names.GetSeriesUIDs():
        files = [str(f) for f in names.GetFileNames(identifier)]
        uid, description = "", ""
        if files:
            io = itk.GDCMImageIO.New()
            io.SetFileName(files[0])
            try:
                io.ReadImageInformation()
                uid, description = _tag(io, "0020|000e"), _tag(io, "0008|103e")
            except RuntimeError:
                pass
        series.append(DicomSeries(folder, str(identifier), uid, description, files))
    return sorted(series, key=lambda s: (s.description.lower(), s.identifier))


def find_series(folder: str, identifier: str | None, series: Sequence[DicomSeries] | None = None) -> DicomSeries:
    """The series ``identifier`` (GDCM identifier or SeriesInstanceUID) of ``folder``; without one, its only series.

    Raises:
        ValueError: one line: no DICOM series in the folder, the identifier is not among them, or the folder holds
            several and none was named.
    """
    if series is None and not has_dicom_files(folder):
        raise ValueError(f"{folder}: no DICOM file in the folder")
    series = list_dicom_series(folder) if series is None else list(series)
    if not series:
        raise ValueError(f"{folder}: no DICOM series in the folder")
    if identifier:
        for s in series:
            if identifier in (s.identifier, s.uid):
                return s
        raise ValueError(f"{folder}: no DICOM series {identifier!r} (the folder holds {len(series)} series)")
    if len(series) > 1:
        shown = ", ".join(f"'{s.description or s.uid}'" for s in series[:5])
        raise ValueError(
            f"{folder}: holds {len(series)} DICOM series ({shown}); name the one to use (image_series) or put each "
            "series in its own folder"
        )
    return series[0]


def _floats(text: str) -> list[float] | None:
    try:
        return [float(v) for v in text.split("\\")]
    except ValueError:
        return None


def check_slice_spacing(series: DicomSeries, tolerance: float = 0.1) -> None:
    """Refuse a series whose slices are not evenly spaced along their normal: a missing slice (a gap twice the
    others), two slices at one position (a repeated or multi-echo acquisition), or a variable spacing. ITK stacks
    such a series as if it were even, with only a warning: the volume, and every result computed on it, would be
    distorted without a sign.

    The positions are ImagePositionPatient (0020,0032) projected on the normal of ImageOrientationPatient
    (0020,0037), read from each file's header. A series of fewer than 3 files, or whose files lack either tag (a
    multi-frame file), is not checked.

    Args:
        series: the series, as :func:`list_dicom_series` or :func:`find_series` return it.
        tolerance: largest relative deviation of a gap from the median gap.

    Raises:
        ValueError: one line naming the series, the slice and the gaps.
    """
    if len(series.files) < 3:
        return
    import itk  # noqa: PLC0415

    positions, normal = [], None
    for name in series.files:
        io = itk.GDCMImageIO.New()
        io.SetFileName(name)
        try:
            io.ReadImageInformation()
        except RuntimeError:
            return  # unreadable headers are reported by the reader itself
        position, orientation = _floats(_tag(io, "0020|0032")), _floats(_tag(io, "0020|0037"))
        if not position or len(position) != 3 or not orientation or len(orientation) != 6:
            return
        if normal is None:
            normal = np.cross(orientation[:3], orientation[3:])
        positions.append((float(np.dot(normal, position)), os.path.basename(name)))
    positions.sort()
    gaps = np.diff([p for p, _ in positions])
    twins = np.flatnonzero(gaps < 1e-3)
    if twins.size:  # several echoes or a repeated acquisition under one series UID
        i = int(twins[0])
        raise ValueError(
            f"{series.label()}: two slices at one position ({positions[i][1]} and {positions[i + 1][1]}; "
            f"{twins.size} such pairs): a repeated or multi-echo acquisition in one series; ITK would stack them as "
            "one volume: export each echo or repetition as its own series"
        )
    step = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - step)))
    if abs(gaps[worst] - step) > tolerance * step:
        kind = "missing slices" if gaps[worst] > 1.5 * step else "uneven slice spacing"
        raise ValueError(
            f"{series.label()}: {kind}: {positions[worst + 1][1]} is {gaps[worst]:.3g} mm from "
            f"{positions[worst][1]}, the median gap is {step:.3g} mm; ITK would stack the slices evenly and distort "
            "the volume: export the complete series"
        )
