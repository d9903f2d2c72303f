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
"""Reading datalists back with absolute paths (also for per-modality path mappings), and the checks every reader
shares: the type of each entry and field, paths confined to the data folder, and no case listed twice."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from .constants import BRATS_MODALITIES, MYOPS_MODALITIES, DMAFDataError

__all__ = [
    "SECTIONS",
    "load_datalist",
    "read_datalist",
    "datalist_modalities",
    "entry_problems",
    "entry_name",
    "duplicate_cases",
    "resolve_path",
    "resolve_entry",
]

#: the sections of a datalist, in the order they are checked
SECTIONS = ("training", "validation", "testing")


def _describe(value) -> str:
    """``int 5``, ``str 'abc'``: a value's type and (shortened) repr, for one-line messages."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def datalist_modalities(datalist: Mapping) -> tuple[str, ...] | None:
    """The modality order of a datalist: its ``modalities`` list, else the one of its ``dataset`` (or ``layout``);
    None when it names neither."""
    modalities = datalist.get("modalities")
    if isinstance(modalities, list) and modalities and all(isinstance(m, str) for m in modalities):
        return tuple(modalities)
    family = str(datalist.get("dataset") or datalist.get("layout") or "").lower()
    if family == "myops":
        return MYOPS_MODALITIES
    return BRATS_MODALITIES if family in ("brats", "msd") else None


def entry_name(entry) -> str | None:
    """The entry's ``case`` name when it is a non-empty string."""
    case = entry.get("case") if isinstance(entry, Mapping) else None
    return case if isinstance(case, str) and case else None


def _is_path(value) -> bool:
    return isinstance(value, (str, os.PathLike)) and bool(os.fspath(value))


def entry_problems(entry, modalities: Sequence[str] | None = None) -> list[str]:
    """What is wrong with the fields of one datalist entry, one message each (empty when nothing is).

    An entry is an object with ``image`` (a path, a list of paths or ``{modality: path}``; an empty or null path
    is an absent modality), optionally ``label`` (a path), ``case`` (a name) and ``modality_mask`` (one 0/1 flag per
    modality, at least one 1; its length is checked when ``modalities`` is given).
    """
    if not isinstance(entry, Mapping):
        return [f"is {_describe(entry)}; expected an object with 'image' (and 'label', 'case')"]
    problems = []
    image = entry.get("image")
    expected = "expected a path, a list of paths or {modality: path}"
    if "image" not in entry:
        problems.append("no 'image' field")
    elif isinstance(image, Mapping):
        problems += [
            f"image[{key!r}] is {_describe(path)}; expected a path"
            for key, path in image.items()
            if not isinstance(key, str) or not (path in (None, "") or _is_path(path))
        ]
        if image and not any(_is_path(p) for p in image.values()):
            problems.append("image lists no path")
    elif isinstance(image, (list, tuple)):
        problems += [
            f"image[{i}] is {_describe(path)}; expected a path"
            for i, path in enumerate(image)
            if not (path in (None, "") or _is_path(path))
        ]
    elif not _is_path(image):
        problems.append(f"image is {_describe(image)}; {expected}")
    if "label" in entry and entry["label"] is not None and not _is_path(entry["label"]):
        problems.append(f"label is {_describe(entry['label'])}; expected a path")
    if "case" in entry and not (isinstance(entry["case"], str) and entry["case"]):
        problems.append(f"case is {_describe(entry['case'])}; expected a name")
    if "modality_mask" in entry:
        mask = entry["modality_mask"]
        names = f" ({', '.join(modalities)})" if modalities else ""
        if not isinstance(mask, (list, tuple)) or not all(isinstance(v, (bool, int)) and v in (0, 1) for v in mask):
            problems.append(
                f"modality_mask is {_describe(mask)}; expected a list of 0/1 flags, one per modality{names}"
            )
        elif modalities is not None and len(mask) != len(modalities):
            problems.append(f"modality_mask {list(mask)} has {len(mask)} flags; expected {len(modalities)}{names}")
        elif not any(mask):
            problems.append(f"modality_mask {list(mask)} marks every modality missing; a case needs at least one")
    return problems


def _identity(entry: Mapping) -> str:
    """What makes two entries the same case: the case name, else the label path, else the image path(s)."""
    name = entry_name(entry)
    if name:
        return name
    first = entry.get("label") or entry.get("image")
    if isinstance(first, Mapping):
        first = sorted(str(p) for p in first.values() if p)
    return repr(os.path.normpath(first) if isinstance(first, str) else first)


