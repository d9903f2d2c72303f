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
"""The split files of the public missing-modality code bases, read as a datalist's masks and test cases.

:func:`read_split_file` reads PASSION's BraTS split file and the Extension's MyoPS long-tail split (one row per
training case: its name, a mask id, the mask as 0/1 flags, the ids of the masks it may take); :func:`read_case_list`
reads a list of test cases. ``dmaf datalist --masks_from FILE [--test_list FILE]`` builds a datalist from them
(:func:`~dmaf_components.data.datalist.build_datalist`).
"""

from __future__ import annotations

import csv
import re

from .constants import BRATS_MODALITIES, MYOPS_MODALITIES, DMAFDataError

__all__ = ["SPLIT_FILE_MODALITIES", "read_split_file", "read_case_list"]

_SPLIT_COLUMNS = ("data_name", "mask_id", "mask", "pos_mask_ids")
#: the modality order of a split file's ``mask`` column (BraTS: PASSION's; MyoPS: the order its extension stacks
#: the release's C0, DE and T2 files in)
SPLIT_FILE_MODALITIES = {"brats": ("flair", "t1ce", "t1", "t2"), "myops": ("bssfp", "lge", "t2")}
#: ``mask_id`` -> present modalities in the split file's order (1 = present): the numbering of the masks in both
#: repositories. Their IDT training reads ``mask_id``, not ``mask``, so the two must agree.
_SPLIT_MASK_IDS = {
    "brats": (
        "0001",
        "0100",
        "0010",
        "1000",
        "0101",
        "0110",
        "1010",
        "0011",
        "1001",
        "1100",
        "1110",
        "1011",
        "1101",
        "0111",
        "1111",
    ),
    "myops": ("001", "010", "100", "011", "110", "101", "111"),
}
_GRADE_PREFIX = re.compile(r"^(?:HG|LG)_")
_SLICE_SUFFIX = re.compile(r"_slice_\d+$")


def _split_case(name: str, family: str) -> str:
    """The case a split-file or case-list name denotes: BraTS without the ``HG_``/``LG_`` grade prefix, MyoPS without
    the ``_slice_K`` suffix."""
    return _GRADE_PREFIX.sub("", name) if family == "brats" else _SLICE_SUFFIX.sub("", name)


def _flags(text: str, count: int) -> list[int] | None:
    """``[True, False, ...]`` or ``[1, 0, ...]`` with ``count`` flags -> 0/1 ints; None for anything else."""
    match = re.fullmatch(r"\s*\[(.*)\]\s*", text)
    if not match:
        return None
    values = {"true": 1, "1": 1, "false": 0, "0": 0}
    flags = [values.get(t.strip().lower()) for t in match.group(1).split(",")]
    return flags if len(flags) == count and None not in flags else None


def _read_rows(path: str, what: str) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of the non-empty rows of a CSV file; a one-line error when it cannot be read."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            return [(reader.line_num, row) for row in reader if any(field.strip() for field in row)]
    except FileNotFoundError:
        raise DMAFDataError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DMAFDataError(f"{path}: cannot read the {what} ({type(exc).__name__}: {exc})") from None


