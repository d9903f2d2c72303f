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
"""Helpers that read DMAF-Net training outputs for MONAI's stats handlers."""

from __future__ import annotations

from typing import Any

__all__ = ["output_scalars"]


def output_scalars(output: Any) -> dict[str, float]:
    """Scalars to log for one training iteration: every loss term and DTM value when present, else the loss.

    Use as ``output_transform`` of MONAI's ``TensorBoardStatsHandler`` / ``MLFlowHandler`` on a trainer with
    ``decollate=False``.
    """
    if isinstance(output, (list, tuple)):
        output = output[0] if output else {}
    if not isinstance(output, dict):
        return {"loss": float(output)}
    scalars = output.get("scalars")
    if scalars:
        return dict(scalars)
    return {"loss": float(output["loss"])} if "loss" in output else {}
