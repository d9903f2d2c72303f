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
"""The training loader: MONAI's ``ThreadDataLoader`` with its background thread's errors raised where the batches are
consumed, and the default number of worker processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from monai.data import ThreadBuffer, ThreadDataLoader

__all__ = ["CheckedThreadBuffer", "CheckedThreadDataLoader", "available_cpus", "train_loader_workers"]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one; a CPU quota of a container is not seen)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def train_loader_workers(num_workers: int, cpus: int | None = None) -> int:
    """The bundle's default ``train_num_workers`` (the training loader's worker processes): 0, the transforms in the
    loader's background thread, with at most 2 CPUs; else ``num_workers``.

    A worker process hands each batch to the trainer through a new shared-memory segment: about 50 ms of CPU for a
    42 MB BraTS patch (``benchmarks/loader_ipc.py``), which on 2 cores is CPU the transforms need. Measured on 2
    cores, the loader alone: the thread 9.22 and 8.47 samples/s, 2 worker processes 6.02 and 8.47
    (docs/performance.md). With more cores the workers run on cores of their own.

    Args:
        num_workers: the bundle's ``num_workers`` (cache-filling threads, validation and evaluation loaders).
        cpus: CPUs to assume; default: :func:`available_cpus`.

    Returns:
        the number of training loader worker processes.
    """
    cpus = available_cpus() if cpus is None else cpus
    return 0 if cpus <= 2 else int(num_workers)


class CheckedThreadBuffer(ThreadBuffer):
    """A MONAI ``ThreadBuffer`` that re-raises, in the consuming thread, what stopped its source thread.

    MONAI 1.6's ``ThreadBuffer`` ends its iteration when the source raises in the background thread: the thread dies
    (its traceback goes to stderr) and the consumer sees an exhausted buffer, no exception. Ignite then starts the
    loader again to fill the epoch, so a sample that fails a check would be skipped with training going on. Here the
    batches made before the error are yielded, then the error itself is raised.
    """

    def __init__(self, src: Any, buffer_size: int = 1, timeout: float = 0.01) -> None:
        super().__init__(src, buffer_size=buffer_size, timeout=timeout)
        self.error: BaseException | None = None

    def enqueue_values(self) -> None:
        try:
            super().enqueue_values()
        except BaseException as e:  # noqa: B036 - handed to the consuming thread, which raises it
            self.error = e

    def __iter__(self) -> Iterator[Any]:
        self.error = None
        yield from super().__iter__()
        if self.error is not None:
            raise self.error


class CheckedThreadDataLoader(ThreadDataLoader):
    """MONAI ``ThreadDataLoader`` whose background thread's errors reach the training loop.

    With ``num_workers=0`` the dataset's transforms run in one background thread of the main process while the main
    thread trains: no worker processes and no copy of each batch between processes (what MONAI's fast-training
    recipe pairs with ``CacheDataset``). With ``num_workers > 0`` the transforms run in worker processes as with a
    plain ``DataLoader`` and the thread only prefetches their batches. Thread workers (``use_thread_workers``) are
    refused: PyTorch's worker loop sets the process-wide thread count to 1 and re-seeds the global generators.

    Args:
        dataset: the dataset.
        buffer_size: batches made ahead by the background thread.
        buffer_timeout: seconds the thread and the consumer wait on the buffer before checking again.
        repeats: must be 1 (MONAI's ``repeats`` yields each batch again without counting it in ``len()``, which
            would put an Ignite epoch and the resumable sampler out of step).
        kwargs: ``torch.utils.data.DataLoader`` arguments.
    """

    def __init__(
        self, dataset: Any, buffer_size: int = 1, buffer_timeout: float = 0.01, repeats: int = 1, **kwargs: Any
    ) -> None:
        if repeats != 1:
            raise ValueError(
                f"CheckedThreadDataLoader: repeats must be 1, got {repeats!r} (len() would not count them)."
            )
        if kwargs.pop("use_thread_workers", False):
            raise ValueError(
                "CheckedThreadDataLoader: use_thread_workers is not supported (PyTorch's worker loop sets the "
                "process's thread count and global seeds); use num_workers=0 for a background thread."
            )
        super().__init__(dataset, buffer_size=buffer_size, buffer_timeout=buffer_timeout, repeats=repeats, **kwargs)

    def __iter__(self) -> Iterator[Any]:  # ThreadDataLoader's, on the checked buffer (repeats is always 1)
        yield from CheckedThreadBuffer(super(ThreadDataLoader, self).__iter__(), self.buffer_size, self.buffer_timeout)
