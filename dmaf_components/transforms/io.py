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
"""Loading a study: its modality files (or one 4-D file) assembled into channels in a fixed order, absent
modalities as zero channels, with the labels that go with it."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ..data.constants import DMAFDataError
from ..data.formats import SERIES_POSTFIX
from ..data.image_checks import check_image
from ..data.readers import ImageReader
from ..inferers import study_modality_mask

__all__ = ["LoadModalitiesd", "AVAILABLE_POSTFIX"]

#: :class:`LoadModalitiesd` writes ``data[key + AVAILABLE_POSTFIX]``: which modalities the study has (bool ``(M,)``)
AVAILABLE_POSTFIX = "_available"


def _file_identity(path: str, series: str | None = None) -> tuple:
    """What tells two files apart: device and inode (a hard link, a symbolic link or another spelling of the path is
    the same file, as ``os.path.samefile`` decides), or the real path when the file cannot be stat'ed (its read
    then fails with its own message); a DICOM folder's series identifier, when given, tells its series apart."""
    try:
        info = os.stat(path)
        where: tuple = (info.st_dev, info.st_ino)
    except OSError:
        where = (os.path.realpath(path),)
    return where + (series,)


class LoadModalitiesd(MapTransform):
    """Load the modalities of a study into channels in a fixed order; absent modalities become zero channels.

    ``data[key]`` may be:

    - a mapping ``{modality: path}`` (a modality whose key is absent or None is missing: in clinical data missing
      sequences are missing files), or a list of paths in the canonical order (None = missing);
    - one path to a 4-D file holding all modalities in the canonical order (MSD Task01 / MONAI Label studies).

    Each file is read by :class:`~dmaf_components.data.readers.ImageReader` (NIfTI; NRRD, MetaImage and DICOM
    series through ITK, with a RAS affine, so that the formats mix within a study) and checked by
    :func:`~dmaf_components.data.image_checks.check_image`. A folder holding several series needs the series
    identifier in ``data[key + "_series"]`` (``{modality: identifier}``, from
    :func:`~dmaf_components.data.find_studies`, or a SeriesInstanceUID).

    Output: ``data[key]`` a MetaTensor ``(M, *spatial)`` with the affine of the first file, and
    ``data[key + "_available"]`` a bool tensor ``(M,)`` (file present and not all zero). Relative paths are taken
    relative to ``base_dir``. Every read problem (file not found, unreadable or truncated, NaN or infinite voxels,
    float64 values beyond float32's range, a file that is not a ``spatial_ndim``-D volume, a constant non-zero
    image, a label map or mask given as a modality (at most
    :data:`~dmaf_components.data.image_checks.MAX_LABEL_LEVELS` whole-number values), a DICOM series with missing,
    doubled or unevenly spaced slices, one file named for two modalities, modalities of different shape or affine,
    wrong channel count) raises :class:`DMAFDataError` with one line naming the file. Voxel spacings whose
    largest/smallest ratio exceeds ``anisotropy_ratio`` are logged as a warning naming the file (resampling, e.g.
    :class:`~dmaf_components.transforms.StudySpacingd`, cannot restore what lies between thick slices).

    Args:
        keys: the image key(s).
        modalities: canonical channel order, e.g. ``("flair", "t1", "t1ce", "t2")``.
        label_keys: keys of single-file labels loaded alongside (channel first), with the same one-line errors; a
            label whose spatial shape or affine (within ``affine_atol``) differs from the image's is an error
            naming the case, the label file and the image file, as in ``dmaf check``.
        base_dir: folder that relative paths are relative to.
        dtype: dtype of the loaded image.
        affine_atol: tolerance when comparing the affines of one study's files.
        spatial_ndim: number of spatial dimensions every file must have (3: BraTS volumes, MyoPS slice stacks);
            None accepts any.
        anisotropy_ratio: warn when a file's largest voxel spacing exceeds its smallest by more than this factor;
            None (default) never warns.
        min_background: fraction of a (not all-zero) modality's voxels that must be exactly 0, for models trained
            on skull-stripped images (BraTS: 0.05; a skull-stripped brain leaves far more); None (default) does not
            check. A non-zero background (an intensity offset, a scaled integer file's intercept, an unstripped
            head) changes the intensity normalisation and the result without any other sign.
        min_axis_size: every spatial axis must have at least this many voxels (BraTS inference: 2; a single slice
            is not a volume); 1 (default) accepts any.
    """

    def __init__(
        self,
        keys: KeysCollection,
        modalities: Sequence[str],
        label_keys: KeysCollection | None = None,
        base_dir: str | None = None,
        dtype: torch.dtype | np.dtype | None = np.float32,
        affine_atol: float = 1e-3,
        allow_missing_keys: bool = False,
        spatial_ndim: int | None = 3,
        anisotropy_ratio: float | None = None,
        min_background: float | None = None,
        min_axis_size: int = 1,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modalities = tuple(modalities)
        self.label_keys = (
            () if label_keys is None else ((label_keys,) if isinstance(label_keys, str) else tuple(label_keys))
        )
        self.base_dir = base_dir
        self.affine_atol = affine_atol
        self.spatial_ndim = spatial_ndim
        self.anisotropy_ratio = anisotropy_ratio
        self.min_background = min_background
        self.min_axis_size = int(min_axis_size)
        self.dtype = dtype
        self.reader = ImageReader(dtype)

    def _path(self, path: str) -> str:
        path = os.fspath(path)
        if self.base_dir and not os.path.isabs(path):
            path = os.path.join(self.base_dir, path)
        return path

    def read(self, path: str, series: str | None = None, image: bool = True) -> MetaTensor:
        """Read one file or DICOM series folder (``series``: its identifier when the folder holds several) and check
        it, with one-line errors; ``image=False`` (a label) skips the checks that only make sense for an MR image."""
        return check_image(
            path,
            self.reader(path, series),
            image,
            self.spatial_ndim,
            self.min_background,
            self.min_axis_size,
            self.anisotropy_ratio,
        )

    def _as_mapping(self, value: Any, key: Hashable) -> dict[str, str]:
        if isinstance(value, Mapping):
            unknown = set(value) - set(self.modalities)
            if unknown:
                raise DMAFDataError(f"{key}: unknown modality {sorted(unknown)}; expected {list(self.modalities)}")
            return {m: value[m] for m in self.modalities if value.get(m)}
        if len(value) != len(self.modalities):
            raise DMAFDataError(f"{key}: expected {len(self.modalities)} paths ({', '.join(self.modalities)})")
        return {m: p for m, p in zip(self.modalities, value) if p}

    def load(
        self, value: Any, key: Hashable = "image", case: str | None = None, series: Mapping[str, str] | None = None
    ) -> tuple[MetaTensor, torch.Tensor]:
        """Load one study (``series``: ``{modality: DICOM series identifier}`` for folders holding several).

        Returns:
            ``(image (M, *spatial), available (M,))``.
        """
        if isinstance(value, (torch.Tensor, np.ndarray)):  # already loaded (e.g. by MONAI Label): channel first
            img = value if isinstance(value, MetaTensor) else MetaTensor(torch.as_tensor(value))
            m = len(self.modalities)
            if img.ndim >= 3 and img.shape[0] != m and img.shape[-1] == m:
                img = img.movedim(-1, 0)
            if img.shape[0] != m:
                raise DMAFDataError(f"{key}: loaded image has shape {tuple(img.shape)}, expected {m} channels")
            if img.is_floating_point() and not bool(torch.isfinite(img).all()):
                source = img.meta.get("filename_or_obj", key) if isinstance(img, MetaTensor) else key
                raise DMAFDataError(f"{source}: contains NaN or inf voxels")
            return img, study_modality_mask(img[None])[0]
        if isinstance(value, (str, os.PathLike)):
            path = self._path(value)
            img = self.read(path)
            if img.shape[0] != len(self.modalities):
                raise DMAFDataError(
                    f"{path}: has {img.shape[0]} channel(s), expected {len(self.modalities)} "
                    f"({', '.join(self.modalities)})"
                )
            return img, study_modality_mask(img[None])[0]
        files = {m: self._path(p) for m, p in self._as_mapping(value, key).items()}
        if not files:
            raise DMAFDataError(f"{case or key}: no modality file at all")
        seen: dict[tuple, str] = {}
        for modality, path in files.items():
            twin = seen.setdefault(_file_identity(path, (series or {}).get(modality)), modality)
            if twin != modality:
                raise DMAFDataError(f"{case or key}: {twin} and {modality} are the same file {path}")
        loaded: dict[str, MetaTensor] = {}
        ref_mod, ref = None, None
        for modality, path in files.items():
            img = self.read(path, (series or {}).get(modality))
            if img.shape[0] != 1:
                raise DMAFDataError(f"{path}: has {img.shape[0]} channels, expected one modality")
            if ref is None:
                ref_mod, ref = modality, img
            else:
                if img.shape != ref.shape:
                    raise DMAFDataError(
                        f"{path}: shape {tuple(img.shape[1:])} differs from {files[ref_mod]} {tuple(ref.shape[1:])}"
                    )
                if not np.allclose(np.asarray(img.affine), np.asarray(ref.affine), atol=self.affine_atol):
                    raise DMAFDataError(f"{path}: affine differs from {files[ref_mod]}")
            loaded[modality] = img
        channels = [loaded[m] if m in loaded else torch.zeros_like(ref) for m in self.modalities]
        image = torch.cat(channels, dim=0)
        if not isinstance(image, MetaTensor):
            image = MetaTensor(image, meta=ref.meta)
        first = files[ref_mod]
        name = case or os.path.basename(os.path.dirname(first)) or os.path.basename(first)
        image.meta["filename_or_obj"] = os.path.join(os.path.dirname(first), name + ".nii.gz")
        available = torch.tensor([m in loaded and bool(loaded[m].ne(0).any()) for m in self.modalities])
        return image, available

    def _reference_file(self, value: Any, key: Hashable) -> str | None:
        """The file whose grid a study's image takes (its first modality file, or its 4-D file); None when the
        study was given as an array."""
        if isinstance(value, (str, os.PathLike)):
            return self._path(value)
        if isinstance(value, (Mapping, list, tuple)):
            first = next(iter(self._as_mapping(value, key).values()), None)
            return None if first is None else self._path(first)
        return None

    def _check_label_grid(self, path: str, label: MetaTensor, image: MetaTensor, ref: str | None, case: Any) -> None:
        """A label must share its image's grid: the same spatial shape and affine (within ``affine_atol``), as
        ``dmaf check`` requires; otherwise it is scored, or trained on, against voxels it does not describe."""
        where = f"{case}: {path}" if case else path
        ref_name = os.path.basename(ref) if ref else "the image"
        shape, ref_shape = tuple(label.shape[1:]), tuple(image.shape[1:])
        if shape != ref_shape:
            raise DMAFDataError(f"{where}: shape {shape} differs from {ref_name} {ref_shape}")
        if ref is not None:  # (an array given without its affine has none to compare)
            a, b = np.asarray(label.affine, dtype=np.float64), np.asarray(image.affine, dtype=np.float64)
            if not np.allclose(a, b, atol=self.affine_atol):
                raise DMAFDataError(
                    f"{where}: affine differs from {ref_name} (largest difference {float(np.abs(a - b).max()):.4g})"
                )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        grid = None  # (image, its reference file) of the first image key: the grid every label must share
        for key in self.key_iterator(d):
            series = d.pop(f"{key}{SERIES_POSTFIX}", None)
            ref = self._reference_file(d[key], key)
            d[key], d[f"{key}{AVAILABLE_POSTFIX}"] = self.load(d[key], key, d.get("case"), series)
            grid = (d[key], ref) if grid is None else grid
        for key in self.label_keys:
            if d.get(key) is not None:
                path = self._path(d[key])
                d[key] = self.read(path, image=False)
                if grid is not None:
                    self._check_label_grid(path, d[key], grid[0], grid[1], d.get("case"))
        return d
