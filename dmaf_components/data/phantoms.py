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
"""The phantoms of ``dmaf synthetic``'s ``demo`` and ``study`` profiles: one BraTS-like brain volume or one MyoPS-like
cardiac stack per seed, with its label map, deterministic.

Modality contributions are heterogeneous as in the paper's data: edema shows mainly in FLAIR and T2, the enhancing
rim in T1ce, the necrotic core in T1ce and T2, T1 is the weakest; in MyoPS the blood pools and myocardium show in
bSSFP, scar is bright in LGE, edema in T2. The ``anatomy`` profile's brains are :mod:`.anatomy`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .constants import BRATS_MODALITIES, MYOPS_MODALITIES, DMAFDataError

__all__ = ["brats_case", "myops_case", "check_profile"]

# mean intensity of each tissue in each modality (arbitrary units, x1000 when saved)
#            background-brain tissues: WM, GM, CSF; tumour: edema, enhancing, necrotic
_BRATS_CONTRAST = {
    "flair": {"wm": 0.45, "gm": 0.55, "csf": 0.10, "edema": 1.15, "et": 0.95, "ncr": 0.60},
    "t1": {"wm": 0.80, "gm": 0.62, "csf": 0.25, "edema": 0.50, "et": 0.72, "ncr": 0.32},
    "t1ce": {"wm": 0.78, "gm": 0.60, "csf": 0.22, "edema": 0.58, "et": 1.45, "ncr": 0.28},
    "t2": {"wm": 0.40, "gm": 0.55, "csf": 1.00, "edema": 0.95, "et": 0.75, "ncr": 1.20},
}
_MYOPS_CONTRAST = {
    "bssfp": {"body": 0.45, "myo": 0.30, "lv": 1.00, "rv": 0.95, "edema": 0.32, "scar": 0.30},
    "lge": {"body": 0.35, "myo": 0.08, "lv": 0.60, "rv": 0.55, "edema": 0.12, "scar": 1.25},
    "t2": {"body": 0.40, "myo": 0.35, "lv": 0.20, "rv": 0.20, "edema": 0.95, "scar": 0.50},
}


def _smooth_field(gen: torch.Generator, shape: Sequence[int], coarse: int = 5) -> np.ndarray:
    """Smooth random field in about [-1, 1]: coarse Gaussian noise upsampled (trilinear/bilinear)."""
    dims = len(shape)
    noise = torch.randn((1, 1) + (coarse,) * dims, generator=gen)
    mode = "trilinear" if dims == 3 else "bilinear"
    field = F.interpolate(noise, size=tuple(shape), mode=mode, align_corners=True)[0, 0]
    return (field / field.abs().max().clamp_min(1e-6)).numpy()


def _grid(shape: Sequence[int]) -> list[np.ndarray]:
    axes = [np.linspace(-1.0, 1.0, s, dtype=np.float32) for s in shape]
    return np.meshgrid(*axes, indexing="ij")


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=gen))


_PROFILES = ("demo", "study")


def check_profile(profile: str, dataset: str = "myops") -> None:
    allowed = _PROFILES + (("anatomy",) if dataset == "brats" else ())
    if profile not in allowed:
        raise DMAFDataError(f"profile: expected {', '.join(allowed[:-1])} or {allowed[-1]}, got {profile!r}")


def _brats_tissues(
    regions: dict[str, np.ndarray], contrast: dict[str, float], gen: torch.Generator, shape: Sequence[int]
) -> tuple[float, np.ndarray]:
    """A modality's gain (+-15 %) and its piecewise-constant tissue image (each tissue's contrast with a per-case
    jitter of +-8 %), drawn in this order from ``gen``."""
    gain = _uniform(gen, 0.85, 1.15)
    img = np.zeros(shape, dtype=np.float32)
    for name in ("wm", "gm", "csf", "edema", "et", "ncr"):  # tumour last: it overrides tissue
        img[regions[name]] = contrast[name] * _uniform(gen, 0.92, 1.08)
    return gain, img


def brats_case(
    shape: Sequence[int] = (240, 240, 155), seed: int = 0, profile: str = "demo"
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One synthetic skull-stripped brain with a glioma.

    Args:
        shape: volume size.
        seed: case seed.
        profile: ``demo`` (every tumour region differs from its surroundings in every modality, most clearly in one or
            two: the README demo and the tests) or
            ``study`` (the 3-D ablation study's data, docs/accuracy.md: each modality leaves a tumour boundary
            invisible, partial volume, Rician noise, strong bias fields). The shapes are the same for both profiles.

    Returns:
        ``({modality: int16 volume}, uint8 label)`` with labels 0/1/2/4 as in BraTS2020.
    """
    check_profile(profile)
    gen = torch.Generator().manual_seed(int(seed))
    shape = tuple(int(s) for s in shape)
    x, y, z = _grid(shape)
    radii = (_uniform(gen, 0.70, 0.80), _uniform(gen, 0.80, 0.90), _uniform(gen, 0.75, 0.85))
    warp = 0.06 * _smooth_field(gen, shape, 4)
    r = np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2) + warp
    brain = r < 1.0
    tissue = np.zeros(shape, dtype=np.uint8)  # 1 WM, 2 GM, 3 CSF
    tissue[brain] = 1
    tissue[brain & (r > 0.78 + 0.05 * _smooth_field(gen, shape, 6))] = 2
    for side in (-1.0, 1.0):  # lateral ventricles
        v = ((x - side * 0.12) / 0.08) ** 2 + (y / 0.25) ** 2 + ((z - 0.05) / 0.12) ** 2
        tissue[brain & (v < 1.0)] = 3

    # tumour: a distorted ellipsoid core (enhancing rim + necrosis) inside a larger edema
    centre = [_uniform(gen, -0.35, 0.35), _uniform(gen, -0.4, 0.4), _uniform(gen, -0.3, 0.3)]
    core = [_uniform(gen, 0.08, 0.2) for _ in range(3)]
    t = np.sqrt(sum(((c - c0) / rc) ** 2 for c, c0, rc in zip((x, y, z), centre, core)))
    t = t * (1.0 + 0.25 * _smooth_field(gen, shape, 6))
    edema_extent = _uniform(gen, 1.4, 2.2)
    necrotic_frac = _uniform(gen, 0.0, 0.6)  # some tumours have (almost) no necrotic core
    label = np.zeros(shape, dtype=np.uint8)
    label[brain & (t < edema_extent)] = 2
    label[brain & (t < 1.0)] = 4
    label[brain & (t < necrotic_frac)] = 1

    regions = {
        "wm": tissue == 1,
        "gm": tissue == 2,
        "csf": tissue == 3,
        "edema": label == 2,
        "et": label == 4,
        "ncr": label == 1,
    }
    if profile == "study":
        return _brats_study_images(regions, brain, int(seed)), label
    images = {}
    bias = np.exp(0.15 * _smooth_field(gen, shape, 3))
    for modality in BRATS_MODALITIES:
        gain, img = _brats_tissues(regions, _BRATS_CONTRAST[modality], gen, shape)
        texture = 0.04 * _smooth_field(gen, shape, 12)
        noise = torch.randn(shape, generator=gen).numpy() * 0.03
        img = np.clip((img + texture + noise) * bias * gain * 1000.0, 1.0, 32767.0)  # brain voxels stay > 0
        img[~brain] = 0.0
        images[modality] = img.astype(np.int16)
    return images, label


