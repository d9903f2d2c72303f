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
"""Brain phantoms on real anatomy with MR contrast from the sequences' signal equations (BraTS layout).

The anatomy is the MNI ICBM152 2009a nonlinear symmetric template (T1 and grey/white-matter probability maps at
1 mm), as shipped inside the ``nilearn`` wheel (``nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_converted``)
or any folder holding those three files. Each case:

1. deforms the template smoothly and at random (a global scale and a smooth displacement field), so that no two
   cases share one brain;
2. grows a glioma at a random place in the white matter: an irregular core (an enhancing rim around non-enhancing
   tumour and, in most cases, necrosis) inside vasogenic edema that spreads preferentially along white matter;
3. gives every voxel a mixture of tissues (the template's partial-volume fractions, with the tumour's compartments
   replacing brain tissue) and computes each sequence's magnetisation from the tissues' T1, T2 and proton density
   (:data:`TISSUES`) with the sequence's signal equation (:data:`SEQUENCES`); T1ce adds gadolinium to the enhancing
   rim, shortening its T1 by the contrast agent's relaxivity;
4. adds a smooth receive-bias field, a per-sequence gain and Rician noise, and sets the background to 0
   (skull-stripped, as BraTS).

No intensity is picked per tissue and sequence: the contrast follows from the physics, so every sequence shows the
tumour partly, as in real scans (edema bright in FLAIR and T2, darker than white matter in T1; the rim bright only
after gadolinium; necrosis dark in T1 and FLAIR, bright in T2), and the rare sequences stay informative.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.special import expit

from .constants import DMAFDataError

__all__ = [
    "Tissue",
    "MRSequence",
    "TISSUES",
    "SEQUENCES",
    "GADOLINIUM_R1",
    "GADOLINIUM_CONCENTRATION",
    "TEMPLATE_FILES",
    "signal",
    "find_template_dir",
    "AnatomyTemplate",
    "load_template",
    "anatomy_case",
    "case_arrays_to_nifti",
]


class Tissue(NamedTuple):
    """Relaxation times in ms and proton density (water content relative to free water) of one tissue at 1.5 T."""

    t1: float
    t2: float
    pd: float


#: Tissue parameters at 1.5 T. Normal brain: T1 and T2 of white and grey matter from Stanisz et al., "T1, T2
#: relaxation and magnetization transfer in tissue at 3T", Magn Reson Med 2005;54:507-512 (their 1.5 T column: WM
#: 884/72 ms, GM 1124/95 ms); proton densities are the usual water contents (WM 0.70, GM 0.80, CSF 1.0).
#: CSF: free water near body temperature (T1 about 4 s, T2 about 2 s). The tumour's compartments are representative
#: values, not one publication's table: vasogenic edema and tumour carry more free water than the white matter
#: around them (longer T1 and T2, higher PD), necrosis is fluid-like but not CSF (cell debris, protein).
TISSUES: dict[str, Tissue] = {
    "wm": Tissue(884.0, 72.0, 0.70),
    "gm": Tissue(1124.0, 95.0, 0.80),
    "csf": Tissue(4000.0, 2000.0, 1.00),
    "edema": Tissue(1250.0, 150.0, 0.86),
    "tumour": Tissue(1300.0, 120.0, 0.84),  # non-enhancing tumour core and, before contrast, the enhancing rim
    "necrosis": Tissue(2200.0, 300.0, 0.92),
}

#: r1 relaxivity of a gadolinium agent in plasma at 1.5 T, in 1/(mM s) (gadobutrol is about 5; Rohrer et al., Invest
#: Radiol 2005;40:715-724)
GADOLINIUM_R1 = 5.0
#: gadolinium in the enhancing rim's extravascular space after a standard dose, in mM (where the blood-brain barrier
#: is intact the agent stays in the blood, a few per cent of the volume: not modelled)
GADOLINIUM_CONCENTRATION = 0.2


class MRSequence(NamedTuple):
    """One clinical sequence: its kind (``se``: spin echo; ``ir``: inversion recovery) and timings in ms. ``ti`` None
    for an IR sequence means: null CSF."""

    kind: str
    tr: float
    te: float
    ti: float | None = None


#: BraTS's four sequences as 1.5 T protocols: T1 as an inversion-prepared T1-weighted acquisition (MPRAGE-like,
#: modelled as inversion recovery: TI 800 ms, TR 2000 ms, TE 4 ms; a T1-weighted spin echo at these field strengths
#: shows almost no grey/white contrast, its T1 weighting cancelled by white matter's lower proton density), T1ce the
#: same protocol with the agent, T2-weighted spin echo, FLAIR with CSF nulled
SEQUENCES: dict[str, MRSequence] = {
    "t1": MRSequence("ir", tr=2000.0, te=4.0, ti=800.0),
    "t1ce": MRSequence("ir", tr=2000.0, te=4.0, ti=800.0),
    "t2": MRSequence("se", tr=4000.0, te=100.0),
    "flair": MRSequence("ir", tr=9000.0, te=120.0, ti=None),
}

#: the template's files (1 mm, 197 x 233 x 189)
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def _csf_null_ti(tr: float) -> float:
    """Inversion time that nulls CSF: 1 - 2 exp(-TI/T1) + exp(-TR/T1) = 0."""
    t1 = TISSUES["csf"].t1
    return -t1 * math.log((1.0 + math.exp(-tr / t1)) / 2.0)


def signal(seq: MRSequence, t1: np.ndarray | float, t2: np.ndarray | float, pd: np.ndarray | float) -> np.ndarray:
    """Magnitude signal of a tissue in a sequence (arbitrary units: PD 1 and full recovery give 1).

    - spin echo: ``PD (1 - exp(-TR/T1)) exp(-TE/T2)``;
    - inversion recovery (FLAIR): ``PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)``, with ``TI`` nulling CSF when
      the sequence gives none.

    Args:
        seq: the sequence.
        t1: T1 in ms (array or scalar).
        t2: T2 in ms.
        pd: proton density.

    Returns:
        the signal, broadcast over the inputs.
    """
    t1, t2, pd = (np.asarray(v, dtype=np.float64) for v in (t1, t2, pd))
    decay = np.exp(-seq.te / t2)
    if seq.kind == "se":
        return pd * (1.0 - np.exp(-seq.tr / t1)) * decay
    if seq.kind == "ir":
        ti = _csf_null_ti(seq.tr) if seq.ti is None else seq.ti
        return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-seq.tr / t1)) * decay
    raise ValueError(f"unknown sequence kind {seq.kind!r}; expected 'se' or 'ir'")


def find_template_dir(template_dir: str | None = None) -> str:
    """The folder holding :data:`TEMPLATE_FILES`: ``template_dir`` when given, else the installed ``nilearn``
    package's ``datasets/data`` (``pip install nilearn``, or ``pip install -e ".[anatomy]"``).

    Raises:
        DMAFDataError: one line naming what is missing and how to get it.
    """
    if template_dir is None:
        spec = importlib.util.find_spec("nilearn")
        if spec is None or not spec.submodule_search_locations:
            raise DMAFDataError(
                "the anatomy profile needs the MNI ICBM152 2009a templates: pip install nilearn (they ship inside its "
                "wheel), or pass --template_dir with the three mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz files"
            )
        template_dir = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    missing = [f for f in TEMPLATE_FILES.values() if not os.path.isfile(os.path.join(template_dir, f))]
    if missing:
        found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(template_dir, "mni_icbm152_*")))
        raise DMAFDataError(
            f"{template_dir}: missing template file(s) {', '.join(missing)} (found: {', '.join(found) or 'none'})"
        )
    return template_dir


class AnatomyTemplate(NamedTuple):
    """Tissue fractions of the template on the phantom's grid.

    Attributes:
        wm: ``(X, Y, Z)`` white-matter fraction in [0, 1].
        gm: grey-matter fraction.
        csf: CSF fraction (inside the brain: ventricles, sulci).
        spacing: voxel size in mm.
    """

    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    spacing: float


def load_template(template_dir: str | None = None, spacing: float = 2.0, margin_mm: float = 6.0) -> AnatomyTemplate:
    """Read the template, crop it to the brain with a margin, and resample it to ``spacing`` mm (area-averaged, so
    the fractions keep their partial volume).

    The brain is where grey or white matter is likely (> 0.1) with its holes filled (the ventricles); CSF is the rest
    of the brain's volume.

    Args:
        template_dir: folder of :data:`TEMPLATE_FILES` (see :func:`find_template_dir`).
        spacing: voxel size of the phantom in mm (an integer multiple of 1 mm is exact; others are interpolated).
        margin_mm: background kept around the brain.

    Returns:
        :class:`AnatomyTemplate`.
    """
    if not spacing > 0:
        raise DMAFDataError(f"--spacing: must be positive, got {spacing}")
    folder = find_template_dir(template_dir)
    maps = {}
    for key in ("gm", "wm"):
        img = nib.load(os.path.join(folder, TEMPLATE_FILES[key]))
        maps[key] = np.clip(np.asarray(img.dataobj, dtype=np.float32) / 255.0, 0.0, 1.0)
    parenchyma = maps["gm"] + maps["wm"]
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(parenchyma > 0.1, iterations=3))
    total = np.maximum(parenchyma, 1.0)  # fractions that sum past 1 are scaled back
    wm, gm = maps["wm"] / total * brain, maps["gm"] / total * brain
    csf = np.clip(brain - wm - gm, 0.0, 1.0)
    idx = np.argwhere(brain)
    lo = np.maximum(idx.min(0) - int(margin_mm), 0)
    hi = np.minimum(idx.max(0) + int(margin_mm) + 1, brain.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    out = []
    for frac in (wm, gm, csf):
        f = frac[crop]
        if float(spacing) != 1.0:
            f = ndimage.zoom(ndimage.uniform_filter(f, size=max(int(round(spacing)), 1)), 1.0 / float(spacing), order=1)
        out.append(np.clip(f, 0.0, 1.0).astype(np.float32))
    return AnatomyTemplate(out[0], out[1], out[2], float(spacing))


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], scale_vox: float) -> np.ndarray:
    """A smooth random field of unit standard deviation whose features are about ``scale_vox`` voxels across."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(scale_vox, 0.5))
    return (field / max(float(field.std()), 1e-8)).astype(np.float32)


