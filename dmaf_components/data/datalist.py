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
"""Decathlon-style datalists for BraTS2020, MSD Task01 and MyoPS2020, with persistent IDT modality masks."""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from .constants import (
    BRATS_LABELS,
    BRATS_MODALITIES,
    MYOPS_LABELS,
    MYOPS_MODALITIES,
    DMAFDataError,
)
from .atomic import atomic_replace
from .names import classify_files, modality_of
from .split_files import SPLIT_FILE_MODALITIES, read_case_list, read_split_file

__all__ = [
    "PAPER_MISSING_RATES",
    "find_brats_cases",
    "find_msd_cases",
    "find_myops_cases",
    "split_cases",
    "idt_masks",
    "conditional_rates",
    "missing_rates_of",
    "build_datalist",
    "write_datalist",
    "SPLIT_FILE_MODALITIES",
    "read_split_file",
    "read_case_list",
]

#: the paper's IDT missing rates (BraTS: Sec. 4 / Table 3; MyoPS: Table 3)
PAPER_MISSING_RATES = {
    "brats": {"t1": 0.2, "t1ce": 0.4, "flair": 0.6, "t2": 0.8},
    "myops": {"bssfp": 0.3, "lge": 0.5, "t2": 0.7},
}
_NII = (".nii.gz", ".nii")
logger = logging.getLogger(__name__)


def _find_file(folder: str, stem: str) -> str | None:
    for ext in _NII:
        path = os.path.join(folder, stem + ext)
        if os.path.isfile(path):
            return path
    return None


def find_brats_cases(data_dir: str, require_label: bool = True) -> list[dict]:
    """Cases of the raw BraTS2020 training folder (``BraTS20_Training_NNN/BraTS20_Training_NNN_{mod}.nii[.gz]``).

    The folder may be ``data_dir`` itself or ``data_dir/MICCAI_BraTS2020_TrainingData``. The real release names case
    355's segmentation ``W39_1998.09.19_Segm.nii``: any single ``*Segm.nii[.gz]`` in a case folder is accepted.
    Returns entries ``{"case", "image": {modality: path or absent}, "label"}`` with absolute paths.
    """
    root = data_dir
    nested = os.path.join(data_dir, "MICCAI_BraTS2020_TrainingData")
    if os.path.isdir(nested):
        root = nested
    folders = sorted(d for d in glob.glob(os.path.join(root, "BraTS20_*")) if os.path.isdir(d))
    cases = []
    for folder in folders:
        case = os.path.basename(folder)
        files = [
            os.path.join(folder, f)
            for f in os.listdir(folder)
            if not f.startswith(".") and os.path.isfile(os.path.join(folder, f))
        ]  # (hidden: partial files)
        image, notes, errors = classify_files(files, BRATS_MODALITIES, report_labels=False)  # aliases, any case
        if errors:
            raise DMAFDataError(errors[0])
        for note in notes:
            logger.warning(note)
        label = _find_file(folder, f"{case}_seg")
        if label is None:
            quirks = sorted(glob.glob(os.path.join(folder, "*Segm.nii*")))
            label = quirks[0] if len(quirks) == 1 else None
        if not image:
            raise DMAFDataError(f"{folder}: case {case} has no modality file ({case}_{{flair,t1,t1ce,t2}}.nii.gz)")
        if label is None and require_label:
            raise DMAFDataError(f"{folder}: case {case} has no segmentation file ({case}_seg.nii.gz)")
        entry = {"case": case, "image": image}
        if label is not None:
            entry["label"] = label
        cases.append(entry)
    return cases


