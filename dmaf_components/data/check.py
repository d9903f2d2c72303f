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
"""``dmaf check``: read every case of a datalist once and report every problem at once, one line each.

Each file is read once: its NIfTI header first with nibabel (cheap: dimensions, shape, affine), then its voxels with
:class:`~dmaf_components.data.readers.ImageReader`, checked by :func:`~dmaf_components.data.image_checks.check_image`
(the training pipeline's reader and checks, and their one-line errors: missing, unreadable, truncated or non-NIfTI
files, NaN or inf voxels, values beyond float32, constant images, label maps given as a modality). On top of that:
2-D files, the modalities and the label of one case on one grid (shape and affine), label values outside the
dataset's set (:func:`~dmaf_components.data.image_checks.check_label_values`), and two warnings: all-zero modalities
(the loader treats them as missing) and BraTS modalities with a non-zero background.

The datalist itself is checked before any file is read (:mod:`dmaf_components.data.io`): entries and fields of the
wrong type, a ``modality_mask`` of the wrong length or without any modality, a case listed twice (leakage between
training and evaluation), relative paths that leave the data folder (errors), and a modality that no training case
has (a warning: the model is never trained on it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch

from .constants import BRATS_LABELS, BRATS_MODALITIES, MYOPS_MODALITIES, DMAFDataError
from .image_checks import check_image, check_label_values
from .io import (
    SECTIONS,
    datalist_modalities,
    duplicate_cases,
    entry_name,
    entry_problems,
    read_datalist,
    resolve_entry,
)
from .readers import ImageReader
from ..errors import DMAFError

__all__ = [
    "MYOPS_RAW_LABEL_VALUES",
    "MIN_BACKGROUND",
    "CheckProblem",
    "CheckReport",
    "DataCheckError",
    "check_case",
    "check_entries",
    "check_datalist",
    "untrained_modalities",
]

#: label values in the MyoPS2020 files (myocardium, LV, RV, edema, scar), as ``label_values`` of train_myops.json
MYOPS_RAW_LABEL_VALUES = (0, 200, 500, 600, 1220, 2221)
#: fewest voxels exactly 0 in a skull-stripped BraTS modality (the inference config's ``min_background``)
MIN_BACKGROUND = 0.05
_SECTIONS = SECTIONS


class DataCheckError(DMAFDataError):
    """The data check found errors (already reported line by line); the ``dmaf`` command exits with status 1."""

    exit_code = 1


@dataclass(frozen=True)
class CheckProblem:
    """One problem of one file: ``severity`` is ``error`` or ``warning``; ``scope`` is ``case`` (a problem of a
    case's files or entry) or ``datalist`` (of the datalist as a whole, e.g. a modality no training case has)."""

    case: str
    file: str
    message: str
    severity: str = "error"
    scope: str = "case"

    def __str__(self) -> str:
        return f"{self.severity}: {self.case}: {self.file}: {self.message}"


@dataclass
class CheckReport:
    """Problems of a checked set of cases, in case order."""

    problems: list[CheckProblem] = field(default_factory=list)
    cases: int = 0
    files: int = 0

    @property
    def errors(self) -> list[CheckProblem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[CheckProblem]:
        return [p for p in self.problems if p.severity == "warning"]

    def summary(self) -> str:
        """One line: counts of errors and warnings and of the cases they concern."""
        if not self.problems:
            return f"checked {self.cases} cases ({self.files} files): no problem found"
        bad = len({p.case for p in self.problems if p.scope == "case"})
        whole = sum(p.scope != "case" for p in self.problems)
        return (
            f"checked {self.cases} cases ({self.files} files): {len(self.errors)} error(s), "
            f"{len(self.warnings)} warning(s)"
            + (f" in {bad} case(s)" if bad else "")
            + (f" ({whole} about the datalist as a whole)" if whole else "")
        )


def _header(reader: ImageReader, path: str):
    """The nibabel image (header only, voxels not read); a one-line error for a missing or non-NIfTI file."""
    try:
        return nib.load(path)
    except Exception as exc:  # nibabel names the problem better than "no suitable reader"
        if not os.path.isfile(path):
            reader(path)  # "file not found", as the training loader says it
        text = (str(exc).strip().splitlines() or [""])[0].replace(path, os.path.basename(path))
        raise DMAFDataError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {text})") from None


class _Case:
    """Problems of one case, with file paths shown relative to ``base_dir``."""

    def __init__(self, entry: Mapping, base_dir: str | None):
        self.base_dir = base_dir
        first = entry.get("label") or entry.get("image")
        if isinstance(first, Mapping):
            first = next(iter(first.values()), "")
        elif isinstance(first, (list, tuple)):
            first = next((p for p in first if p), "")
        self.name = str(entry.get("case") or os.path.basename(os.path.dirname(str(first))) or first)
        self.problems: list[CheckProblem] = []

    def resolve(self, path) -> str:
        path = os.fspath(path)
        return os.path.join(self.base_dir, path) if self.base_dir and not os.path.isabs(path) else path

    def show(self, path: str) -> str:
        if self.base_dir and os.path.isabs(path):
            rel = os.path.relpath(path, self.base_dir)
            if not rel.startswith(".."):
                return rel
        return path

    def add(self, path: str, message: str, severity: str = "error") -> None:
        prefix = f"{path}: "
        if message.startswith(prefix):  # the reader's messages start with the path: show it once, relative
            message = message[len(prefix) :]
        self.problems.append(CheckProblem(self.name, self.show(path), message, severity))


def check_case(
    entry: Mapping,
    dataset: str = "brats",
    labels: Sequence[float] | None = None,
    base_dir: str | None = None,
    affine_atol: float = 1e-3,
) -> list[CheckProblem]:
    """Check one datalist entry; every problem found is returned, none is raised.

    Args:
        entry: ``{"case", "image": {modality: path} | [paths] | 4-D path, "label"}`` with absolute paths (or
            relative to ``base_dir``).
        dataset: ``brats`` (also MSD Task01) or ``myops``: the modalities, the dimensions (BraTS: 3-D volumes, every
            axis longer than 1; MyoPS: stacks of 2-D slices stored as 3-D ``(H, W, slices)``) and the label set.
        labels: allowed label values (default: BraTS 0/1/2/4; MyoPS the raw 0/200/500/600/1220/2221).
        base_dir: folder that relative paths are relative to, and that the reported paths are shown relative to.
        affine_atol: tolerance when comparing the affines of the case's files (the loader's default).
    """
    myops = dataset == "myops"
    modalities = MYOPS_MODALITIES if myops else BRATS_MODALITIES
    allowed = tuple(labels) if labels is not None else (MYOPS_RAW_LABEL_VALUES if myops else tuple(BRATS_LABELS))
    reader = ImageReader(dtype=None)  # keeps the stored dtype
    case = _Case(entry, base_dir)

    files = _case_files(entry, modalities, case)
    grids: list[tuple[str, tuple, np.ndarray]] = []  # (path, spatial shape, affine) of the files that were read
    for role, path in files:
        try:
            geometry = _check_file(reader, case, role, path, modalities, allowed, myops)
        except DMAFError as exc:
            case.add(path, str(exc))
            continue
        if geometry is not None:
            grids.append((path, *geometry))

    def same(a, b) -> bool:
        return a[1] == b[1] and np.allclose(a[2], b[2], atol=affine_atol)

    if grids:  # the grid most files share is the reference (ties: the first file's); the others are reported
        ref = max(grids, key=lambda g: sum(same(g, other) for other in grids))
        for path, shape, affine in grids:
            if shape != ref[1]:
                case.add(path, f"shape {shape} differs from {os.path.basename(ref[0])} {ref[1]}")
            elif not np.allclose(affine, ref[2], atol=affine_atol):
                diff = float(np.abs(affine - ref[2]).max())
                case.add(path, f"affine differs from {os.path.basename(ref[0])} (largest difference {diff:.4g})")
    return case.problems


def _case_files(entry: Mapping, modalities: Sequence[str], case: _Case | None = None) -> list[tuple[str, str]]:
    """``(role, path)`` of the files of an entry: role a modality name, ``image`` (one 4-D file) or ``label``.
    Problems of the entry itself (unknown modality, wrong path count, no modality file) go to ``case``."""
    report = case.add if case is not None else (lambda *args: None)
    resolve = case.resolve if case is not None else os.fspath
    image = entry.get("image")
    files: list[tuple[str, str]] = []
    if isinstance(image, (str, os.PathLike)):
        files.append(("image", resolve(image)))
    elif isinstance(image, (Mapping, list, tuple)):
        if not isinstance(image, Mapping) and len(image) != len(modalities):
            report(str(image), f"image lists {len(image)} paths, expected {len(modalities)} ({', '.join(modalities)})")
        for modality, path in image.items() if isinstance(image, Mapping) else zip(modalities, image):
            if not path:
                continue
            if modality not in modalities:
                report(resolve(path), f"unknown modality {modality!r}; expected one of {list(modalities)}")
            else:
                files.append((modality, resolve(path)))
    if not files:
        report("image", "no modality file")
    if entry.get("label"):
        files.append(("label", resolve(entry["label"])))
    return files


def _check_file(reader: ImageReader, case: _Case, role: str, path: str, modalities, allowed, myops: bool):
    """Header checks, then the voxels; returns ``(spatial shape, affine)``, or None after a dimension problem."""
    header = _header(reader, path)
    shape = tuple(int(s) for s in header.shape)
    if role == "image":  # one 4-D file, modalities last (MSD Task01)
        if len(shape) != 4 or shape[3] != len(modalities):
            expected = f"(x, y, z, {len(modalities)}) of {', '.join(modalities)}"
            case.add(path, f"shape {shape}: expected a 4-D file {expected}")
            return None
        spatial = shape[:3]
    else:
        spatial = shape
        if len(shape) < 3 or (not myops and min(shape) < 2):
            what = "a 3-D stack of 2-D slices (H, W, slices)" if myops else "a 3-D volume"
            case.add(path, f"is 2-D (shape {shape}); expected {what}")
            return None
        if len(shape) > 3:
            case.add(path, f"has {len(shape)} dimensions (shape {shape}); expected 3")
            return None
    img = check_image(path, reader(path), image=role != "label")  # corrupt data, NaN voxels: the pipeline's errors
    if role == "label":
        try:
            check_label_values(path, img, allowed)
        except DMAFError as exc:  # reported; the label's grid is still compared
            case.add(path, str(exc))
    else:
        names = modalities if role == "image" else (role,)
        for channel, name in zip(img, names):
            which = "" if role != "image" else f"channel {modalities.index(name)} ({name}): "
            if not channel.any():
                what = "is all zero" if role != "image" else f"channel {modalities.index(name)} ({name}) is all zero"
                case.add(path, f"{what}: the modality is treated as missing", "warning")
            elif not myops and (zero := 1.0 - int(torch.count_nonzero(channel)) / channel.numel()) < MIN_BACKGROUND:
                case.add(
                    path,
                    f"{which}only {zero:.1%} of the voxels are 0: the BraTS pipeline expects skull-stripped "
                    f"images with a zero background (inference refuses fewer than {MIN_BACKGROUND:.0%})",
                    "warning",
                )
    return spatial, np.asarray(header.affine, dtype=np.float64)


def check_entries(
    entries: Sequence[Mapping],
    dataset: str = "brats",
    labels: Sequence[float] | None = None,
    base_dir: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> CheckReport:
    """Check datalist entries in parallel (threads: reading is decompression and numpy/torch work, which release
    the GIL); each case is read once. A progress bar goes to stderr when it is a terminal.

    Args:
        entries: datalist entries (see :func:`check_case`); an entry listed in several sections is checked once.
        dataset: ``brats`` or ``myops``.
        labels: allowed label values (default: the dataset's).
        base_dir: folder that relative paths are relative to.
        workers: parallel readers (default ``min(4, cpu count)``).
        progress: show a progress bar (tqdm) when stderr is a terminal.
    """
    from tqdm import tqdm

    unique: dict[str, Mapping] = {}
    for entry in entries:
        unique.setdefault(repr((entry.get("case"), entry.get("image"), entry.get("label"))), entry)
    todo = list(unique.values())
    workers = max(1, int(workers or min(4, os.cpu_count() or 1)))
    report = CheckReport(cases=len(todo))
    modalities = MYOPS_MODALITIES if dataset == "myops" else BRATS_MODALITIES
    report.files = sum(len(_case_files(entry, modalities)) for entry in todo)
    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=len(todo), desc="dmaf check", unit="case", disable=None if progress else True) as bar,
    ):
        futures = [pool.submit(check_case, entry, dataset, labels, base_dir) for entry in todo]
        for future in futures:
            future.add_done_callback(lambda _: bar.update())
        for future in futures:
            report.problems.extend(future.result())
    report.problems.sort(key=lambda p: p.case)  # stable: a case's problems keep their file order
    return report