def duplicate_cases(datalist: Mapping) -> list[tuple[str, str]]:
    """``(case, message)`` for every entry whose case was listed before, in the same or another section.

    A case (its ``case`` name; without one, its label or image path) belongs to one section, once: a case both
    trained and tested on inflates the results, one listed twice in training is drawn twice as often. Entries that
    are not objects are skipped (:func:`entry_problems` reports them).
    """
    seen: dict[str, str] = {}
    found = []
    for section in SECTIONS:
        entries = datalist.get(section)
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            if not isinstance(entry, Mapping):
                continue
            key, where = _identity(entry), f"{section}[{i}]"
            if key in seen:
                first = seen[key]
                same = first.split("[")[0] == section
                what = f"listed twice in {section}" if same else "listed in two sections"
                found.append(
                    (
                        entry_name(entry) or key,
                        f"{what}: {first} and {where} (a case belongs to one "
                        "section, once: a case both trained and evaluated on inflates the results)",
                    )
                )
            else:
                seen[key] = where
    return found


def resolve_path(path, base: str | None, where: str = "") -> str:
    """A datalist path made absolute against ``base``, the data folder.

    A relative path must stay inside ``base`` (``../../etc/passwd`` does not; the test is on the path's text, so a
    symbolic link inside the data folder may point anywhere); an absolute path is used as it is.

    Raises:
        DMAFDataError: the relative path leaves the data folder.
    """
    path = os.fspath(path)
    if os.path.isabs(path) or base is None:
        return path
    base = os.path.abspath(base)
    full = os.path.join(base, path)
    if os.path.commonpath([os.path.normpath(full), base]) != base:
        prefix = f"{where}: " if where else ""
        raise DMAFDataError(
            f"{prefix}path {path!r} leaves the data folder {base}; relative paths must stay inside "
            "it (give an absolute path to use a file elsewhere)"
        )
    return full


def resolve_entry(entry: Mapping, base: str | None, where: str = "") -> dict:
    """A copy of a (well-formed, :func:`entry_problems`) entry with its image and label paths resolved by
    :func:`resolve_path`; absent (empty) modality paths are kept as they are."""
    out = dict(entry)

    def one(path):
        return path if path in (None, "") else resolve_path(path, base, where)

    image = entry["image"]
    if isinstance(image, Mapping):
        out["image"] = {k: one(v) for k, v in image.items()}
    elif isinstance(image, (list, tuple)):
        out["image"] = [one(v) for v in image]
    else:
        out["image"] = one(image)
    if entry.get("label") is not None:
        out["label"] = one(entry["label"])
    return out


def read_datalist(datalist_file: str) -> dict:
    """The datalist JSON object, with a one-line error naming the file when it is missing, unreadable or not a
    JSON object (the one reader of ``load_datalist``, ``dmaf check`` and ``dmaf ablation``)."""
    try:
        with open(datalist_file) as f:
            datalist = json.load(f)
    except FileNotFoundError:
        raise DMAFDataError(f"{datalist_file}: datalist not found; create it with `dmaf datalist`") from None
    except (OSError, ValueError) as exc:
        raise DMAFDataError(f"{datalist_file}: cannot read the datalist ({exc})") from None
    if not isinstance(datalist, dict):
        raise DMAFDataError(f"{datalist_file}: not a datalist (a JSON object with training/validation/testing)")
    return datalist


def load_datalist(datalist_file: str, section: str = "training", data_dir: str | None = None) -> list[dict]:
    """Entries of one section of a datalist with absolute paths.

    The whole datalist is checked first, with a one-line error naming the file, the entry and the field: an entry
    or field of the wrong type, a ``modality_mask`` of the wrong length or without any modality, a case listed
    twice (in one section or in two), a relative path that leaves the data folder.

    Args:
        datalist_file: the JSON written by ``dmaf datalist``.
        section: ``training``, ``validation`` or ``testing``.
        data_dir: folder the relative paths are relative to (default: the datalist's folder).
    """
    datalist = read_datalist(datalist_file)
    if section not in datalist:
        raise DMAFDataError(f"{datalist_file}: no section {section!r} (has {sorted(datalist)})")
    if not isinstance(datalist[section], list):
        raise DMAFDataError(f"{datalist_file}: {section} is {_describe(datalist[section])}; expected a list of cases")
    modalities = datalist_modalities(datalist)
    for name in SECTIONS:
        entries = datalist.get(name)
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            for problem in entry_problems(entry, modalities):
                case = entry_name(entry)
                raise DMAFDataError(f"{datalist_file}: {name}[{i}]{f' ({case})' if case else ''}: {problem}")
    for case, problem in duplicate_cases(datalist):
        raise DMAFDataError(f"{datalist_file}: case {case} {problem}")
    base = os.path.abspath(data_dir or os.path.dirname(os.path.abspath(datalist_file)))
    entries = []
    for i, entry in enumerate(datalist[section]):
        case = entry_name(entry)
        entries.append(resolve_entry(entry, base, f"{datalist_file}: {section}[{i}]{f' ({case})' if case else ''}"))
    return entries
