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
"""Ignite handlers for DMAF-Net training."""

from __future__ import annotations

from .dtm import SCALING_MODES, DynamicTrainingMonitor
from .reliability import (
    FinalModelFallback,
    FiniteCheckpointSaver,
    NonFiniteError,
    NonFiniteLossHandler,
    non_finite_entries,
)
from .resume import RandomStateHandler, ResumableSampler, ResumeCheckpointLoader, SeededDataset
from .utils import TrainingOutputHandler, output_scalars

__all__ = [
    "DynamicTrainingMonitor",
    "SCALING_MODES",
    "output_scalars",
    "TrainingOutputHandler",
    "NonFiniteError",
    "NonFiniteLossHandler",
    "FiniteCheckpointSaver",
    "FinalModelFallback",
    "non_finite_entries",
    "RandomStateHandler",
    "ResumableSampler",
    "ResumeCheckpointLoader",
    "SeededDataset",
]