def untrained_modalities(datalist: Mapping, modalities: Sequence[str] | None = None) -> list[str]:
    """One warning per modality that no training case has (realised missing rate 1.000): the model is never trained
    on it. A training case has a modality when its ``modality_mask`` (if any) marks it present and, for an image
    given per modality, a path is listed for it. Malformed entries are skipped (:func:`entry_problems` reports them).
    """
    modalities = tuple(modalities or datalist_modalities(datalist) or BRATS_MODALITIES)
    training = [e for e in datalist.get("training") or [] if isinstance(e, Mapping) and not entry_problems(e)]
    if not training or not isinstance(datalist.get("training"), list):
        return []
    present = np.zeros(len(modalities), dtype=bool)
    for entry in training:
        mask = entry.get("modality_mask")
        has = np.ones(len(modalities), dtype=bool)
        if isinstance(mask, (list, tuple)) and len(mask) == len(modalities):
            has &= np.asarray(mask, dtype=bool)
        image = entry.get("image")
        if isinstance(image, Mapping):
            has &= np.array([bool(image.get(m)) for m in modalities])
        elif isinstance(image, (list, tuple)) and len(image) == len(modalities):
            has &= np.array([bool(p) for p in image])
        present |= has
    return [
        f"{m} is missing from every training case (realised missing rate 1.000): the model is never trained on {m}"
        for m, seen in zip(modalities, present)
        if not seen
    ]


