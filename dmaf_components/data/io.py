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
"""Reading datalists back with absolute paths (also for per-modality path mappings)."""

from __future__ import annotations

import json
import os

from .constants import DMAFDataError

__all__ = ["load_datalist", "read_datalist"]


def _abs(path, base: str):
    if path is None:
        return None
    return path if os.path.isabs(path) else os.path.join(base, path)


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

    Args:
        datalist_file: the JSON written by ``dmaf datalist``.
        section: ``training``, ``validation`` or ``testing``.
        data_dir: folder the relative paths are relative to (default: the datalist's folder).
    """
    datalist = read_datalist(datalist_file)
    if section not in datalist:
        raise DMAFDataError(f"{datalist_file}: no section {section!r} (has {sorted(datalist)})")
    base = data_dir or os.path.dirname(os.path.abspath(datalist_file))
    entries = []
    for i, entry in enumerate(datalist[section]):
        if "image" not in entry:
            raise DMAFDataError(f"{datalist_file}: {section}[{i}] has no 'image' field")
        e = dict(entry)
        img = entry["image"]
        if isinstance(img, dict):
            e["image"] = {k: _abs(v, base) for k, v in img.items()}
        elif isinstance(img, list):
            e["image"] = [_abs(v, base) for v in img]
        else:
            e["image"] = _abs(img, base)
        if "label" in entry:
            e["label"] = _abs(entry["label"], base)
        entries.append(e)
    return entries
