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
"""MONAI dictionary transforms for incomplete multi-modal MRI: loading a study (:mod:`.io`), resampling and
augmentation (:mod:`.spatial`), labels (:mod:`.label`) and modality dropping (:mod:`.modality`)."""

from __future__ import annotations

from .io import AVAILABLE_POSTFIX, LoadModalitiesd
from .label import CheckLabelValuesd, LabelToRegionsd, class_map
from .modality import ModalityDropd
from .spatial import RandFlipRotated, StudySpacingd

__all__ = [
    "LoadModalitiesd",
    "CheckLabelValuesd",
    "RandFlipRotated",
    "ModalityDropd",
    "LabelToRegionsd",
    "StudySpacingd",
    "AVAILABLE_POSTFIX",
    "class_map",
]
