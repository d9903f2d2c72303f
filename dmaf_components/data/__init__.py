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
"""Data tools: datalists, IDT masks, synthetic datasets."""

from __future__ import annotations

from .cache import cache_bytes, log_cache_size
from .constants import *  # noqa: F401,F403
from .check import (
    MYOPS_RAW_LABEL_VALUES,
    CheckProblem,
    CheckReport,
    DataCheckError,
    check_case,
    check_datalist,
    check_entries,
)
from .constants import __all__ as _constants_all
from .datalist import (
    PAPER_MISSING_RATES,
    build_datalist,
    find_brats_cases,
    find_msd_cases,
    find_myops_cases,
    idt_masks,
    missing_rates_of,
    split_cases,
    write_datalist,
)
from .image_checks import label_values
from .io import load_datalist
from .loader import CheckedThreadBuffer, CheckedThreadDataLoader, available_cpus, train_loader_workers
from .names import classify_files, is_label_file, is_nifti, modality_of, nifti_stem
from .studies import check_output_dir, find_studies
from .synthetic import BRATS_AFFINE, brats_case, myops_case, synthesize_brats, synthesize_myops
from .allocator import keep_freed_memory

__all__ = list(_constants_all) + [
    "keep_freed_memory",
    "CheckedThreadBuffer",
    "CheckedThreadDataLoader",
    "train_loader_workers",
    "available_cpus",
    "PAPER_MISSING_RATES",
    "build_datalist",
    "write_datalist",
    "load_datalist",
    "MYOPS_RAW_LABEL_VALUES",
    "CheckProblem",
    "CheckReport",
    "DataCheckError",
    "check_case",
    "check_datalist",
    "check_entries",
    "label_values",
    "find_studies",
    "check_output_dir",
    "modality_of",
    "classify_files",
    "is_label_file",
    "is_nifti",
    "nifti_stem",
    "find_brats_cases",
    "find_msd_cases",
    "find_myops_cases",
    "idt_masks",
    "missing_rates_of",
    "split_cases",
    "BRATS_AFFINE",
    "brats_case",
    "myops_case",
    "synthesize_brats",
    "synthesize_myops",
    "cache_bytes",
    "log_cache_size",
]