#: the ablation study's MyoPS profile (docs/accuracy.md, design v2): every modality leaves some structure invisible,
#: so which modalities are present matters even to a network that uses context and shape.
#: bSSFP: bright blood, the myocardium's outer border only weakly darker than its surroundings, edema half-way to
#: blood. LGE: nulled myocardium as dark as its surroundings (no outer border), edema as bright as blood, scar
#: brightest. T2 (black blood): both blood pools as dark as the surroundings (the RV is invisible), myocardium
#: brighter, edema brightest.
_MYOPS_STUDY_CONTRAST = {
    "bssfp": {"body": 0.45, "myo": 0.32, "lv": 1.00, "rv": 0.90, "edema": 0.70, "scar": 0.32},
    "lge": {"body": 0.08, "myo": 0.06, "lv": 0.55, "rv": 0.50, "edema": 0.52, "scar": 1.20},
    "t2": {"body": 0.12, "myo": 0.40, "lv": 0.10, "rv": 0.10, "edema": 0.90, "scar": 0.42},
}
#: per-modality noise level (Rician, relative to the contrast scale) and bias-field amplitude of the study profile
_MYOPS_STUDY_NOISE = {"bssfp": 0.15, "lge": 0.15, "t2": 0.15}
_MYOPS_STUDY_BIAS = 0.40


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 2-D or 3-D image (partial volume at tissue borders): separable, last axis first,
    replicate padding.

    3-D uses ``scipy.ndimage.correlate1d``, whose result does not depend on the thread count (PyTorch picks its
    3-D convolution kernel by size and threads, so parallel and serial synthesis could differ in the last bit).
    2-D keeps the PyTorch convolutions that made study 1's data (docs/accuracy.md), bit for bit.
    """
    radius = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    if img.ndim == 3:
        from scipy.ndimage import correlate1d

        out = np.ascontiguousarray(img, dtype=np.float32)
        for axis in (2, 1, 0):
            out = correlate1d(out, k.numpy(), axis=axis, mode="nearest")  # nearest = replicate padding
        return out
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    t = F.conv2d(F.pad(t, (radius, radius, 0, 0), mode="replicate"), k.reshape(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, radius, radius), mode="replicate"), k.reshape(1, 1, -1, 1))
    return t[0, 0].numpy()


#: the 3-D ablation study's BraTS profile (docs/accuracy.md, study 2): each modality leaves one tumour boundary
#: invisible, as the paper's data does to a lesser degree. FLAIR: edema bright, the enhancing rim as bright as edema
#: (no TC/ET boundary). T1: the tumour nearly isointense (the weakest modality). T1ce: the enhancing rim brightest,
#: necrosis dark, edema as white matter (no whole-tumour boundary). T2: edema and rim equally bright (no ET), necrosis
#: as bright as CSF.
_BRATS_STUDY_CONTRAST = {
    "flair": {"wm": 0.45, "gm": 0.55, "csf": 0.10, "edema": 1.10, "et": 1.10, "ncr": 0.75},
    "t1": {"wm": 0.80, "gm": 0.62, "csf": 0.25, "edema": 0.70, "et": 0.70, "ncr": 0.50},
    "t1ce": {"wm": 0.78, "gm": 0.60, "csf": 0.22, "edema": 0.78, "et": 1.45, "ncr": 0.30},
    "t2": {"wm": 0.40, "gm": 0.55, "csf": 1.00, "edema": 0.95, "et": 0.95, "ncr": 1.00},
}
#: Rician noise (relative to the contrast scale) and bias-field amplitude of the BraTS study profile
_BRATS_STUDY_NOISE = 0.15
_BRATS_STUDY_BIAS = 0.40


def _brats_study_images(regions: dict[str, np.ndarray], brain: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The study profile's appearance of one brain (its own generator, so that both profiles draw the same shapes):
    contrasts of ``_BRATS_STUDY_CONTRAST`` with a per-case jitter of +-8 % per tissue, texture, partial volume
    (a Gaussian blur, sigma 0.7-1.3 voxels per case), a bias field of exp(+-0.4) per modality, Rician noise and a gain
    of +-15 % per modality; zero outside the brain (skull-stripped)."""
    app = torch.Generator().manual_seed(seed + 7919)
    shape = brain.shape
    blur = _uniform(app, 0.7, 1.3)
    images = {}
    for modality in BRATS_MODALITIES:
        gain, img = _brats_tissues(regions, _BRATS_STUDY_CONTRAST[modality], app, shape)
        img = _blur(img + 0.04 * _smooth_field(app, shape, 12), blur)
        img = img * np.exp(_BRATS_STUDY_BIAS * _smooth_field(app, shape, 3))
        re_, im_ = (torch.randn(shape, generator=app).numpy() * _BRATS_STUDY_NOISE for _ in range(2))
        img = np.sqrt((img + re_) ** 2 + im_**2) * gain  # magnitude image: Rician
        img = np.clip(img * 1000.0, 1.0, 32767.0)  # brain voxels stay > 0
        img[~brain] = 0.0
        images[modality] = img.astype(np.int16)
    return images


