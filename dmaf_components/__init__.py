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
"""DMAF-Net (Lan et al., 2025) components for MONAI bundles: network, losses, DTM handler, transforms, data tools."""

from __future__ import annotations

__version__ = "0.1.10"

from . import data, evaluation, handlers, inferers, losses, networks, transforms  # bundle configs use these

__all__ = ["data", "evaluation", "handlers", "inferers", "losses", "networks", "transforms", "__version__"]