def find_msd_cases(data_dir: str, require_label: bool = True) -> list[dict]:
    """Cases of the MSD Task01 layout: 4-D images in ``imagesTr`` (FLAIR, T1, T1ce, T2), labels in ``labelsTr``."""
    images = sorted(
        p for p in glob.glob(os.path.join(data_dir, "imagesTr", "*.nii*")) if not os.path.basename(p).startswith(".")
    )
    cases = []
    for path in images:
        name = os.path.basename(path)
        label = os.path.join(data_dir, "labelsTr", name)
        case = re.sub(r"\.nii(\.gz)?$", "", name)
        entry = {"case": case, "image": path}
        if os.path.isfile(label):
            entry["label"] = label
        elif require_label:
            raise DMAFDataError(f"{path}: case {case} has no label file labelsTr/{name}")
        cases.append(entry)
    return cases


def find_myops_cases(data_dir: str, require_label: bool = True) -> list[dict]:
    """Cases of MyoPS2020: ``myops_training_1XX_{C0,DE,T2}.nii.gz`` with ``myops_training_1XX_gd.nii.gz`` labels
    anywhere below ``data_dir`` (the release keeps them in ``train25`` and ``train25_myops_gd``)."""
    files = glob.glob(os.path.join(data_dir, "**", "myops_*.nii*"), recursive=True)
    by_case: dict[str, dict] = {}
    pattern = re.compile(r"^(myops_\w+?_\d+)_(\w+?)\s*\.nii(\.gz)?$", re.IGNORECASE)
    for path in sorted(files):
        match = pattern.match(os.path.basename(path).strip())
        if not match:
            continue
        case, suffix = match.group(1), match.group(2)
        modality = modality_of(suffix, MYOPS_MODALITIES)  # the alias table: C0/DE/T2, bssfp/lge, any case
        if modality is None and suffix.lower() != "gd":
            logger.warning(f"{path}: ignored (not a MyoPS modality C0/DE/T2 or label gd)")
            continue
        entry = by_case.setdefault(case, {"case": case, "image": {}})
        if modality is None:
            entry["label"] = path
        elif modality in entry["image"]:
            raise DMAFDataError(f"{path}: a second file for {modality} (also {entry['image'][modality]})")
        else:
            entry["image"][modality] = path
    cases = []
    for case in sorted(by_case):
        entry = by_case[case]
        if not entry["image"]:
            raise DMAFDataError(f"{entry.get('label', case)}: case {case} has no modality file (C0/DE/T2)")
        if "label" not in entry and require_label:
            raise DMAFDataError(f"{data_dir}: case {case} has no label file {case}_gd.nii.gz")
        cases.append(entry)
    return cases


def _detect_layout(data_dir: str) -> str:
    if not os.path.isdir(data_dir):
        raise DMAFDataError(f"{data_dir}: no such directory")
    if glob.glob(os.path.join(data_dir, "BraTS20_*")) or glob.glob(
        os.path.join(data_dir, "MICCAI_BraTS2020_TrainingData", "BraTS20_*")
    ):
        return "brats"
    if os.path.isdir(os.path.join(data_dir, "imagesTr")):
        return "msd"
    if glob.glob(os.path.join(data_dir, "**", "myops_*.nii*"), recursive=True):
        return "myops"
    raise DMAFDataError(
        f"{data_dir}: unknown dataset layout; expected BraTS20_Training_NNN folders, an MSD imagesTr/labelsTr "
        "folder, or MyoPS2020 myops_training_NNN_{C0,DE,T2,gd}.nii.gz files"
    )


