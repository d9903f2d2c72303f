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
"""The picture a person opens first: one PNG per segmented study (``--save_snapshot True``).

``<case>_snapshot.png``, next to the label map, shows the study on its input grid:

- three orthogonal slices (axial, coronal, sagittal) through the centre of mass of the predicted foreground, or
  through the volume's centre when nothing is predicted (the title then says so); a 2-D (slice by slice) model gets
  one panel: the slice it segmented with the most predicted foreground (the middle slice when there is none);
- one row per present modality, windowed at the 1st-99th percentile of its non-zero voxels, with the predicted
  labels overlaid in semi-transparent colours and a legend naming them (``BRATS_LABELS``/``MYOPS_LABELS``);
- with ``--save_weights True`` one more row: DMAF's modality weights a_m as a colour mix (one colour per
  modality) with the predicted foreground's outline, and each modality's mean weight inside it in the legend;
- with ``--save_uncertainty True`` one more row: the uncertainty map (:mod:`dmaf_components.uncertainty`, 0 black
  to 1 bright) with the predicted foreground's outline in white and the uncertain voxels' (at or above the report's
  threshold) in cyan, and their count in the legend;
- the missing modalities in the title.

Panels are slices of the input's voxel grid (no resampling of the picture), shown in the radiological convention
(patient's right on the left, anterior or superior up, the letters at the edges) with the voxel spacing as aspect,
and cropped to the box the network saw. Everything is drawn from arrays already in memory: the label map after it
is resampled back to the input grid, and the network's input (the preprocessed image), of which only the displayed
planes are sampled back onto the input grid (``grid_sample``); the percentiles come from a strided subsample.
The file is written like the label map: planned and collision-checked by
:func:`~dmaf_components.outputs.plan_outputs`, never over an input, kept unless ``overwrite``, atomically.

One concept in one module (about 550 lines): the picture's slice geometry, its drawing and its saving change
together, since a new row or panel touches all three.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .data.constants import BRATS_LABELS, MYOPS_LABELS, DMAFDataError
from .errors import as_bool, describe_failure
from .outputs import atomic_write, output_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "SNAPSHOT_POSTFIX",
    "snapshot_outputs",
    "class_names",
    "SliceView",
    "snapshot_views",
    "snapshot_figure",
    "save_figure",
    "SaveSnapshotd",
]

#: the picture of study ``case`` is ``<case>_snapshot.png``
SNAPSHOT_POSTFIX = "snapshot"

#: overlay colours per trained class index (index 0, background, is never drawn)
_CLASS_COLOURS = {
    "brats": [None, (0.95, 0.15, 0.15), (0.2, 0.85, 0.25), (1.0, 0.9, 0.0)],  # NCR/NET red, edema green, ET yellow
    "myops": [None, (0.95, 0.15, 0.15), (0.25, 0.55, 1.0), (0.2, 0.85, 0.25)],  # LV red, RV blue, myocardium green
}
#: colour of each modality channel in the weight row (mixed by a_m)
_MODALITY_COLOURS = [(1.0, 0.25, 0.2), (0.25, 0.9, 0.25), (0.3, 0.5, 1.0), (1.0, 0.85, 0.1), (0.9, 0.3, 0.9)]
_EMPTY_TEXT = {"brats": "no tumour predicted"}
_ALPHA = 0.45
#: display convention per view: vertical pair (top letter first), horizontal pair (left letter first)
_CONVENTION = {
    "axial": (("A", "P"), ("R", "L")),
    "coronal": (("S", "I"), ("R", "L")),
    "sagittal": (("S", "I"), ("A", "P")),
}
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


def snapshot_outputs(postfix: str = SNAPSHOT_POSTFIX) -> tuple[tuple[str, str], ...]:
    """``(postfix, ext)`` of the file written per study with snapshots on, for
    :func:`~dmaf_components.inference.plan_outputs`."""
    return ((postfix, ".png"),)


def class_names(dataset_name: str, num_classes: int) -> list[str]:
    """Name of each trained class index: BraTS from ``BRATS_LABELS`` (label values 0, 1, 2, 4 are classes 0..3),
    MyoPS from ``MYOPS_LABELS``, else ``class <i>``."""
    if dataset_name == "brats" and num_classes == len(BRATS_LABELS):
        return [BRATS_LABELS[v] for v in sorted(BRATS_LABELS)]
    if dataset_name == "myops" and num_classes == len(MYOPS_LABELS):
        return [MYOPS_LABELS[i] for i in range(num_classes)]
    return [f"class {i}" for i in range(num_classes)]


@dataclass(frozen=True)
class SliceView:
    """One displayed plane of the input grid.

    Attributes:
        name: ``axial``, ``coronal``, ``sagittal`` or ``slice`` (2-D models).
        axis: the array axis (0..2) sliced, ``index`` the slice.
        rows, cols: the array axes shown vertically and horizontally.
        flip_rows, flip_cols: whether they are reversed for display.
        top, left: the anatomical letters at the top and left edges (``?`` when the affine has no direction).
    """

    name: str
    axis: int
    index: int
    rows: int
    cols: int
    flip_rows: bool
    flip_cols: bool
    top: str = "?"
    left: str = "?"

    def plane(self, volume: np.ndarray) -> np.ndarray:
        """``volume[..., *spatial]`` -> its displayed plane ``[..., H, W]`` (leading axes kept)."""
        lead = volume.ndim - 3
        out = np.take(volume, self.index, axis=lead + self.axis)
        if self.rows > self.cols:
            out = np.swapaxes(out, -1, -2)
        if self.flip_rows:
            out = out[..., ::-1, :]
        if self.flip_cols:
            out = out[..., ::-1]
        return out


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _axcodes(affine: np.ndarray) -> tuple[str, ...] | None:
    from nibabel.orientations import aff2axcodes

    try:
        codes = aff2axcodes(affine)
    except Exception:
        return None
    return None if any(c is None for c in codes) else tuple(codes)


def _view(name: str, axis: int, index: int, codes: tuple[str, ...] | None) -> SliceView:
    rows, cols = [a for a in range(3) if a != axis]
    if codes is None:  # no direction: array order, no flips
        return SliceView(name, axis, index, rows, cols, False, False)
    vpair, hpair = _CONVENTION["axial" if name == "slice" else name]
    top, left = vpair[0], hpair[0]
    if codes[cols] in vpair and codes[rows] not in vpair:
        rows, cols = cols, rows
    # row index grows downwards: flip when the axis grows towards the top letter (same for columns and the left one)
    flip_rows, flip_cols = codes[rows] == top, codes[cols] == left
    top_letter = codes[rows] if flip_rows else _OPPOSITE[codes[rows]]
    left_letter = codes[cols] if flip_cols else _OPPOSITE[codes[cols]]
    return SliceView(name, axis, index, rows, cols, flip_rows, flip_cols, top_letter, left_letter)


def snapshot_views(
    label: Any, affine: Any, spatial_dims: int = 3
) -> tuple[list[SliceView], tuple[float, float, float] | None]:
    """The planes of a snapshot.

    Args:
        label: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` predicted label map on the input grid (0 is background).
        affine: ``(4, 4)`` voxel-to-world affine of the input grid (RAS world, as MONAI's readers give it).
        spatial_dims: 3: axial, coronal and sagittal planes through the foreground's centre of mass (the volume's
            centre, ``shape // 2``, when nothing is predicted); 2 (a model run slice by slice along the axial-most
            axis, as ``ModalitySliceInferer`` after ``Orientationd("RAS")``): that axis' slice with the most
            foreground (the middle slice when there is none).

    Returns:
        the views, and the foreground's centre of mass in voxels (None when the label is empty).
    """
    lab = _as_numpy(label)
    lab = lab.reshape(lab.shape[-3:])
    codes = _axcodes(_as_numpy(affine).astype(np.float64))
    if codes is None:
        sag, cor, axi = 0, 1, 2
    else:
        sag, cor, axi = (next(a for a, c in enumerate(codes) if c in pair) for pair in ("LR", "AP", "SI"))
    fg = lab > 0
    total = int(fg.sum())
    counts = fg.sum(axis=tuple(a for a in range(3) if a != axi)) if spatial_dims == 2 else None
    centre = None
    if total:  # centre of mass from the three projections
        centre = tuple(
            float((fg.sum(axis=tuple(b for b in range(3) if b != a)) * np.arange(lab.shape[a])).sum() / total)
            for a in range(3)
        )
    if spatial_dims == 2:
        index = int(np.argmax(counts)) if total else lab.shape[axi] // 2
        return [_view("slice", axi, index, codes)], centre
    if total:
        index = [min(int(round(c)), n - 1) for c, n in zip(centre, lab.shape)]
    else:
        centre, index = None, [n // 2 for n in lab.shape]
    views = [_view(name, a, index[a], codes) for name, a in (("axial", axi), ("coronal", cor), ("sagittal", sag))]
    return views, centre


def _plane_coordinates(view: SliceView, shape: Sequence[int]) -> np.ndarray:
    """Input-grid voxel coordinates ``(H, W, 3)`` of the displayed plane's pixels."""
    r = np.arange(shape[view.rows], dtype=np.float64)[:: -1 if view.flip_rows else 1]
    c = np.arange(shape[view.cols], dtype=np.float64)[:: -1 if view.flip_cols else 1]
    coords = np.empty((r.size, c.size, 3), np.float64)
    coords[..., view.axis] = view.index
    coords[..., view.rows] = r[:, None]
    coords[..., view.cols] = c[None, :]
    return coords


def _sample_planes(image: torch.Tensor, coords: np.ndarray, to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear samples of ``image`` ``(C, *S')`` at input-grid voxel coordinates ``coords`` ``(H, W, 3)``, mapped to
    the image's voxels by ``to_image`` ``(4, 4)``; zero outside. Returns ``(C, H, W)`` float32 and the inside mask."""
    ijk = coords @ to_image[:3, :3].T + to_image[:3, 3]
    size = np.asarray(image.shape[1:], dtype=np.float64)
    inside = np.all((ijk > -0.5) & (ijk < size - 0.5), axis=-1)
    norm = np.where(size > 1, 2.0 * ijk / np.maximum(size - 1, 1) - 1.0, 0.0)
    grid = torch.as_tensor(norm[..., ::-1].copy(), dtype=torch.float32, device=image.device)[None, None]
    vol = torch.as_tensor(image).float()[None]
    out = F.grid_sample(vol.as_subclass(torch.Tensor), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, :, 0].cpu().numpy(), inside


def _window(volume: torch.Tensor, max_samples: int = 1_000_000) -> tuple[float, float]:
    """1st and 99th percentile of the non-zero voxels of ``volume`` (a strided subsample of at most ~1e6 voxels)."""
    v = torch.as_tensor(volume).as_subclass(torch.Tensor)
    step = max(1, math.ceil((v.numel() / max_samples) ** (1.0 / v.ndim)))
    sub = v[(slice(None, None, step),) * v.ndim].float().reshape(-1)
    sub = sub[sub != 0]
    if sub.numel() == 0:
        return 0.0, 1.0
    lo, hi = torch.quantile(sub, torch.tensor([0.01, 0.99], device=sub.device)).tolist()
    return lo, hi if hi > lo else lo + 1.0


def _bbox(mask: np.ndarray, margin: int = 2) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return slice(None), slice(None)
    return (
        slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
        slice(max(cols[0] - margin, 0), cols[-1] + margin + 1),
    )


def snapshot_figure(
    image: Any,
    label: Any,
    affine: Any,
    modalities: Sequence[str],
    present: Sequence[bool] | torch.Tensor | None = None,
    weights: Any = None,
    image_affine: Any = None,
    uncertainty: Any = None,
    uncertainty_threshold: float | None = None,
    uncertainty_measure: str = "",
    label_values: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    dataset_name: str = "brats",
    spatial_dims: int = 3,
    case: str = "",
    panel_inches: float = 2.6,
) -> Figure:
    """The snapshot of one study as a matplotlib ``Figure`` (not registered with pyplot: nothing to close).

    Args:
        image: ``(M, *S')`` the modalities, either on the input grid (``image_affine`` None, ``S' == S``) or on any
            grid whose voxel-to-world affine is ``image_affine`` (the network's preprocessed input: only the displayed
            planes are sampled back onto the input grid, bilinear, zero outside). A ``MetaTensor``'s own affine is
            not used implicitly.
        label: ``(1, *S)`` or ``(*S)`` predicted label map on the input grid, in ``label_values`` (class indices
            when None).
        affine: ``(4, 4)`` affine of the input grid.
        modalities: the M modality names; ``present`` ``(M,)`` which the study has (default all): one row each.
        weights: ``(M, *S)`` DMAF's a_m on the input grid, or None (no weight row).
        uncertainty: ``(1, *S)`` or ``(*S)`` uncertainty map in [0, 1] on the input grid, or None (no uncertainty
            row); ``uncertainty_threshold``: the uncertain voxels' outline (None: none drawn);
            ``uncertainty_measure``: its name, in the row's label.
        names: name of each class index (default :func:`class_names`).
        dataset_name: ``brats`` or ``myops`` (names, colours and the empty-label text).
        spatial_dims: 3 (three orthogonal planes) or 2 (one slice, see :func:`snapshot_views`).
        case: the study's name, for the title.
        panel_inches: size of one panel.

    Returns:
        the figure; its axes are the panels row by row (``len(fig.axes) == views x (present [+ 1] [+ 1])``), each
        with ``ax.get_label()`` ``"<row>/<view>"`` (row: a modality, ``weights`` or ``uncertainty``).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    affine = _as_numpy(affine).astype(np.float64)
    lab = _as_numpy(label)
    lab = lab.reshape(lab.shape[-3:])
    shape = lab.shape
    m = len(modalities)
    present = [True] * m if present is None else [bool(p) for p in torch.as_tensor(present).reshape(-1).tolist()]
    rows = [i for i in range(m) if present[i]]
    missing = [modalities[i] for i in range(m) if not present[i]]
    values = list(label_values) if label_values is not None else list(range(int(lab.max()) + 1 if lab.size else 1))
    names = list(names) if names is not None else class_names(dataset_name, len(values))
    palette = _CLASS_COLOURS.get(dataset_name, [None] + [_MODALITY_COLOURS[i % 5] for i in range(len(values) - 1)])
    views, centre = snapshot_views(lab, affine, spatial_dims)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    if image_affine is None:
        if tuple(image.shape[1:]) != shape:
            raise ValueError(f"image {tuple(image.shape[1:])} is not on the label's grid {shape}: give image_affine")
        to_image = np.eye(4)
    else:
        to_image = np.linalg.inv(_as_numpy(image_affine).astype(np.float64)) @ affine
    img = (
        torch.as_tensor(image).as_subclass(torch.Tensor)
        if isinstance(image, torch.Tensor)
        else torch.as_tensor(np.asarray(image, dtype=np.float32))
    )
    windows = {i: _window(img[i]) for i in rows}
    lut = {int(v): k for k, v in enumerate(values)}
    fg = lab > 0
    w_np = None if weights is None else _as_numpy(weights)
    w_mean = None
    if w_np is not None and fg.any():
        w_mean = {i: float(w_np[i][fg].mean()) for i in rows}
    has_weights = w_np is not None
    u_np = None if uncertainty is None else _as_numpy(uncertainty).astype(np.float32).reshape(shape)
    has_uncertainty = u_np is not None
    u_row = len(rows) + int(has_weights)
    nrows, ncols = u_row + int(has_uncertainty), len(views)
    width = max(panel_inches * ncols + 0.4, 6.0)  # room for the title and the legends
    fig = Figure(figsize=(width, panel_inches * nrows + 1.5), dpi=100, layout="constrained")
    axes = fig.subplots(max(nrows, 1), ncols, squeeze=False)
    for c, view in enumerate(views):
        coords = _plane_coordinates(view, shape)
        sampled, inside = _sample_planes(img[rows] if rows else img[:0], coords, to_image)
        crop = _bbox(inside)
        lab_plane = view.plane(lab)[crop]
        cls = np.zeros(lab_plane.shape, np.int64)
        for v, k in lut.items():
            cls[lab_plane == v] = k
        overlay = np.zeros(cls.shape + (4,), np.float32)
        for k, colour in enumerate(palette[: len(values)]):
            if k and colour is not None:
                overlay[cls == k] = (*colour, _ALPHA)
        aspect = spacing[view.rows] / spacing[view.cols]
        n_slices = shape[view.axis]
        for r, i in enumerate(rows):
            ax = axes[r, c]
            lo, hi = windows[i]
            plane = sampled[r][crop]
            shown = np.clip((plane - lo) / (hi - lo), 0.0, 1.0)
            shown[plane == 0] = 0.0  # outside the body (zero before and after nonzero normalisation): black
            ax.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
            ax.imshow(overlay, aspect=aspect, interpolation="nearest")
            ax.set_label(f"{modalities[i]}/{view.name}")
        if has_weights:
            ax = axes[len(rows), c]
            wp = view.plane(w_np)[(slice(None),) + crop]
            mix = np.zeros(wp.shape[1:] + (3,), np.float32)
            for i in rows:
                mix += wp[i][..., None] * np.asarray(_MODALITY_COLOURS[i % 5], np.float32)
            ax.imshow(np.clip(mix, 0, 1), aspect=aspect, interpolation="nearest")
            if (cls > 0).any() and (cls == 0).any():
                ax.contour((cls > 0).astype(np.float32), levels=[0.5], colors="white", linewidths=0.7)
            ax.set_label(f"weights/{view.name}")
        if has_uncertainty:
            ax = axes[u_row, c]
            up = view.plane(u_np)[crop]
            ax.imshow(np.clip(up, 0, 1), cmap="magma", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
            if (cls > 0).any() and (cls == 0).any():
                ax.contour((cls > 0).astype(np.float32), levels=[0.5], colors="white", linewidths=0.7)
            if uncertainty_threshold is not None:
                flagged = (up >= uncertainty_threshold).astype(np.float32)
                if flagged.any() and not flagged.all():
                    ax.contour(flagged, levels=[0.5], colors="cyan", linewidths=0.7)
            ax.set_label(f"uncertainty/{view.name}")
        for r in range(nrows):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.02, 0.5, view.left, transform=ax.transAxes, color="white", fontsize=7, va="center")
            ax.text(0.5, 0.98, view.top, transform=ax.transAxes, color="white", fontsize=7, ha="center", va="top")
            if c == 0:
                if r < len(rows):
                    ylabel = modalities[rows[r]]
                elif has_uncertainty and r == u_row:
                    ylabel = f"uncertainty ({uncertainty_measure})" if uncertainty_measure else "uncertainty"
                else:
                    ylabel = "DMAF weights a_m"
                ax.set_ylabel(ylabel, fontsize=10)
        extra = " (most foreground)" if view.name == "slice" and centre is not None else ""
        axes[0, c].set_title(f"{view.name} {view.index}/{n_slices - 1}{extra}", fontsize=9)
    used = ", ".join(modalities[i] for i in rows) or "none"
    lines = [f"{case}: segmented from {used}" + (f"; missing: {', '.join(missing)}" if missing else "")]
    if centre is None:
        lines.append(_EMPTY_TEXT.get(dataset_name, "no foreground predicted"))
    elif spatial_dims == 2:
        lines.append(f"slice with the most predicted foreground ({int(fg.sum())} voxels)")
    else:
        lines.append(
            "slices through the predicted tumour's centre"
            if dataset_name == "brats"
            else "slices through the predicted foreground's centre"
        )
    fig.suptitle("\n".join(lines), fontsize=10)
    counts = {k: int((lab == v).sum()) for k, v in enumerate(values) if k}
    handles = [
        Patch(
            facecolor=(*palette[k], _ALPHA + 0.2),
            edgecolor=palette[k],
            label=f"{values[k]} {names[k]} ({counts[k]} voxels)",
        )
        for k in range(1, len(values))
        if k < len(palette) and palette[k]
    ]
    legend = fig.legend(
        handles=handles, loc="outside lower left", fontsize=8, title="predicted labels", title_fontsize=8, frameon=False
    )
    legend.set_in_layout(True)
    if has_weights:
        whandles = [
            Patch(
                facecolor=_MODALITY_COLOURS[i % 5],
                label=modalities[i] + (f" {w_mean[i]:.2f}" if w_mean is not None else ""),
            )
            for i in rows
        ]
        fig.legend(
            handles=whandles,
            loc="outside lower right",
            fontsize=8,
            frameon=False,
            title="a_m (colour mix)" + ("; mean in foreground" if w_mean is not None else ""),
            title_fontsize=8,
        )
    if has_uncertainty and uncertainty_threshold is not None:
        n = int((u_np >= uncertainty_threshold).sum())
        uhandles = [Patch(facecolor="none", edgecolor="cyan", label=f">= {uncertainty_threshold:g}: {n} voxels")]
        fig.legend(
            handles=uhandles, loc="outside lower center", fontsize=8, frameon=False, title="uncertain", title_fontsize=8
        )
    return fig


def save_figure(fig: Figure, target: str, overwrite: bool = False) -> str:
    """Write ``fig`` as PNG to ``target`` atomically (:func:`~dmaf_components.outputs.atomic_write`).

    Raises:
        DMAFDataError: ``target`` exists and ``overwrite`` is off, or it cannot be written (one line).
    """
    return atomic_write(
        target, lambda f: fig.savefig(f, format="png"), binary=True, overwrite=overwrite, what="the snapshot"
    )


class SaveSnapshotd(MapTransform):
    """Write a study's snapshot (:func:`snapshot_figure`) as ``<case>_snapshot.png`` next to its label map.

    Placed after ``Invertd`` (``data[key]``: the label map on the input grid, a ``MetaTensor`` whose affine is the
    input's), after :class:`~dmaf_components.weight_maps.SaveModalityWeightsd` (``data[weights_key]``, when
    present, already 0 for missing modalities) and after :class:`~dmaf_components.uncertainty.SaveUncertaintyd`
    (``data[uncertainty_key]`` on the input grid and its summary, with the threshold, when present).
    ``data[image_key]`` is the network's input, a ``MetaTensor`` on the preprocessed grid; ``data[mask_key]`` the
    ``(M,)`` modality mask. With ``enabled`` off (the bundle's default) it passes every sample unchanged.

    Args:
        keys: the label map key.
        enabled: ``--save_snapshot`` (``True``/``False`` or their strings).
        image_key, weights_key, mask_key, name_key, uncertainty_key, summary_key: data keys.
        modalities, label_values, dataset_name, spatial_dims: as :func:`snapshot_figure`.
        output_dir, output_postfix, separate_folder, overwrite: where and how, as
            :class:`~dmaf_components.outputs.AtomicSaveImaged` (``output_postfix`` default ``snapshot``).
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        enabled: Any = False,
        image_key: str = "image",
        weights_key: str = "weights",
        mask_key: str = "modality_mask",
        name_key: str = "case",
        uncertainty_key: str = "uncertainty",
        summary_key: str = "uncertainty_summary",
        modalities: Sequence[str] = (),
        label_values: Sequence[int] | None = None,
        dataset_name: str = "brats",
        spatial_dims: int = 3,
        output_dir: str = "./",
        output_postfix: str = SNAPSHOT_POSTFIX,
        separate_folder: Any = False,
        overwrite: Any = False,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.enabled = as_bool(enabled, "save_snapshot")
        self.image_key, self.weights_key, self.mask_key, self.name_key = image_key, weights_key, mask_key, name_key
        self.uncertainty_key, self.summary_key = uncertainty_key, summary_key
        self.modalities = tuple(modalities)
        self.label_values = None if label_values is None else [int(v) for v in label_values]
        self.dataset_name = str(dataset_name)
        self.spatial_dims = int(spatial_dims)
        self.output_dir = str(output_dir)
        self.output_postfix = str(output_postfix)
        self.separate_folder = as_bool(separate_folder, "separate_folder")
        self.overwrite = as_bool(overwrite)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            case = str(d.get(self.name_key, "study"))
            target = output_path(case, self.output_dir, self.output_postfix, ".png", self.separate_folder)
            if not self.overwrite and os.path.lexists(target):
                raise DMAFDataError(f"{target}: exists already; kept (pass --overwrite true to replace it)")
            pred, image = d[key], d[self.image_key]
            summary = d.get(self.summary_key) if isinstance(d.get(self.summary_key), Mapping) else {}
            try:
                fig = snapshot_figure(
                    image,
                    pred,
                    pred.affine,
                    self.modalities or [str(i) for i in range(image.shape[0])],
                    present=d.get(self.mask_key),
                    weights=d.get(self.weights_key),
                    image_affine=image.affine,
                    label_values=self.label_values,
                    dataset_name=self.dataset_name,
                    spatial_dims=self.spatial_dims,
                    case=case,
                    uncertainty=d.get(self.uncertainty_key),
                    uncertainty_threshold=summary.get("threshold"),
                    uncertainty_measure=summary.get("measure", ""),
                )
            except Exception as exc:
                raise DMAFDataError(f"{target}: cannot draw the snapshot ({describe_failure(exc)})") from None
            try:
                save_figure(fig, target, self.overwrite)
            finally:
                fig.clear()  # the figure is not registered with pyplot: clearing frees it at once
        return d
