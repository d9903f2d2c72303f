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
"""MONAI dictionary transforms for incomplete multi-modal MRI: loading, label checks, spatial augmentation resampled
once, and modality dropping."""

from __future__ import annotations

import itertools
import logging
import os
import re
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import LoadImage, MapTransform, RandomizableTransform, Spacingd
from monai.transforms.utils import create_rotate, create_translate
from monai.utils import ensure_tuple, ensure_tuple_rep, get_equivalent_dtype

from .data.constants import DMAFDataError
from .data.formats import SERIES_POSTFIX, check_slice_spacing, find_series, is_itk_file
from .inferers import study_modality_mask

__all__ = [
    "LoadModalitiesd",
    "CheckLabelValuesd",
    "RandFlipRotated",
    "ModalityDropd",
    "LabelToRegionsd",
    "StudySpacingd",
    "AVAILABLE_POSTFIX",
]

AVAILABLE_POSTFIX = "_available"

logger = logging.getLogger(__name__)

#: a modality file with at most this many distinct values, all whole numbers, is a label map or mask, not an image
MAX_LABEL_LEVELS = 16
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _few_whole_levels(values: torch.Tensor) -> list[float] | None:
    """The distinct values of a flat tensor when there are at most :data:`MAX_LABEL_LEVELS` of them, all whole
    numbers (a label map); None otherwise. A sample of about 65k voxels decides first, so an MR image (hundreds of
    levels) costs one strided read; only a candidate is counted in full."""
    step = max(1, values.numel() // 65536)
    if torch.unique(values[::step]).numel() > MAX_LABEL_LEVELS:
        return None
    levels = torch.unique(values)
    if levels.numel() > MAX_LABEL_LEVELS or (levels.is_floating_point() and not torch.equal(levels, levels.round())):
        return None
    return [float(v) for v in levels]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _itk_reason(exc: BaseException) -> str:
    """One line from an ITK exception, whose text starts with the C++ source location: the ``ITK ERROR`` line
    without the object's address, followed by the innermost cause (e.g. NRRD's ``fread got only ...``)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    at = next((i for i, ln in enumerate(lines) if "ITK ERROR" in ln), None)
    if at is None:
        return _first_line(exc) if not lines or len(lines) > 1 else lines[0]
    head = re.sub(r"^.*?ITK ERROR:\s*(\w+\(0x[0-9a-fA-F]+\):\s*)?", "", lines[at])
    detail = re.sub(r"^\[\w+\]\s*", "", lines[-1]) if len(lines) > at + 1 else ""
    return f"{head} {detail}".strip()


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

    NIfTI files are read with MONAI's ``NibabelReader``; NRRD (``.nrrd``/``.nhdr``), MetaImage (``.mha``/``.mhd``)
    and DICOM series (a folder path) with MONAI's ``ITKReader``, whose affine is converted to RAS like nibabel's, so
    that the formats mix within a study. A folder holding several series needs the series identifier in
    ``data[key + "_series"]`` (``{modality: identifier}``, from :func:`~dmaf_components.data.find_studies`, or a
    SeriesInstanceUID).

    Output: ``data[key]`` a MetaTensor ``(M, *spatial)`` with the affine of the first file, and
    ``data[key + "_available"]`` a bool tensor ``(M,)`` (file present and not all zero). Relative paths are taken
    relative to ``base_dir``. Every read problem (file not found, unreadable or truncated, NaN or infinite voxels,
    float64 values beyond float32's range, a file that is not a ``spatial_ndim``-D volume, a constant non-zero
    image, a label map or mask given as a modality (at most :data:`MAX_LABEL_LEVELS` whole-number values), a DICOM
    series with missing, doubled or unevenly spaced slices, one file named for two modalities, modalities of
    different shape or affine, wrong channel count) raises :class:`DMAFDataError` with one line naming the file.
    Voxel spacings whose largest/smallest ratio exceeds ``anisotropy_ratio`` are logged as a warning naming the file
    (resampling, e.g. :class:`StudySpacingd`, cannot restore what lies between thick slices).

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
        self.label_keys = () if label_keys is None else (
            (label_keys,) if isinstance(label_keys, str) else tuple(label_keys))
        self.base_dir = base_dir
        self.affine_atol = affine_atol
        self.spatial_ndim = spatial_ndim
        self.anisotropy_ratio = anisotropy_ratio
        self.min_background = min_background
        self.min_axis_size = int(min_axis_size)
        self.dtype = dtype
        self.loader = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=dtype)

    def _path(self, path: str) -> str:
        path = os.fspath(path)
        if self.base_dir and not os.path.isabs(path):
            path = os.path.join(self.base_dir, path)
        return path

    def _read_itk(self, path: str, series: str | None = None) -> MetaTensor:
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
                    raise DMAFDataError(f"{path}: not a readable image file (ITK: {_itk_reason(reason)})") from None
            raise DMAFDataError(f"{path}: cannot read (ITK: {_itk_reason(exc)})") from None

    def read(self, path: str, series: str | None = None, image: bool = True) -> MetaTensor:
        """Read one file or DICOM series folder (``series``: its identifier when the folder holds several), with
        one-line errors; ``image=False`` (a label) skips the checks that only make sense for an MR image."""
        if os.path.isdir(path) or (os.path.isfile(path) and is_itk_file(path)):
            img = self._read_itk(path, series)
        elif not os.path.isfile(path):
            raise DMAFDataError(f"{path}: file not found")
        else:
            img = self._read_nifti(path)
        return self._check(path, img, image)

    def _read_nifti(self, path: str) -> MetaTensor:
        try:
            return self.loader(path)
        except Exception as exc:  # nibabel / gzip / MONAI reader errors
            if "cannot find a suitable reader" in str(exc):  # MONAI hides the reason: ask nibabel for it
                try:
                    nib.load(path).get_fdata()
                except Exception as reason:
                    raise DMAFDataError(f"{path}: not a readable NIfTI file ({_first_line(reason)})") from None
            raise DMAFDataError(f"{path}: cannot read ({_first_line(exc)})") from None

    def _cast_float64(self, path: str) -> bool:
        """Whether a NIfTI file stores float64 that this reader casts to float32 (huge values become inf)."""
        if self.dtype not in (np.float32, torch.float32) or not os.path.isfile(path) or is_itk_file(path):
            return False
        try:
            return nib.load(path).get_data_dtype() == np.float64
        except Exception:
            return False

    def _check(self, path: str, img: MetaTensor, image: bool = True) -> MetaTensor:
        if self.spatial_ndim is not None and img.ndim - 1 != self.spatial_ndim:
            shape = tuple(img.shape[1:]) if img.shape[0] == 1 else tuple(img.shape)
            raise DMAFDataError(
                f"{path}: is a {img.ndim - 1}-D image (shape {shape}), expected a {self.spatial_ndim}-D volume"
            )
        finite = torch.isfinite(img)
        if not bool(finite.all()):
            nan = int(torch.isnan(img).sum())
            inf = int((~finite).sum()) - nan
            kinds = " and ".join(k for k, n in (("NaN", nan), ("inf", inf)) if n)
            beyond = " (or beyond float32's range, in this float64 file)" if inf and self._cast_float64(path) else ""
            raise DMAFDataError(f"{path}: contains {kinds} voxels{beyond} ({nan + inf} of {img.numel()} not finite)")
        flat = img.reshape(img.shape[0], -1)
        low, high = torch.aminmax(flat, dim=1)  # one pass per channel
        big = max(-float(low.min()), float(high.max()))
        if img.dtype == torch.float64 and big > _FLOAT32_MAX:  # training and inference compute in float32: inf there
            raise DMAFDataError(f"{path}: values up to {big:.3g} in magnitude exceed float32's range "
                                f"({_FLOAT32_MAX:.3g}); the pipeline computes in float32")
        for c in range(flat.shape[0] if image else 0):
            where = f"{path}" + (f" (channel {c})" if flat.shape[0] > 1 else "")
            if low[c] == high[c] != 0:  # all zero is an absent modality; another constant is no image
                raise DMAFDataError(f"{where}: every voxel is {float(high[c]):g}: not an image (an all-zero file "
                                    "means a missing modality; remove the file to segment without it)")
            levels = _few_whole_levels(flat[c])
            if levels is not None and low[c] != high[c]:
                shown = ", ".join(f"{v:g}" for v in levels[:8]) + (", ..." if len(levels) > 8 else "")
                raise DMAFDataError(f"{where}: holds only {len(levels)} distinct whole-number values ({shown}): a "
                                    "label map or mask, not an MR image")
            if self.min_background is not None and (low[c] != 0 or high[c] != 0):  # (all zero: absent)
                zero = 1.0 - int(torch.count_nonzero(flat[c])) / flat.shape[1]  # no full-size temporary
                if zero < self.min_background:
                    raise DMAFDataError(
                        f"{where}: only {zero:.1%} of the voxels are 0, expected at least {self.min_background:.0%}: "
                        "the model expects skull-stripped images with a zero background, as BraTS (strip the skull "
                        "and set the background to 0 first)"
                    )
        if self.min_axis_size > 1 and min(img.shape[1:]) < self.min_axis_size:
            raise DMAFDataError(f"{path}: shape {tuple(img.shape[1:])} has an axis shorter than "
                                f"{self.min_axis_size}: a slice or slab, expected a 3-D volume")
        if self.anisotropy_ratio is not None:
            spacing = [abs(float(v)) for v in np.asarray(img.pixdim).ravel()[: img.ndim - 1]]
            if spacing and min(spacing) > 0 and max(spacing) / min(spacing) > self.anisotropy_ratio:
                logger.warning(
                    f"{path}: anisotropic voxels {tuple(round(v, 3) for v in spacing)} mm (ratio "
                    f"{max(spacing) / min(spacing):.1f} > {self.anisotropy_ratio:g}); structures thinner than "
                    f"{max(spacing):g} mm between its slices are not seen, even when the grid is resampled"
                )
        return img

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


class StudySpacingd(Spacingd):
    """MONAI ``Spacingd`` for a study loaded by :class:`LoadModalitiesd` (same arguments, same inverse).

    ``Spacingd`` treats every entry named ``<key>_*`` as a metadata dictionary of ``key`` and updates it with the
    resampled image's metadata (for NIfTI inputs); the study's ``<key>_available`` presence tensor is no dictionary.
    The entries that are not dictionaries are set aside during the call and put back unchanged.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        aside = {
            k: d.pop(k)
            for k in list(d)
            if isinstance(k, str) and any(k.startswith(f"{key}_") for key in self.keys) and not isinstance(d[k], dict)
        }
        d = super().__call__(d, lazy=lazy)
        d.update(aside)
        return d


class CheckLabelValuesd(MapTransform):
    """Raise a one-line :class:`DMAFDataError` when a label holds values outside ``allowed`` (names the file)."""

    def __init__(self, keys: KeysCollection, allowed: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.allowed = torch.as_tensor(sorted(int(v) for v in allowed))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from .data.check import label_values  # bincount for integer labels: ~10x faster than torch.unique

        d = dict(data)
        allowed = set(self.allowed.tolist())
        for key in self.key_iterator(d):
            bad = [v for v in label_values(d[key]) if v not in allowed]
            if bad:
                source = getattr(d[key], "meta", {}).get("filename_or_obj", key)
                raise DMAFDataError(
                    f"{source}: label values {[int(v) if float(v).is_integer() else v for v in bad[:5]]} outside the "
                    f"expected set {self.allowed.tolist()}"
                )
        return d


class RandFlipRotated(RandomizableTransform, MapTransform):
    """Random flips along each spatial axis, then a random rotation about the centre, in one resampling.

    Its draws have the distribution of MONAI's ``RandFlipd`` (one per axis, probability ``flip_prob`` each) followed by
    ``RandRotated`` (probability ``prob``, angles uniform in ``[-range, range]`` about each axis, the size kept, zero
    padding), and for the same draws it gives their result within float rounding (a test compares them voxel by
    voxel), at a lower cost on CPU:

    - a rotated sample is sampled once from the unflipped input, the flips folded into the sampling grid, and the grid
      is built once for all keys from three broadcast sums (``affine_grid`` builds it per key with a matrix product);
    - a sample that is not rotated is flipped along all drawn axes in one copy.

    The outputs are float32 torch tensors, as MONAI's ``RandRotated`` gives (``MetaTensor`` for ``MetaTensor`` input);
    a ``MetaTensor``'s affine is updated and its earlier operations kept, but this one is not recorded, so it cannot
    be inverted: it is a training augmentation.

    Args:
        keys: keys of the channel-first ``(C, H, W[, D])`` arrays to transform, all with the same spatial shape.
        flip_prob: probability of a flip along each spatial axis, drawn independently per axis.
        prob: probability of the rotation.
        range_x: angle range (radians) about the first axis; one number ``r`` means ``[-r, r]``.
        range_y: about the second axis (3-D only).
        range_z: about the third axis (3-D only).
        mode: interpolation of the rotation, ``"bilinear"`` or ``"nearest"``, one or one per key.
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"``, one or one per key.
        dtype: data type of the resampling (a torch or numpy dtype or its name); the output is float32, as MONAI's
            ``Rotate``.
        allow_missing_keys: don't raise an exception if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        flip_prob: float = 0.5,
        prob: float = 0.1,
        range_x: float | tuple[float, float] = 0.0,
        range_y: float | tuple[float, float] = 0.0,
        range_z: float | tuple[float, float] = 0.0,
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str | Sequence[str] = "zeros",
        dtype: torch.dtype | str = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=prob)
        self.flip_prob = float(flip_prob)
        self.ranges = []
        for r in (range_x, range_y, range_z):  # as MONAI's RandRotate: one number r means [-r, r]
            r = ensure_tuple(r)
            self.ranges.append(tuple(sorted([-r[0], r[0]])) if len(r) == 1 else (r[0], r[1]))
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = ensure_tuple_rep(padding_mode, len(self.keys))
        for m in self.mode:
            if m not in ("bilinear", "nearest"):
                raise ValueError(f"RandFlipRotated mode must be bilinear or nearest, got {m!r}.")
        self.dtype = get_equivalent_dtype(dtype, torch.Tensor)
        self.flips: list[bool] = []
        self.angles: tuple[float, ...] = ()

    def randomize(self, spatial_dims: int) -> None:  # type: ignore[override]
        """Draw the flips (one per axis, in axis order), then whether to rotate and the angles (x, y, z)."""
        self.flips = [bool(self.R.rand() < self.flip_prob) for _ in range(spatial_dims)]
        super().randomize(None)
        self.angles = tuple(float(self.R.uniform(*r)) for r in self.ranges)

    def sampling_matrix(self, shape: Sequence[int]) -> np.ndarray:
        """The ``(S+1, S+1)`` map from an output voxel index to the input voxel index it samples: the drawn flips, and
        the drawn rotation about the centre if it is applied."""
        spatial_dims = len(shape)
        matrix = np.eye(spatial_dims + 1)
        if self._do_transform:
            centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
            rotation = create_rotate(spatial_dims, self.angles[0] if spatial_dims == 2 else self.angles)
            matrix = create_translate(spatial_dims, centre) @ rotation @ create_translate(spatial_dims, -centre)
        flip = np.eye(spatial_dims + 1)
        for axis, flipped in enumerate(self.flips):
            if flipped:
                flip[axis, axis], flip[axis, -1] = -1.0, shape[axis] - 1.0
        return flip @ matrix

    @staticmethod
    def _grid(matrix: np.ndarray, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``grid_sample``'s ``(1, *shape, S)`` grid (last axis reversed, ``align_corners=False``) for ``matrix``."""
        spatial_dims = len(shape)
        grid = torch.empty(*shape, spatial_dims, dtype=dtype)
        for c in range(spatial_dims):  # input index along axis c, normalised: (2 p + 1) / n - 1
            scale = 2.0 / shape[c]
            component = None
            for d in range(spatial_dims):
                view = [1] * spatial_dims
                view[d] = shape[d]
                term = torch.arange(shape[d], dtype=torch.float64) * (scale * matrix[c, d])
                if d == 0:
                    term = term + (scale * matrix[c, -1] + 1.0 / shape[c] - 1.0)
                term = term.to(dtype).reshape(view)
                component = term if component is None else component + term
            grid[..., spatial_dims - 1 - c] = component
        return grid[None]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = next(self.key_iterator(d), None)
        if first is None:
            return d
        shape = tuple(d[first].shape[1:])
        for key in self.key_iterator(d):
            if tuple(d[key].shape[1:]) != shape:
                raise ValueError(
                    f"RandFlipRotated: '{key}' has spatial shape {tuple(d[key].shape[1:])}, '{first}' has {shape}."
                )
        self.randomize(len(shape))
        matrix = self.sampling_matrix(shape)
        grid = self._grid(matrix, shape, self.dtype) if self._do_transform else None
        dims = [axis + 1 for axis, flipped in enumerate(self.flips) if flipped]
        for key, mode, padding_mode in self.key_iterator(d, self.mode, self.padding_mode):
            img = d[key]
            array = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            if grid is not None:
                out = F.grid_sample(
                    array.to(self.dtype)[None], grid.to(array.device), mode=mode, padding_mode=padding_mode,
                    align_corners=False,
                )[0].to(torch.float32)
            else:  # float32 as MONAI's RandRotated (no copy for float32 input that is not flipped)
                out = (torch.flip(array, dims) if dims else array).to(torch.float32)
            if isinstance(img, MetaTensor):
                meta = dict(img.meta)  # a copy: the input may be a cached item
                step = to_affine_nd(img.affine.shape[0] - 1, torch.as_tensor(matrix, dtype=img.affine.dtype))
                meta["affine"] = img.affine @ step
                out = MetaTensor(out, meta=meta, applied_operations=list(img.applied_operations))
            d[key] = out
        return d


class ModalityDropd(RandomizableTransform, MapTransform):
    """Decide which modalities a sample shows, zero the others and write the bool ``(M,)`` ``modality_mask``.

    A modality is shown only if it is available (its file exists and is not all zero, ``image_available`` from
    :class:`LoadModalitiesd`, else the channel is checked) and:

    - ``mode="idt"``: the case's persistent presence vector ``data[mask_key]`` from the datalist allows it (imperfect
      data training; a case without one keeps all available modalities);
    - ``mode="pdt"``: it belongs to the combination drawn for this call, uniformly among the 2^M - 1 non-empty ones
      (perfect data training); a draw disjoint from the available modalities is drawn again;
    - ``mode="none"``: always (evaluation and inference: what is there is used).

    Place it last in the chain, after intensity augmentation, so that dropped channels are exactly zero.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mode: str = "idt",
        mask_key: str = "modality_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if mode not in ("idt", "pdt", "none"):
            raise ValueError(f"ModalityDropd mode must be idt, pdt or none, got {mode!r}.")
        self.mode = mode
        self.mask_key = mask_key

    def _draw(self, available: torch.Tensor) -> torch.Tensor:
        m = available.numel()
        patterns = [p for p in itertools.product((False, True), repeat=m) if any(p)]
        while True:
            choice = torch.tensor(patterns[self.R.randint(len(patterns))])
            if (choice & available).any():
                return choice & available

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            available = d.get(f"{key}{AVAILABLE_POSTFIX}")
            if available is None:
                available = study_modality_mask(torch.as_tensor(img)[None])[0]
            available = torch.as_tensor(available).bool().cpu()
            mask = available.clone()
            if self.mode == "idt" and d.get(self.mask_key) is not None:
                persistent = torch.as_tensor(d[self.mask_key]).bool().flatten().cpu()
                if persistent.numel() != available.numel():
                    raise DMAFDataError(
                        f"{d.get('case', key)}: modality_mask has {persistent.numel()} entries, "
                        f"expected {available.numel()}"
                    )
                mask = available & persistent
            elif self.mode == "pdt" and available.any():
                mask = self._draw(available)
            if not mask.any():
                raise DMAFDataError(f"{d.get('case', key)}: no modality present (all files missing or all zero)")
            shape = (-1,) + (1,) * (img.ndim - 1)
            d[key] = img * mask.to(device=img.device, dtype=img.dtype).reshape(shape)
            d[self.mask_key] = mask
        return d


class LabelToRegionsd(MapTransform):
    """Class-index label map ``(1, *spatial)`` -> binary region channels ``(R, *spatial)`` for region metrics.

    Example (BraTS, trained classes 1 NCR, 2 edema, 3 ET): ``{"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}``; MyoPS:
    ``{"LVB": [1], "RVB": [2], "MYO": [3]}``. A key holding logits/probabilities with more than one channel is
    reduced by argmax first.
    """

    def __init__(
        self, keys: KeysCollection, regions: Mapping[str, Sequence[int]], allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.regions = {name: [int(c) for c in classes] for name, classes in regions.items()}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            if lab.shape[0] > 1:
                lab = lab.argmax(0, keepdim=True)
            channels = [torch.isin(lab[0], torch.as_tensor(c, device=lab.device)) for c in self.regions.values()]
            d[key] = torch.stack(channels).to(torch.float32)
            if isinstance(lab, MetaTensor) and not isinstance(d[key], MetaTensor):
                d[key] = MetaTensor(d[key], meta=lab.meta)
        return d
