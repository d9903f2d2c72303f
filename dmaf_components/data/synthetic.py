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
"""Deterministic synthetic datasets in the exact BraTS2020 and MyoPS2020 release layouts.

They are the embedded default dataset of the README demo and of the tests. The volumes are :mod:`.phantoms`' (the
``demo`` and ``study`` profiles) or :mod:`.anatomy`'s (``anatomy``); this module writes them as the releases lay them
out, atomically, and records what it wrote so that a rerun replaces only its own files.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterable, Sequence

import nibabel as nib
import numpy as np
import torch

from .atomic import atomic_replace
from .constants import BRATS_FILE_SUFFIX, BRATS_MODALITIES, MYOPS_FILE_SUFFIX, MYOPS_MODALITIES, DMAFDataError
from .phantoms import check_profile, brats_case, myops_case

__all__ = ["synthesize_brats", "synthesize_myops", "brats_case", "myops_case", "BRATS_AFFINE", "SYNTHETIC_RECORD"]

#: the hidden file in the output folder that records every file ``dmaf synthetic`` wrote there (paths relative to
#: the folder): only those are ever replaced or counted as its own
SYNTHETIC_RECORD = ".dmaf_synthetic.json"

#: the affine of the BraTS2020 release files (1 mm, LPS-like axes)
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])


def _save(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    """Write a NIfTI file atomically (:func:`~dmaf_components.data.atomic.atomic_replace`: a hidden temporary file,
    ignored by the dataset tools, then a rename), so that a killed synthesis never leaves a truncated file under the
    real name."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    atomic_replace(path, lambda tmp: nib.save(img, tmp), by_path=True)