def _deform(template: AnatomyTemplate, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The template's fractions after a random global scale (+-8 % per axis) and a smooth displacement field
    (about 3 mm), resampled linearly on the same grid."""
    shape = template.wm.shape
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    centre = [(s - 1) / 2.0 for s in shape]
    scale = rng.uniform(0.92, 1.08, size=3)
    amp = 3.0 / template.spacing  # displacement in voxels
    coords = []
    for axis in range(3):
        disp = amp * _smooth_noise(rng, shape, 20.0 / template.spacing)
        coords.append(centre[axis] + (grid[axis] - centre[axis]) / scale[axis] + disp)
    warped = [
        ndimage.map_coordinates(f, coords, order=1, mode="constant", cval=0.0)
        for f in (template.wm, template.gm, template.csf)
    ]
    return warped[0], warped[1], warped[2]


def _tumour(wm: np.ndarray, brain_frac: np.ndarray, spacing: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fractions of the tumour's compartments (``edema``, ``rim``, ``core``, ``necrosis``) in [0, 1], each voxel's
    sum at most 1: an irregular core (radius 10-25 mm; rim 3-6 mm thick; necrosis in 80 % of the cases) centred in
    white matter away from the brain's edge, edema reaching 8-25 mm beyond it, farther along white matter."""
    shape = wm.shape
    inner = ndimage.binary_erosion(brain_frac > 0.5, iterations=max(int(round(15.0 / spacing)), 1))
    candidates = np.argwhere(inner & (wm > 0.6))
    if len(candidates) == 0:
        candidates = np.argwhere(brain_frac > 0.5)
    centre = candidates[rng.integers(len(candidates))].astype(np.float32)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre))) * spacing  # mm
    irregular = 1.0 + 0.22 * _smooth_noise(rng, shape, 6.0 / spacing)
    d = dist / np.clip(irregular, 0.5, 1.5)
    r_core = rng.uniform(10.0, 25.0)
    rim = rng.uniform(3.0, 6.0)
    r_nec = (r_core - rim) * rng.uniform(0.3, 0.8) if rng.random() < 0.8 else 0.0
    edema_reach = rng.uniform(8.0, 25.0) * (0.35 + 0.65 * np.clip(wm / np.maximum(brain_frac, 1e-3), 0.0, 1.0))
    soft = 0.5 * spacing  # a boundary's partial-volume width in mm

    def inside(radius):
        return expit((radius - d) / soft)

    whole_core = inside(r_core)
    necrosis = inside(r_nec) if r_nec > 0 else np.zeros(shape, np.float32)
    non_rim = inside(r_core - rim)
    rim_f = whole_core - non_rim
    core_f = non_rim - necrosis
    edema = np.clip(inside(r_core + edema_reach) - whole_core, 0.0, 1.0)
    tumour = {"edema": edema, "rim": rim_f, "core": core_f, "necrosis": necrosis}
    return {k: (np.clip(v, 0.0, 1.0) * (brain_frac > 0.05)).astype(np.float32) for k, v in tumour.items()}


