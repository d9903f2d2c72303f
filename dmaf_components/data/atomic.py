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
"""The one way a file is replaced whole: a hidden temporary file in the target's folder, flushed to disk, then
``os.replace``; on any failure the temporary file is removed and the target is as it was.

It stands here, on the package's ground floor, because the data tools (datalists, synthetic datasets) write files
too and import nothing above ``data/``; :func:`dmaf_components.outputs.atomic_write` adds the policy on top (an
existing file kept unless ``overwrite``, one-line errors naming the file) and is what the rest of the package uses.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

__all__ = ["atomic_replace"]


def _extension(name: str) -> str:
    """``.nii.gz`` for a compressed NIfTI name, else the last extension (``.json``, ``.pt``; ``""`` without one)."""
    return ".nii.gz" if name.lower().endswith(".nii.gz") else os.path.splitext(name)[1]


def _new_temporary(folder: str, name: str, ext: str) -> tuple[int, str]:
    """Create ``.<name>.tmp<random><ext>`` in ``folder`` (exclusive; the mode as for any new file, umask applied)."""
    while True:
        tmp = os.path.join(folder, f".{name}.tmp{uuid.uuid4().hex[:12]}{ext}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:  # pragma: no cover - a 48-bit name already taken
            continue


def atomic_replace(
    target: str,
    write: Callable[[Any], None],
    binary: bool = False,
    by_path: bool = False,
    suffix: str | None = None,
) -> str:
    """Write ``target`` whole or not at all.

    The content goes to a hidden temporary file beside ``target`` (``.<name>.tmp<random><ext>``: the same extension,
    so that writers choosing the format by name see it; hidden, so that the dataset tools pass over it), is flushed
    to disk and replaces ``target`` with ``os.replace``. A new file gets the mode of any new file (umask applied, not
    ``mkstemp``'s private 0600); a replaced one keeps its mode. On any failure, Ctrl-C included, the temporary file
    is removed, ``target`` is untouched, and the writer's own exception is raised.

    Args:
        target: the file to write; its folder is created when missing.
        write: writes the content: into the open temporary file, or with ``by_path`` to the temporary file's path
            (for writers that take a file name, as nibabel and ITK).
        binary: open the temporary file in binary mode (not with ``by_path``).
        by_path: pass ``write`` the temporary file's path instead of an open file.
        suffix: the temporary file's extension; default: the target's (``.nii.gz`` counts as one).

    Returns:
        ``target``.
    """
    folder, name = os.path.split(os.path.abspath(target))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = _new_temporary(folder, name, _extension(name) if suffix is None else suffix)
        if by_path:
            os.close(fd)
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb" if binary else "w") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        if os.path.exists(target):
            os.chmod(tmp, os.stat(target).st_mode & 0o7777)  # a replaced file keeps its permissions
        os.replace(tmp, target)
    except BaseException:  # Ctrl-C included: never leave the temporary file behind
        if tmp is not None and os.path.lexists(tmp):
            os.remove(tmp)
        raise
    return target