def myops_case(
    shape: Sequence[int] = (256, 256, 5), seed: int = 0, profile: str = "demo"
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One synthetic short-axis cardiac stack (slices along the last axis) with edema and scar.

    Args:
        shape: ``(H, W, slices)``.
        seed: case seed.
        profile: ``demo`` (every structure visible in every modality: the README demo and the tests) or ``study``
            (the ablation study's data, docs/accuracy.md: appearance ambiguous per modality, partial volume, Rician
            noise, strong bias fields). The shapes are the same for both profiles.

    Returns:
        ``({modality: int16 volume}, uint16 label)`` with the MyoPS2020 raw label values (0/200/500/600/1220/2221).
    """
    check_profile(profile)
    study = profile == "study"
    contrast = _MYOPS_STUDY_CONTRAST if study else _MYOPS_CONTRAST
    gen = torch.Generator().manual_seed(int(seed))
    h, w, s = (int(v) for v in shape)
    x, y = _grid((h, w))
    label = np.zeros((h, w, s), dtype=np.uint16)
    images = {m: np.zeros((h, w, s), dtype=np.float32) for m in MYOPS_MODALITIES}
    cx, cy = _uniform(gen, -0.1, 0.1), _uniform(gen, -0.1, 0.1)
    lv_r = _uniform(gen, 0.12, 0.18)
    wall = _uniform(gen, 0.05, 0.08)
    scar_start, scar_len = _uniform(gen, 0, 2 * np.pi), _uniform(gen, 0.5, 1.4)
    edema_extra = _uniform(gen, 0.2, 0.6)
    gains = {m: _uniform(gen, 0.85, 1.15) for m in MYOPS_MODALITIES}
    if study:  # its own generator: both profiles draw the same shapes
        app = torch.Generator().manual_seed(int(seed) + 7919)
        bias = {m: np.exp(_MYOPS_STUDY_BIAS * _smooth_field(app, (h, w), 3)) for m in MYOPS_MODALITIES}
        blur = _uniform(app, 0.7, 1.3)
    for k in range(s):
        shrink = 1.0 - 0.35 * k / max(s - 1, 1)  # base to apex
        warp = 0.08 * _smooth_field(gen, (h, w), 4)
        r_lv = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / (lv_r * shrink) + warp
        angle = np.mod(np.arctan2(y - cy, x - cx) - scar_start, 2 * np.pi)
        body = (x / 0.9) ** 2 + (y / 0.75) ** 2 < 1.0
        lv = r_lv < 1.0
        myo = (r_lv >= 1.0) & (r_lv < 1.0 + wall / (lv_r * shrink))
        rv_d = np.sqrt(((x - cx + 1.9 * lv_r) / (1.3 * lv_r * shrink)) ** 2 + ((y - cy) / (2.0 * lv_r * shrink)) ** 2)
        rv = (rv_d < 1.0) & ~lv & ~myo & ~(r_lv < 1.0 + 2 * wall / (lv_r * shrink))
        edema = myo & (angle < scar_len + edema_extra)
        scar = myo & (angle < scar_len) & (r_lv < 1.0 + 0.7 * wall / (lv_r * shrink))
        lab = np.zeros((h, w), dtype=np.uint16)
        lab[myo] = 200
        lab[lv] = 500
        lab[rv] = 600
        lab[edema] = 1220
        lab[scar] = 2221
        label[..., k] = lab
        regions = {"body": body, "myo": myo, "lv": lv, "rv": rv, "edema": edema, "scar": scar}
        for m in MYOPS_MODALITIES:
            img = np.zeros((h, w), dtype=np.float32)
            for name in ("body", "myo", "lv", "rv", "edema", "scar"):
                img[regions[name]] = contrast[m][name]
            noise = torch.randn((h, w), generator=gen).numpy() * 0.04  # drawn in both profiles: same shapes
            texture = 0.05 * _smooth_field(gen, (h, w), 10)
            if study:
                img = _blur(img + texture, blur) * bias[m]
                sigma = _MYOPS_STUDY_NOISE[m]
                re_, im_ = (torch.randn((h, w), generator=app).numpy() * sigma for _ in range(2))
                images[m][..., k] = np.sqrt((img + re_) ** 2 + im_**2) * gains[m]  # magnitude image: Rician
            else:
                images[m][..., k] = (img + noise + texture) * gains[m]
    out = {m: np.clip(v * 1000.0, 0, 32767).astype(np.int16) for m, v in images.items()}
    return out, label