def anatomy_case(
    template: AnatomyTemplate, seed: int, noise: float = 0.03, bias: float = 0.15
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One phantom: four sequences and the BraTS label map on the template's grid.

    Args:
        template: :func:`load_template`'s output.
        seed: the case's seed (anatomy deformation, tumour, bias, gain and noise).
        noise: Rician noise, standard deviation relative to white matter's T1-weighted signal (0.03: SNR about 33).
        bias: amplitude of the smooth receive-bias field (exp(+-bias)).

    Returns:
        ``({modality: float32 volume}, uint8 label)``: labels 0 background, 1 necrosis and non-enhancing tumour,
        2 edema, 4 enhancing tumour (BraTS2020), each voxel's label its largest tumour fraction when that is at least
        a half, else 0; images 0 outside the brain.
    """
    rng = np.random.default_rng([int(seed), 2026])
    wm, gm, csf = _deform(template, rng)
    brain_frac = np.clip(wm + gm + csf, 0.0, 1.0)
    brain = brain_frac > 0.5
    tum = _tumour(wm, brain_frac, template.spacing, rng)
    tumour_total = np.clip(sum(tum.values()), 0.0, 1.0)
    keep = np.clip(1.0 - tumour_total, 0.0, 1.0)  # the tumour displaces normal tissue
    fractions = {
        "wm": wm * keep,
        "gm": gm * keep,
        "csf": csf * keep,
        "edema": tum["edema"],
        "tumour": tum["core"] + tum["rim"],
        "necrosis": tum["necrosis"],
    }
    label = np.zeros(wm.shape, dtype=np.uint8)
    stack = np.stack([tum["necrosis"] + tum["core"], tum["edema"], tum["rim"]])  # labels 1, 2, 4
    best = stack.argmax(0)
    present = (stack.max(0) >= 0.5) & brain
    label[present] = np.array([1, 2, 4], dtype=np.uint8)[best[present]]

    reference = float(signal(SEQUENCES["t1"], *TISSUES["wm"]))  # the noise scale: WM in T1
    images = {}
    for modality, seq in SEQUENCES.items():
        img = np.zeros(wm.shape, dtype=np.float64)
        for name, frac in fractions.items():
            t = TISSUES[name]
            if modality == "t1ce" and name == "tumour":  # gadolinium in the rim only: split the compartment
                rim_t1 = 1.0 / (1.0 / t.t1 + GADOLINIUM_R1 * GADOLINIUM_CONCENTRATION / 1000.0)
                img += tum["rim"] * signal(seq, rim_t1, t.t2, t.pd)
                img += tum["core"] * signal(seq, t.t1, t.t2, t.pd)
            else:
                img += frac * signal(seq, t.t1, t.t2, t.pd)
        field = np.exp(bias * np.clip(_smooth_noise(rng, wm.shape, 40.0 / template.spacing), -2.5, 2.5))
        gain = rng.uniform(0.9, 1.1)
        sigma = noise * reference
        real = img * field + rng.normal(0.0, sigma, wm.shape)
        imag = rng.normal(0.0, sigma, wm.shape)
        img = np.sqrt(real**2 + imag**2) * gain / reference  # magnitude: Rician; WM in T1 about 1
        img = np.maximum(img, 1e-3)  # a brain voxel is never exactly 0 (0 marks the background)
        img[~brain] = 0.0
        images[modality] = img.astype(np.float32)
    return images, label


def _affine(spacing: float) -> np.ndarray:
    """A diagonal affine of ``spacing`` mm voxels (RAS, origin at the first voxel)."""
    return np.diag([spacing, spacing, spacing, 1.0])


def case_arrays_to_nifti(images: Mapping[str, np.ndarray], label: np.ndarray, spacing: float):
    """NIfTI images of one phantom (float32 modalities, uint8 label) with the phantom's voxel size."""
    aff = _affine(spacing)
    return ({m: nib.Nifti1Image(v, aff) for m, v in images.items()}, nib.Nifti1Image(label, aff))