def read_split_file(path: str, dataset: str) -> dict[str, tuple[list[int], int]]:
    """Cases and persistent modality masks of a PASSION split file: ``{case: (mask in this project's order, line)}``.

    The format, as read from the files and the code that reads them in the public repositories:

    - BraTS2020: ``datasets/BraTS/brats_split/Brats2020_imb_split_mr2468.csv`` of Jun-Jie-Shi/PASSION (Shi et al.,
      ACM MM'24; ``mr2468``: missing rates T1 0.2, T1ce 0.4, FLAIR 0.6, T2 0.8), CRLF line ends, the header
      ``data_name,mask_id,mask,pos_mask_ids`` and one row per training case (219), e.g.
      ``HG_BraTS20_Training_002,10,"[True, True, True, False]","[1, 2, 3, 5, 6, 9, 10]"``. ``data_name`` is the
      release's case name behind a grade prefix ``HG_`` or ``LG_``; ``mask`` lists the presence of FLAIR, T1ce, T1,
      T2 in that order (the order their generator writes and their loader's channels; this project's order is
      FLAIR, T1, T1ce, T2); ``mask_id`` numbers the mask (their IDT training reads it); ``pos_mask_ids`` lists the
      sub-masks of their modality-dropout variant and is not used here.
    - MyoPS2020: ``HGA/datasets/MyoPS/myops_split/MyoPS2020_longtail_split_*.csv`` of Jun-Jie-Shi/Extension, the same
      columns with one row per 2-D slice, ``myops_training_101_slice_0``, and ``mask`` in the order bSSFP (C0), LGE
      (DE), T2, as their preprocessing stacks the release's files; every slice of a case carries one mask.

    ``mask`` may also be written with 1/0. Errors, one line naming the file and line: a wrong header or column count,
    a mask that is not a list of 4 (MyoPS 3) flags or has no modality, a ``mask_id`` that is not the mask's number, a
    case (or slice) listed twice, slices of one case with different masks.

    Args:
        path: the CSV file.
        dataset: ``brats`` (also MSD) or ``myops``.
    """
    family = "myops" if dataset == "myops" else "brats"
    order = SPLIT_FILE_MODALITIES[family]
    ours = MYOPS_MODALITIES if family == "myops" else BRATS_MODALITIES
    rows = _read_rows(path, "split file")
    header = ",".join(_SPLIT_COLUMNS)
    if not rows or [f.strip() for f in rows[0][1]] != list(_SPLIT_COLUMNS):
        got = ",".join(rows[0][1]) if rows else "an empty file"
        raise DMAFDataError(f"{path}: line 1: expected the header {header} (a PASSION split file), got {got!r}")
    cases: dict[str, tuple[list[int], int]] = {}
    names: dict[str, int] = {}
    for line, row in rows[1:]:
        where = f"{path}: line {line}"
        if len(row) != len(_SPLIT_COLUMNS):
            raise DMAFDataError(f"{where}: {len(row)} columns, expected {len(_SPLIT_COLUMNS)} ({header})")
        name, mask_id, text = row[0].strip(), row[1].strip(), row[2].strip()
        if not name:
            raise DMAFDataError(f"{where}: no data_name")
        flags = _flags(text, len(order))
        if flags is None:
            raise DMAFDataError(
                f"{where}: {name}: mask {text!r} is not a list of {len(order)} flags (True/False or "
                f"1/0) in the order {', '.join(order)}"
            )
        if not any(flags):
            raise DMAFDataError(f"{where}: {name}: mask {text!r} has no modality present")
        table = _SPLIT_MASK_IDS[family]
        if not mask_id.isdigit() or int(mask_id) >= len(table):
            raise DMAFDataError(f"{where}: {name}: mask_id {mask_id!r} is not a mask number 0..{len(table) - 1}")
        if table[int(mask_id)] != "".join(map(str, flags)):
            meant = [bool(int(c)) for c in table[int(mask_id)]]
            raise DMAFDataError(
                f"{where}: {name}: mask_id {mask_id} stands for {meant} but mask is {text}; the "
                "training code of PASSION reads mask_id, so the two must agree"
            )
        key = _GRADE_PREFIX.sub("", name)
        if key in names:
            raise DMAFDataError(f"{where}: {name} is listed twice (also line {names[key]})")
        names[key] = line
        case = _split_case(key, family)
        mask = [flags[order.index(m)] for m in ours]
        if case in cases and cases[case][0] != mask:
            raise DMAFDataError(
                f"{where}: {name} has mask {text} but line {cases[case][1]} gives {case} another; "
                "a case has one mask for all its slices"
            )
        cases.setdefault(case, (mask, line))
    if not cases:
        raise DMAFDataError(f"{path}: no case listed under the header {header}")
    return cases


def read_case_list(path: str, dataset: str) -> dict[str, int]:
    """Cases of a text file with one case name per line (PASSION's ``test.txt``): ``{case: line}``.

    Blank lines and lines starting with ``#`` are skipped; names are read as in :func:`read_split_file` (BraTS
    ``HG_``/``LG_`` prefixes and MyoPS ``_slice_K`` suffixes are dropped). A name listed twice is an error.
    """
    family = "myops" if dataset == "myops" else "brats"
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DMAFDataError(f"{path}: case list not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DMAFDataError(f"{path}: cannot read the case list ({type(exc).__name__}: {exc})") from None
    cases: dict[str, int] = {}
    names: dict[str, int] = {}
    for line, text in enumerate(lines, 1):
        name = text.strip()
        if not name or name.startswith("#"):
            continue
        key = _GRADE_PREFIX.sub("", name) if family == "brats" else name
        if key in names:
            raise DMAFDataError(f"{path}: line {line}: {name} is listed twice (also line {names[key]})")
        names[key] = line
        cases.setdefault(_split_case(key, family), line)
    if not cases:
        raise DMAFDataError(f"{path}: no case listed")
    return cases