def check_datalist(
    datalist: str | Mapping,
    data_dir: str | None = None,
    labels: Sequence[float] | None = None,
    workers: int | None = None,
    progress: bool = True,
    name: str | None = None,
) -> CheckReport:
    """Check the datalist, then every case of every section (training, validation, testing) of it.

    The datalist's own problems come first (see the module's docstring); the entries they concern are not read.

    Args:
        datalist: a datalist JSON file (as written by ``dmaf datalist``) or the datalist itself.
        data_dir: folder that relative paths are relative to (default: the datalist file's folder); relative paths
            may not leave it.
        labels: allowed label values (default: those of the datalist's ``dataset``, brats or myops).
        workers: parallel readers (default ``min(4, cpu count)``).
        progress: show a progress bar when stderr is a terminal.
        name: how the datalist's own problems name it (default: its file, or ``datalist`` for a mapping).
    """
    if isinstance(datalist, Mapping):
        content, name = datalist, name or "datalist"
        base = os.path.abspath(data_dir) if data_dir else None
    else:
        content, name = read_datalist(datalist), name or str(datalist)
        base = os.path.abspath(data_dir or os.path.dirname(os.path.abspath(datalist)))
    dataset = str(content.get("dataset") or content.get("layout") or "brats").lower()
    if list(content.get("modalities", [])) == list(MYOPS_MODALITIES):
        dataset = "myops"
    dataset = "myops" if dataset == "myops" else "brats"
    modalities = MYOPS_MODALITIES if dataset == "myops" else BRATS_MODALITIES
    problems: list[CheckProblem] = []
    entries, listed = [], 0
    for section in _SECTIONS:
        items = content.get(section)
        if section in content and not isinstance(items, list):
            problems.append(
                CheckProblem(
                    section, name, f"{section} is {type(items).__name__}; expected a list of cases", scope="datalist"
                )
            )
            continue
        for i, entry in enumerate(items or []):
            listed += 1
            where, case = f"{section}[{i}]", entry_name(entry)
            bad = entry_problems(entry, modalities)
            if not bad:
                try:
                    entries.append(resolve_entry(entry, base))
                    continue
                except DMAFError as exc:
                    bad = [str(exc)]
            problems += [CheckProblem(case or where, name, f"{where}: {message}") for message in bad]
    if not listed:
        raise DMAFDataError(f"{name}: no case in {list(_SECTIONS)}")
    problems += [CheckProblem(case, name, message) for case, message in duplicate_cases(content)]
    problems += [
        CheckProblem("training", name, message, "warning", "datalist")
        for message in untrained_modalities(content, modalities)
    ]
    if entries:
        report = check_entries(entries, dataset, labels, base, workers, progress)
    else:
        report = CheckReport()
    report.problems = problems + report.problems
    return report
