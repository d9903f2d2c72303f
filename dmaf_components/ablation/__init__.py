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
"""``dmaf ablation``, the paper's Table-3 ablation run through the bundle, one concept per module: the settings and
their bundle overrides (:mod:`.settings`), running the runs (:mod:`.runner`), a run's record and its provenance
(:mod:`.records`), the summary (:mod:`.report`), and :class:`AblationStudy`, which coordinates them (:mod:`.study`)."""

from __future__ import annotations

from ..stats import paired_bootstrap
from .records import validation_curve
from .report import INTERVAL_NOTE, component_effects, summarize_records, write_summary
from .runner import AblationRunError
from .settings import BUNDLE_DIR, SETTINGS, resolve_settings, setting_overrides
from .study import AblationStudy

__all__ = [
    "SETTINGS",
    "BUNDLE_DIR",
    "INTERVAL_NOTE",
    "setting_overrides",
    "resolve_settings",
    "paired_bootstrap",
    "validation_curve",
    "summarize_records",
    "component_effects",
    "write_summary",
    "AblationStudy",
    "AblationRunError",
]
