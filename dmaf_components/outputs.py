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
"""Writing a result file so that it is either complete and new or, when anything fails, the earlier file as it was.

:func:`atomic_write` is the one implementation for the files the bundle writes beside a result (the quality table,
reports, snapshots): a hidden temporary file in the target's folder, flushed to disk, then ``os.replace``; on any
failure (a full disk, Ctrl-C) the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

from .data.constants import DMAFDataError

__all__ = ["atomic_write"]


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"


def atomic_write(
    target: str,
    write: Callable[[IO[Any]], None],
    binary: bool = False,
    overwrite: bool = True,
    what: str = "",
) -> str:
    """Write ``target`` through ``write(file)`` atomically.

    Args:
        target: the file to write.
        write: writes the content into the open temporary file.
        binary: open the temporary file in binary mode.
        overwrite: replace an existing ``target``; when False an existing one is kept and an error raised.
        what: what the file is, for the error message (e.g. ``"the snapshot"``).

    Returns:
        ``target``.

    Raises:
        DMAFDataError: ``target`` exists and ``overwrite`` is off, or it cannot be written (one line naming it).
    """
    if not overwrite and os.path.lexists(target):
        raise DMAFDataError(f"{target}: exists already; kept (pass --overwrite true to replace it)")
    folder = os.path.dirname(target) or "."
    suffix = os.path.splitext(target)[1]
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.tmp", suffix=suffix, dir=folder)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:  # Ctrl-C included: never leave the temporary file behind
        if tmp is not None and os.path.lexists(tmp):
            os.remove(tmp)
        if not isinstance(exc, Exception):
            raise
        if isinstance(exc, DMAFDataError):
            raise
        raise DMAFDataError(f"{target}: cannot write {what or 'the file'} ({_reason(exc)})") from None
    return target