def _check_out(out_dir: str, cases: int, shape: Sequence[int], dims: int) -> tuple[int, ...]:
    """Check the arguments; nothing is created (the plan is checked first)."""
    if isinstance(cases, bool) or not isinstance(cases, (int, np.integer)) or cases < 1:
        raise DMAFDataError(f"--cases: need a whole number of at least 1, got {cases!r}")
    shape = tuple(int(v) for v in shape)
    if len(shape) != dims or min(shape) < 1:
        raise DMAFDataError(f"--shape: expected {dims} positive sizes, got {shape}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DMAFDataError(f"{out_dir}: is a file, not a dataset folder")
    return shape


def _recorded(out_dir: str) -> set[str] | None:
    """The files ``dmaf synthetic`` recorded writing in ``out_dir`` (relative paths); None without a record."""
    path = os.path.join(out_dir, SYNTHETIC_RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        return {os.path.normpath(str(name)) for name in files}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DMAFDataError(
            f"{path}: cannot read the record of the synthetic files ({type(exc).__name__}: {exc}); "
            "delete the folder to regenerate the dataset"
        ) from None


def _record(out_dir: str, recorded: set[str] | None, names: Iterable[str]) -> None:
    """Add ``names`` to the record before they are written (a killed run leaves them recorded and rewritable)."""
    files = sorted((recorded or set()) | {os.path.normpath(n) for n in names})
    record = {"written_by": "dmaf synthetic", "files": files}
    atomic_replace(os.path.join(out_dir, SYNTHETIC_RECORD), lambda f: json.dump(record, f, indent=1))


def _visible(folder: str) -> list[str]:
    """Names in a folder, hidden ones (partial files) left out; empty when it does not exist."""
    return sorted(n for n in os.listdir(folder) if not n.startswith(".")) if os.path.isdir(folder) else []


def _refuse_unrecorded(out_dir: str, rel: str, recorded: set[str] | None) -> None:
    """Raise unless ``rel`` is absent or recorded as written by ``dmaf synthetic``."""
    if os.path.lexists(os.path.join(out_dir, rel)) and rel not in (recorded or set()):
        raise DMAFDataError(
            f"{os.path.join(out_dir, rel)}: would be overwritten, and there is no record ({SYNTHETIC_RECORD}) that "
            "dmaf synthetic wrote it; nothing written (choose another output folder, or delete this case to "
            "regenerate it)"
        )


def _refuse_foreign(folder: str, names: Iterable[str]) -> None:
    """Raise for the first of ``names`` (in ``folder``): files ``dmaf synthetic`` would not have written there."""
    for name in names:
        raise DMAFDataError(
            f"{os.path.join(folder, name)}: not written by dmaf synthetic; it writes no synthetic case into a folder "
            "that holds other files, nothing written (choose an empty output folder)"
        )


def _plan_brats_case(out_dir: str, rel_folder: str, case: str, overwrite: bool, recorded: set[str] | None) -> list:
    """The files to write for one case (relative to ``out_dir``; [] keeps the case), or a one-line error.

    A case with its ``_seg.nii.gz`` is kept unless ``overwrite``. Otherwise the case folder must hold nothing but
    files the record says ``dmaf synthetic`` wrote: any other file (the real release's case 355 names its label
    ``W39_1998.09.19_Segm.nii``) is refused, and so is replacing a file of the case's names without a record.
    """
    folder = os.path.join(out_dir, rel_folder)
    names = [f"{case}_{BRATS_FILE_SUFFIX[m]}.nii.gz" for m in BRATS_MODALITIES] + [f"{case}_seg.nii.gz"]
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise DMAFDataError(f"{folder}: is a file, not a case folder; nothing written")
    if os.path.exists(os.path.join(folder, names[-1])) and not overwrite:
        return []  # complete: reused
    unrecorded = [n for n in _visible(folder) if os.path.join(rel_folder, n) not in (recorded or set())]
    _refuse_foreign(folder, [n for n in unrecorded if n not in names or os.path.isdir(os.path.join(folder, n))])
    for name in unrecorded:
        _refuse_unrecorded(out_dir, os.path.join(rel_folder, name), recorded)
    return [os.path.join(rel_folder, n) for n in names]


def _write_brats_case(folder: str, case: str, shape: tuple[int, ...], seed: int, profile: str) -> None:
    os.makedirs(folder, exist_ok=True)
    images, label = brats_case(shape, seed, profile)
    for modality, arr in images.items():
        _save(arr, BRATS_AFFINE, os.path.join(folder, f"{case}_{BRATS_FILE_SUFFIX[modality]}.nii.gz"))
    _save(label, BRATS_AFFINE, os.path.join(folder, f"{case}_seg.nii.gz"))  # last: a case with a label is complete


@functools.lru_cache(maxsize=2)
def _template(template_dir: str | None, spacing: float):
    """The anatomy template on its grid, read once per process."""
    from .anatomy import load_template

    return load_template(template_dir, spacing)


def _write_anatomy_case(folder: str, case: str, spacing: float, seed: int, template_dir: str | None) -> None:
    """One phantom of :mod:`.anatomy` in the BraTS layout (float32 images, as many releases store them)."""
    from .anatomy import anatomy_case

    os.makedirs(folder, exist_ok=True)
    images, label = anatomy_case(_template(template_dir, spacing), seed)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    for modality, arr in images.items():
        _save(arr, affine, os.path.join(folder, f"{case}_{BRATS_FILE_SUFFIX[modality]}.nii.gz"))
    _save(label, affine, os.path.join(folder, f"{case}_seg.nii.gz"))  # last: a case with a label is complete


#: the names ``dmaf synthetic`` writes in a MyoPS folder (other names there are someone else's files)
_MYOPS_IMAGE = re.compile(r"myops_training_\d+_(C0|DE|T2)\.nii\.gz")
_MYOPS_LABEL = re.compile(r"myops_training_\d+_gd\.nii\.gz")


def _write_myops_case(img_dir: str, gd: str, case: str, shape: tuple[int, ...], seed: int, profile: str) -> None:
    affine = np.diag([1.25, 1.25, 12.0, 1.0])
    images, label = myops_case(shape, seed, profile)
    for modality, arr in images.items():
        _save(arr, affine, os.path.join(img_dir, f"{case}_{MYOPS_FILE_SUFFIX[modality]}.nii.gz"))
    _save(label, affine, gd)


def _one_thread_worker() -> None:
    torch.set_num_threads(1)


def _run_jobs(jobs: list[tuple], fn, workers: int) -> None:
    """``fn(*job)`` for every job, in ``workers`` processes (1: in this process)."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            fn(*job)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(workers, len(jobs)), initializer=_one_thread_worker) as pool:
        for future in [pool.submit(fn, *job) for job in jobs]:
            future.result()  # re-raises a worker's error


def synthesize_brats(
    out_dir: str,
    cases: int = 12,
    shape: Sequence[int] = (240, 240, 155),
    seed: int = 0,
    overwrite: bool = False,
    profile: str = "demo",
    workers: int = 1,
    spacing: float = 2.0,
    template_dir: str | None = None,
) -> list[str]:
    """Write ``out_dir/MICCAI_BraTS2020_TrainingData/BraTS20_Training_NNN/BraTS20_Training_NNN_{mod,seg}.nii.gz``.

    Complete cases (with their ``_seg.nii.gz``) are kept unless ``overwrite`` (``profile``: see :func:`brats_case`,
    or ``anatomy``: :mod:`.anatomy`'s phantoms on the MNI template at ``spacing`` mm, whose grid comes from the
    template, not ``shape``, read from ``template_dir`` or the installed nilearn; ``workers``: cases written in
    parallel processes, the same files as one). The files written are recorded in
    ``out_dir/.dmaf_synthetic.json`` first; a case folder that holds any other file, or a file of the case's names
    that the record does not list, is refused with a one-line error before anything is written (a real dataset's
    images are never replaced). Returns the case folders.
    """
    check_profile(profile, "brats")
    shape = _check_out(out_dir, cases, shape, 3)
    recorded = _recorded(out_dir)
    rel_root = "MICCAI_BraTS2020_TrainingData"
    if os.path.lexists(os.path.join(out_dir, rel_root)) and not os.path.isdir(os.path.join(out_dir, rel_root)):
        raise DMAFDataError(f"{os.path.join(out_dir, rel_root)}: is a file, not a dataset folder; nothing written")
    folders, jobs, written = [], [], []
    for i in range(1, cases + 1):
        case = f"BraTS20_Training_{i:03d}"
        folders.append(os.path.join(out_dir, rel_root, case))
        files = _plan_brats_case(out_dir, os.path.join(rel_root, case), case, overwrite, recorded)
        if files:
            written += files
            if profile == "anatomy":
                jobs.append((folders[-1], case, float(spacing), seed * 100003 + i, template_dir))
            else:
                jobs.append((folders[-1], case, shape, seed * 100003 + i, profile))
    if jobs:
        if profile == "anatomy":
            from .anatomy import find_template_dir

            find_template_dir(template_dir)  # a missing template is one line, before anything is written
            if not (isinstance(spacing, (int, float)) and math.isfinite(spacing) and spacing > 0):
                raise DMAFDataError(f"--spacing: expected a positive number of mm, got {spacing!r}")
        os.makedirs(out_dir, exist_ok=True)
        _record(out_dir, recorded, written)
    _run_jobs(jobs, _write_anatomy_case if profile == "anatomy" else _write_brats_case, workers)
    return folders


def synthesize_myops(
    out_dir: str,
    cases: int = 10,
    shape: Sequence[int] = (256, 256, 5),
    seed: int = 0,
    overwrite: bool = False,
    profile: str = "demo",
    workers: int = 1,
) -> list[str]:
    """Write ``out_dir/train25/myops_training_1XX_{C0,DE,T2}.nii.gz`` and ``train25_myops_gd/..._gd.nii.gz``
    (``profile``: see :func:`myops_case`; ``workers``: as :func:`synthesize_brats`).

    Cases with their label are kept unless ``overwrite``. As for :func:`synthesize_brats`, the files written are
    recorded first, and a case whose files exist without a record, or a folder that holds files of other names, is
    refused with a one-line error before anything is written.
    """
    check_profile(profile)
    shape = _check_out(out_dir, cases, shape, 3)
    recorded = _recorded(out_dir)
    img_dir, gd_dir = os.path.join(out_dir, "train25"), os.path.join(out_dir, "train25_myops_gd")
    for folder in (img_dir, gd_dir):
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise DMAFDataError(f"{folder}: is a file, not a dataset folder; nothing written")
    labels, jobs, files = [], [], []
    for i in range(cases):
        case = f"myops_training_{101 + i}"
        gd = os.path.join(gd_dir, f"{case}_gd.nii.gz")
        labels.append(gd)
        if overwrite or not os.path.exists(gd):
            names = [os.path.join("train25", f"{case}_{MYOPS_FILE_SUFFIX[m]}.nii.gz") for m in MYOPS_MODALITIES]
            names.append(os.path.join("train25_myops_gd", f"{case}_gd.nii.gz"))
            for rel in names:
                _refuse_unrecorded(out_dir, rel, recorded)
            files += names
            jobs.append((img_dir, gd, case, shape, seed * 100003 + i, profile))
    if jobs:
        for rel_dir, pattern in (("train25", _MYOPS_IMAGE), ("train25_myops_gd", _MYOPS_LABEL)):
            folder = os.path.join(out_dir, rel_dir)
            _refuse_foreign(
                folder,
                [
                    n
                    for n in _visible(folder)
                    if not pattern.fullmatch(n) and os.path.join(rel_dir, n) not in (recorded or set())
                ],
            )
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(gd_dir, exist_ok=True)
        _record(out_dir, recorded, files)
    _run_jobs(jobs, _write_myops_case, workers)
    return labels
