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
"""The host allocator of a bundle process: glibc's malloc told to reuse freed memory instead of unmapping it.

Every array the bundle handles at real size is larger than glibc's largest mmap threshold (32 MB on 64-bit): a
4 x 128^3 float32 training patch is 33.5 MB, a 4 x 240 x 240 x 155 study 143 MB. glibc serves each such block with
a fresh ``mmap`` and unmaps it at ``free``, so every intermediate array of a transform, of the sliding-window
inference or of the CPU training step costs thousands of page faults, each zero-filling a page the previous array
had just given back. :func:`keep_freed_memory` makes malloc serve these blocks from the heap and keep what is freed,
so the next array reuses pages already mapped. Measured (``benchmarks/dataloader.py --heap``,
``benchmarks/inference.py``; docs/performance.md): the training transforms in one process 2.4x faster, full-study
CPU inference 1.5x faster. The cost: a process keeps its peak heap instead of returning memory between arrays.
The bundle's configs call it first in ``initialize`` (key ``keep_freed_memory``, default true); data-loader workers
forked afterwards inherit it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4


def keep_freed_memory(enabled: bool = True, trim_threshold: int = 2**30) -> bool:
    """Have glibc's malloc serve large blocks from the heap rather than ``mmap`` (``M_MMAP_MAX`` 0) and return free
    memory at the top of the heap to the system only beyond ``trim_threshold`` bytes (``M_TRIM_THRESHOLD``).

    Process-wide, for the rest of the process's life (and for the processes it forks). An allocation glibc cannot
    place in a heap still falls back to ``mmap``, so nothing fails that would not have failed before.

    Args:
        enabled: False does nothing (the bundle key ``keep_freed_memory``).
        trim_threshold: free memory kept at the top of the heap (default 1 GiB; at most 2^31 - 1).

    Returns:
        True where applied (Linux with glibc); False when not enabled or elsewhere (macOS, Windows, musl), where
        nothing changes.

    Raises:
        TypeError: ``enabled`` is not a bool (``"false"`` from a command line would otherwise mean True).
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"keep_freed_memory must be True or False, got {enabled!r} (on the command line: False).")
    if not enabled:
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, int(min(trim_threshold, 2**31 - 1))))
