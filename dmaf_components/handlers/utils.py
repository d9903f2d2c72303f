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

from typing import TYPE_CHECKING, Any

from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["output_scalars", "TrainingOutputHandler"]


class TrainingOutputHandler:
    """After the loss of each iteration: keep only the fused logits as ``pred`` and record the loss terms.

    DMAF-Net's training forward returns a :class:`~dmaf_components.networks.DMAFNetOutput`; replacing it by its
    ``logits`` lets MONAI decollate the output and lets the usual ``from_engine(["loss"])`` transforms (StatsHandler,
    ``--tracking mlflow``) work unchanged. At ``ITERATION_COMPLETED`` (after decollation, before the loggers when
    this handler is listed first) every output item gets ``"scalars"``: the loss terms and the DTM state
    (``engine.state.dtm``), for :func:`output_scalars`.

    Args:
        loss: the :class:`~dmaf_components.losses.DMAFLoss` (its ``last_terms`` are recorded).
    """

    def __init__(self, loss: Any) -> None:
        self.loss = getattr(loss, "module", loss)

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.attach_scalars)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        pred = output.get(CommonKeys.PRED)
        if hasattr(pred, "logits"):
            output[CommonKeys.PRED] = pred.logits.detach()

    def attach_scalars(self, engine: Engine) -> None:
        scalars = self.loss.last_terms.scalars() if self.loss.last_terms is not None else {}
        scalars.update(getattr(engine.state, "dtm", None) or {})
        output = engine.state.output
        for item in output if isinstance(output, list) else [output]:
            if isinstance(item, dict):
                item["scalars"] = scalars


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