def split_cases(n: int, split: Sequence[float], seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Seeded split of n cases into (training, validation, testing) indices.

    ``split`` holds three counts (used as they are when they add up to n, scaled to n otherwise) or three fractions.
    """
    if len(split) != 3 or min(split) < 0 or sum(split) <= 0:
        raise DMAFDataError(f"split: expected three non-negative sizes (train, val, test), got {list(split)}")
    sizes = np.asarray(split, dtype=np.float64)
    if not np.isclose(sizes.sum(), n):
        sizes = sizes / sizes.sum() * n
    counts = np.floor(sizes).astype(int)
    for i in np.argsort(-(sizes - counts))[: n - counts.sum()]:  # largest remainders
        counts[i] += 1
    order = np.random.default_rng(seed).permutation(n).tolist()
    a, b = counts[0], counts[0] + counts[1]
    return sorted(order[:a]), sorted(order[a:b]), sorted(order[b:])


def conditional_rates(rates: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Draw rates q such that P(m missing | not all missing) = rates[m].

    With P = prod(q), that probability is (q_m - P) / (1 - P); the fixed point q_m = r_m (1 - P) + P is found by
    iteration (it converges for rates in [0, 1)).
    """
    q = np.asarray(rates, dtype=np.float64).copy()
    for _ in range(iterations):
        p_all = float(np.prod(q))
        q = rates * (1.0 - p_all) + p_all
    return q


def idt_masks(n: int, missing_rates: Sequence[float], seed: int = 0, exact: bool = False) -> np.ndarray:
    """Persistent modality-presence vectors for imperfect data training (IDT).

    Args:
        n: number of training cases.
        missing_rates: per-modality missing rate in the canonical order.
        seed: random seed (same seed -> same masks, on every rank and every run).
        exact: instead of independent draws, give each of the 2^M - 1 patterns round(n * P(pattern)) cases, P the
            product of per-modality probabilities renormalised without the all-missing pattern (the PASSION way),
            rounding by largest remainders so the counts add up to n.

    Returns:
        ``(n, M)`` uint8, at least one modality present per row. Excluding the all-missing pattern would pull every
        realised rate below the asked one (t1: 0.17 instead of 0.2 at the paper's rates), so the draws use rates q
        whose missing rates *given at least one modality present* equal the asked ones (:func:`conditional_rates`).
    """
    rates = np.asarray(missing_rates, dtype=np.float64)
    if rates.ndim != 1 or not np.isfinite(rates).all() or ((rates < 0) | (rates >= 1)).any():
        raise DMAFDataError(f"missing rates must each lie in [0, 1), got {list(missing_rates)}")
    m = rates.size
    rates = conditional_rates(rates)
    rng = np.random.default_rng(seed)
    if not exact:
        masks = (rng.random((n, m)) >= rates).astype(np.uint8)
        empty = masks.sum(1) == 0
        while empty.any():
            masks[empty] = (rng.random((int(empty.sum()), m)) >= rates).astype(np.uint8)
            empty = masks.sum(1) == 0
        return masks
    patterns = np.array([p for p in itertools.product((0, 1), repeat=m) if any(p)], dtype=np.uint8)
    prob = np.prod(np.where(patterns == 1, 1.0 - rates, rates), axis=1)
    prob = prob / prob.sum()
    ideal = prob * n
    counts = np.floor(ideal).astype(int)
    for i in np.argsort(-(ideal - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    masks = np.repeat(patterns, counts, axis=0)
    return masks[rng.permutation(n)]


def missing_rates_of(masks: np.ndarray, modalities: Sequence[str]) -> dict[str, float]:
    """Realised missing rate of each modality."""
    masks = np.asarray(masks)
    return {mod: float(1.0 - masks[:, i].mean()) if len(masks) else 0.0 for i, mod in enumerate(modalities)}


def _rates_vector(missing_rates: Mapping[str, float] | Sequence[float], modalities: Sequence[str]) -> list[float]:
    if isinstance(missing_rates, Mapping):
        unknown = set(missing_rates) - set(modalities)
        if unknown:
            raise DMAFDataError(f"missing_rates: unknown modality {sorted(unknown)}; expected {list(modalities)}")
        return [float(missing_rates.get(mod, 0.0)) for mod in modalities]
    rates = [float(r) for r in missing_rates]
    if len(rates) != len(modalities):
        raise DMAFDataError(f"missing_rates: expected {len(modalities)} values ({', '.join(modalities)}), got {rates}")
    return rates


def _relative(entry: dict, base: str) -> dict:
    out = dict(entry)
    if isinstance(entry["image"], dict):
        out["image"] = {k: os.path.relpath(v, base) for k, v in entry["image"].items()}
    else:
        out["image"] = os.path.relpath(entry["image"], base)
    if "label" in entry:
        out["label"] = os.path.relpath(entry["label"], base)
    return out


#: the columns of a PASSION split file
def _masks_from_file(
    cases: list[dict], masks_from: str, test_list: str | None, family: str, data_dir: str, split, seed: int
) -> tuple[list[int], list[list[int]], list[int], list[int]]:
    """(training indices, their masks, validation indices, testing indices) of ``cases`` from a split file."""
    index = {c["case"]: i for i, c in enumerate(cases)}
    folded = {c["case"].lower(): i for i, c in enumerate(cases)}

    def find(case: str, where: str) -> int:
        i = index.get(case, folded.get(case.lower()))
        if i is None:
            raise DMAFDataError(f"{where}: case {case} is not in {data_dir} ({len(cases)} cases found there)")
        return i

    by_index: dict[int, list[int]] = {}
    for case, (mask, line) in read_split_file(masks_from, family).items():
        i = find(case, f"{masks_from}: line {line}")
        if i in by_index:  # names that differ only in letter case
            raise DMAFDataError(f"{masks_from}: line {line}: case {case} is listed twice (as {cases[i]['case']})")
        by_index[i] = mask
    train = sorted(by_index)
    rest = [i for i in range(len(cases)) if i not in by_index]
    if test_list is not None:
        test = []
        for case, line in read_case_list(test_list, family).items():
            i = find(case, f"{test_list}: line {line}")
            if i in by_index:
                raise DMAFDataError(f"{test_list}: line {line}: case {case} is also a training case of {masks_from}")
            if i in test:
                raise DMAFDataError(f"{test_list}: line {line}: case {case} is listed twice (as {cases[i]['case']})")
            test.append(i)
        test = sorted(test)
        val = [i for i in rest if i not in set(test)]
    else:
        if len(split) != 3 or min(split) < 0 or split[1] + split[2] <= 0:
            raise DMAFDataError(
                f"split: with masks_from, the validation and testing sizes share out the cases that "
                f"are not in {masks_from}; expected (train, val, test) with val + test > 0, got "
                f"{list(split)}"
            )
        _, v, t = split_cases(len(rest), (0, split[1], split[2]), seed)
        val, test = [rest[i] for i in v], [rest[i] for i in t]
    return train, [by_index[i] for i in train], val, test


def build_datalist(
    data_dir: str,
    dataset: str = "auto",
    split: Sequence[float] | None = None,
    mode: str = "idt",
    missing_rates: Mapping[str, float] | Sequence[float] | None = None,
    exact: bool = False,
    seed: int = 0,
    masks_from: str | None = None,
    test_list: str | None = None,
) -> dict:
    """A MONAI decathlon-style datalist with paths relative to ``data_dir``.

    Args:
        data_dir: dataset folder.
        dataset: ``brats``, ``msd``, ``myops`` or ``auto`` (detect the layout).
        split: (train, val, test) counts or fractions; default 219/50/100 for BraTS/MSD (the paper), 0.6/0.2/0.2
            for MyoPS.
        mode: ``idt`` (persistent per-case ``modality_mask`` at ``missing_rates``) or ``pdt`` (none stored: one of
            the 2^M - 1 combinations is drawn per iteration by the transforms).
        missing_rates: by modality name (or a list in canonical order); default the paper's.
        exact: exact-count IDT masks (see :func:`idt_masks`).
        seed: seed of the split and of the masks.
        masks_from: a PASSION split file (:func:`read_split_file`): its cases are the training split, with its
            masks; the other cases are split into validation and testing by ``split``'s last two sizes (scaled to
            them), or by ``test_list``.
        test_list: with ``masks_from``, a file of test case names, one per line (:func:`read_case_list`); the other
            cases that are not training cases go to validation.
    """
    if not os.path.isdir(data_dir):
        raise DMAFDataError(f"{data_dir}: no such directory")
    layout = _detect_layout(data_dir) if dataset == "auto" else dataset.lower()
    finders = {"brats": find_brats_cases, "msd": find_msd_cases, "myops": find_myops_cases}
    if layout not in finders:
        raise DMAFDataError(f"dataset: unknown layout {dataset!r}; expected brats, msd, myops or auto")
    if mode not in ("idt", "pdt"):
        raise DMAFDataError(f"mode: expected idt or pdt, got {mode!r}")
    if masks_from is None and test_list is not None:
        raise DMAFDataError("test_list: only with masks_from (a split file's training cases)")
    if masks_from is not None and mode != "idt":
        raise DMAFDataError(f"masks_from: {masks_from} gives persistent (IDT) masks; not with mode {mode!r}")
    if masks_from is not None and (missing_rates is not None or exact):
        raise DMAFDataError(f"masks_from: the masks come from {masks_from}; drop missing_rates and exact")
    cases = finders[layout](data_dir)
    if not cases:
        raise DMAFDataError(f"{data_dir}: no {layout} case found")
    modalities = MYOPS_MODALITIES if layout == "myops" else BRATS_MODALITIES
    family = "myops" if layout == "myops" else "brats"
    if split is None:
        split = (0.6, 0.2, 0.2) if family == "myops" else (219, 50, 100)
    if masks_from is not None:
        train, file_masks, val, test = _masks_from_file(cases, masks_from, test_list, family, data_dir, split, seed)
    else:
        train, val, test = split_cases(len(cases), split, seed)
    base = os.path.abspath(data_dir)
    rel = [_relative(c, base) for c in cases]
    training = [rel[i] for i in train]
    datalist: dict = {
        "name": f"DMAF-Net {layout} datalist",
        "dataset": family,
        "layout": layout,
        "modalities": list(modalities),
        "labels": {str(k): v for k, v in (MYOPS_LABELS if family == "myops" else BRATS_LABELS).items()},
        "mode": mode,
        "seed": seed,
    }
    if masks_from is not None:
        masks = np.asarray(file_masks, dtype=np.uint8).reshape(len(training), len(modalities))
        for entry, mask in zip(training, masks):
            entry["modality_mask"] = [int(v) for v in mask]
        datalist["masks_from"] = os.path.basename(masks_from)
        if test_list is not None:
            datalist["test_list"] = os.path.basename(test_list)
        datalist["missing_rates"] = datalist["realised_missing_rates"] = missing_rates_of(masks, modalities)
    elif mode == "idt":
        rates = _rates_vector(PAPER_MISSING_RATES[family] if missing_rates is None else missing_rates, modalities)
        masks = idt_masks(len(training), rates, seed=seed, exact=exact)
        for entry, mask in zip(training, masks):
            entry["modality_mask"] = [int(v) for v in mask]
        datalist["missing_rates"] = dict(zip(modalities, rates))
        datalist["realised_missing_rates"] = missing_rates_of(masks, modalities)
        datalist["exact_counts"] = bool(exact)
    datalist.update({"training": training, "validation": [rel[i] for i in val], "testing": [rel[i] for i in test]})
    return datalist


def write_datalist(datalist: dict, path: str, overwrite: bool = False) -> str:
    """Write the datalist JSON atomically; an existing file is never replaced unless ``overwrite``.

    The JSON goes to a hidden temporary file in the same folder, is flushed to disk, and replaces ``path`` with
    ``os.replace`` (:func:`~dmaf_components.data.atomic.atomic_replace`; a new datalist gets the mode of any new
    file, a replaced one keeps its mode): when anything fails (a full disk, a read-only folder), the temporary file
    is removed, an earlier datalist stays byte for byte as it was, and the error is one line naming the file and the
    cause.
    """
    if os.path.exists(path) and not overwrite:
        raise DMAFDataError(f"{path}: exists already; pass --overwrite to replace it")
    try:
        atomic_replace(path, lambda f: json.dump(datalist, f, indent=2))
    except OSError as exc:
        raise DMAFDataError(
            f"{path}: cannot write the datalist ({type(exc).__name__}: {exc.strerror or exc}); "
            "an earlier datalist there is unchanged"
        ) from None
    return path
