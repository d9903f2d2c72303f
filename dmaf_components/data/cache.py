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
"""What a MONAI ``CacheDataset`` holds in memory, logged when training starts."""

from __future__ import annotations

import logging

import torch

__all__ = ["cache_bytes", "log_cache_size"]


def cache_bytes(dataset) -> int:
    """Bytes of the tensors a MONAI ``CacheDataset`` keeps (0 for any other dataset)."""
    total = 0
    for item in getattr(dataset, "_cache", None) or []:
        if isinstance(item, dict):
            total += sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))
    return total


def log_cache_size(dataset, name: str = "training") -> int:
    """Log one line with the number of cached cases and the memory they take; returns the bytes.

    Args:
        dataset: the bundle's ``train#dataset`` (a ``CacheDataset``).
        name: what the line calls the dataset.
    """
    size = cache_bytes(dataset)
    cached = len(getattr(dataset, "_cache", None) or [])
    total = len(dataset)
    logging.getLogger("dmaf_components").info(
        f"{name} cache: {cached} of {total} cases in memory, {size / 1024**3:.2f} GB"
        + ("" if cached else " (--cache_rate 0: every sample is read and preprocessed each epoch)")
    )
    return size
