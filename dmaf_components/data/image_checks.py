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
"""Whether an image that was read is one the pipeline can use, each refusal one line naming the file.

:func:`check_image` checks one image read by :class:`~dmaf_components.data.readers.ImageReader`: its number of
dimensions, finite voxels within float32's range, and for an MR image (not a label) that it is not constant, not a
label map or mask, has a zero background and no axis too short; very anisotropic voxels are a warning.
:func:`check_label_values` checks a label map's values against a dataset's label set. The training loader
(:class:`~dmaf_components.transforms.LoadModalitiesd`, :class:`~dmaf_components.transforms.CheckLabelValuesd`) and
``dmaf check`` (:mod:`dmaf_components.data.check`) use the same checks, so that they refuse the same files with the
same messages.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor

from .constants import DMAFDataError
from .readers import stores_float64

__all__ = ["MAX_LABEL_LEVELS", "check_image", "check_label_values", "label_values"]

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


def label_values(label: torch.Tensor) -> list[float]:
    """Distinct values of a label map, sorted.

    Integer-valued labels of a small range (all real ones) are counted with a bincount, 4-10x faster than
    ``torch.unique`` on a BraTS-size float32 label (one core); anything else falls back to ``torch.unique``.
    """
    x = label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)  # a MetaTensor's ops are slower
    x = x.flatten()
    if x.numel() == 0:
        return []
    if x.dtype == torch.bool or (not x.is_floating_point() and x.dtype not in (torch.uint8, torch.int8, torch.int16)):
        x = x.to(torch.int64)  # also the unsigned types that aminmax does not support
    lo, hi = (float(v) for v in torch.aminmax(x))
    if np.isfinite(lo) and np.isfinite(hi) and hi - lo <= 65535 and float(int(lo)) == lo:
        shifted = x - int(lo) if lo else x
        index = shifted.to(torch.uint8 if hi - lo <= 255 else torch.int32)
        if not x.is_floating_point() or torch.equal(index.to(x.dtype), shifted):  # integer-valued
            return [v + lo for v in torch.bincount(index).nonzero().flatten().tolist()]
    return torch.unique(x).tolist()


def _as_listed(values: Sequence[float]) -> list:
    """Label values as a message lists them: whole numbers as ints."""
    return [int(v) if float(v).is_integer() else float(v) for v in values]


def check_label_values(source: str, label: torch.Tensor, allowed: Sequence[float]) -> None:
    """Refuse a label map holding values outside ``allowed``.

    Args:
        source: what the message names (the label file).
        label: the label map.
        allowed: the dataset's label values, listed in this order by the message.

    Raises:
        DMAFDataError: ``SOURCE: label values [...] outside the expected set [...]`` (the first 5 values outside).
    """
    members = set(allowed)
    bad = [v for v in label_values(label) if v not in members]
    if bad:
        raise DMAFDataError(
            f"{source}: label values {_as_listed(bad[:5])} outside the expected set {_as_listed(allowed)}"
        )


def check_image(
    path: str,
    img: MetaTensor,
    image: bool = True,
    spatial_ndim: int | None = 3,
    min_background: float | None = None,
    min_axis_size: int = 1,
    anisotropy_ratio: float | None = None,
) -> MetaTensor:
    """Refuse an image the pipeline cannot use, with one line naming the file; return it when it can.

    Refused: a file that is not a ``spatial_ndim``-D volume, NaN or infinite voxels, float64 values beyond float32's
    range; and for an MR image (``image=True``; not a label) a constant non-zero channel (all zero is an absent
    modality), a label map or mask given as an image (at most :data:`MAX_LABEL_LEVELS` whole-number values), a
    background below ``min_background``, an axis shorter than ``min_axis_size``. Voxel spacings whose
    largest/smallest ratio exceeds ``anisotropy_ratio`` are logged as a warning naming the file.

    Args:
        path: the file (or DICOM folder) the image was read from; the messages name it.
        img: the image read, channel first ``(C, *spatial)``.
        image: False for a label, which skips the checks that only make sense for an MR image.
        spatial_ndim: number of spatial dimensions the image must have; None accepts any.
        min_background: fraction of a (not all-zero) channel's voxels that must be exactly 0; None does not check.
        min_axis_size: every spatial axis must have at least this many voxels.
        anisotropy_ratio: warn when the largest voxel spacing exceeds the smallest by more than this factor; None
            never warns.

    Raises:
        DMAFDataError: one line naming the file and what is wrong.
    """
    if spatial_ndim is not None and img.ndim - 1 != spatial_ndim:
        shape = tuple(img.shape[1:]) if img.shape[0] == 1 else tuple(img.shape)
        raise DMAFDataError(f"{path}: is a {img.ndim - 1}-D image (shape {shape}), expected a {spatial_ndim}-D volume")
    finite = torch.isfinite(img)
    if not bool(finite.all()):
        nan = int(torch.isnan(img).sum())
        inf = int((~finite).sum()) - nan
        kinds = " and ".join(k for k, n in (("NaN", nan), ("inf", inf)) if n)
        cast = inf and img.dtype == torch.float32 and stores_float64(path)  # float64 values read as float32
        beyond = " (or beyond float32's range, in this float64 file)" if cast else ""
        raise DMAFDataError(f"{path}: contains {kinds} voxels{beyond} ({nan + inf} of {img.numel()} not finite)")
    flat = img.reshape(img.shape[0], -1)
    low, high = torch.aminmax(flat, dim=1)  # one pass per channel
    big = max(-float(low.min()), float(high.max()))
    if img.dtype == torch.float64 and big > _FLOAT32_MAX:  # training and inference compute in float32: inf there
        raise DMAFDataError(
            f"{path}: values up to {big:.3g} in magnitude exceed float32's range "
            f"({_FLOAT32_MAX:.3g}); the pipeline computes in float32"
        )
    for c in range(flat.shape[0] if image else 0):
        where = f"{path}" + (f" (channel {c})" if flat.shape[0] > 1 else "")
        if low[c] == high[c] != 0:  # all zero is an absent modality; another constant is no image
            raise DMAFDataError(
                f"{where}: every voxel is {float(high[c]):g}: not an image (an all-zero file "
                "means a missing modality; remove the file to segment without it)"
            )
        levels = _few_whole_levels(flat[c])
        if levels is not None and low[c] != high[c]:
            shown = ", ".join(f"{v:g}" for v in levels[:8]) + (", ..." if len(levels) > 8 else "")
            raise DMAFDataError(
                f"{where}: holds only {len(levels)} distinct whole-number values ({shown}): a "
                "label map or mask, not an MR image"
            )
        if min_background is not None and (low[c] != 0 or high[c] != 0):  # (all zero: absent)
            zero = 1.0 - int(torch.count_nonzero(flat[c])) / flat.shape[1]  # no full-size temporary
            if zero < min_background:
                raise DMAFDataError(
                    f"{where}: only {zero:.1%} of the voxels are 0, expected at least {min_background:.0%}: "
                    "the model expects skull-stripped images with a zero background, as BraTS (strip the skull "
                    "and set the background to 0 first)"
                )
    if min_axis_size > 1 and min(img.shape[1:]) < min_axis_size:
        raise DMAFDataError(
            f"{path}: shape {tuple(img.shape[1:])} has an axis shorter than "
            f"{min_axis_size}: a slice or slab, expected a 3-D volume"
        )
    if anisotropy_ratio is not None:
        spacing = [abs(float(v)) for v in np.asarray(img.pixdim).ravel()[: img.ndim - 1]]
        if spacing and min(spacing) > 0 and max(spacing) / min(spacing) > anisotropy_ratio:
            logger.warning(
                f"{path}: anisotropic voxels {tuple(round(v, 3) for v in spacing)} mm (ratio "
                f"{max(spacing) / min(spacing):.1f} > {anisotropy_ratio:g}); structures thinner than "
                f"{max(spacing):g} mm between its slices are not seen, even when the grid is resampled"
            )
    return img
