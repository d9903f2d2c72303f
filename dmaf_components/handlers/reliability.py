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
"""Training never goes on with, nor saves, a non-finite model; a training run always leaves a ``model.pt``; it never
replaces an earlier training's files unasked; a data error or a refused setting ends it with one line."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ignite.distributed as idist
import torch
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.utils import CommonKeys
from torch import nn

from ..errors import DMAFError, BundleExit, NonFiniteError, as_bool, one_line_message
from ..outputs import atomic_write

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "NonFiniteError",
    "NonFiniteLossHandler",
    "FiniteCheckpointSaver",
    "FinalModelFallback",
    "OneLineExit",
    "TrainingPreflight",
    "one_line_message",
    "non_finite_entries",
]


def _state_of(obj: Any) -> Any:
    if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        obj = obj.module
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def _walk(value: Any, prefix: str, out: list[str]) -> None:
    if isinstance(value, torch.Tensor):
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            out.append(prefix)
    elif isinstance(value, float):
        if not math.isfinite(value):
            out.append(prefix)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _walk(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk(v, f"{prefix}.{i}", out)


def non_finite_entries(objects: Mapping[str, Any]) -> list[str]:
    """Names of the state entries holding NaN/inf, e.g. ``["model.encoders.0.stages.0.entry.conv.weight"]``.

    Args:
        objects: name -> object with ``state_dict()`` (modules, optimizers, handlers) or a plain state.
    """
    out: list[str] = []
    for name, obj in objects.items():
        _walk(_state_of(obj), str(name), out)
    return out


def _describe(entries: list[str], limit: int = 3) -> str:
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


class NonFiniteLossHandler:
    """Stop training at the first non-finite loss, before backward, so that the weights stay finite.

    Attached at ``IterationEvents.LOSS_COMPLETED`` of a MONAI trainer (after the loss, before backward and the
    optimizer step). A non-finite loss raises :class:`NonFiniteError` with one line naming the iteration, the epoch
    and the non-finite terms of a :class:`~dmaf_components.losses.DMAFLoss` (``last_terms``); the same line is
    logged as an error. Under DDP the verdict is reduced over the ranks, so that every rank stops together instead
    of the others waiting forever in the next collective.

    With AMP (``engine.amp`` and a GradScaler), a non-finite *gradient* is routine (the scaler skips the step and
    lowers its scale), and so may be an occasional fp16 overflow in the forward: a non-finite loss is then tolerated,
    with a warning, until ``amp_patience`` consecutive iterations have had one. A tolerated iteration does not feed
    Dynamic Training Monitoring (its gap sums and modality counts are zeroed, so DTM's EMAs keep their values) and its
    step is skipped by the scaler (its gradients are non-finite). Without AMP a single non-finite loss stops training:
    its backward would make every weight NaN.

    Args:
        loss: the loss whose ``last_terms`` (if any) name the non-finite terms; default: the engine's loss function.
        amp_patience: consecutive non-finite AMP iterations that stop training (1: the first one does).
        name: logger name; default: the engine's logger.
    """

    def __init__(self, loss: Any = None, amp_patience: int = 5, name: str | None = None) -> None:
        if amp_patience < 1:
            raise ValueError(f"amp_patience must be >= 1, got {amp_patience}.")
        self.loss = getattr(loss, "module", loss)
        self.amp_patience = amp_patience
        self.logger = logging.getLogger(name)
        self._name = name
        self.consecutive = 0

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def _terms(self, engine: Engine, value: torch.Tensor) -> str:
        loss = self.loss if self.loss is not None else getattr(engine, "loss_function", None)
        terms = getattr(getattr(loss, "module", loss), "last_terms", None)
        if terms is not None and hasattr(terms, "scalars"):
            bad = [f"{k}={v}" for k, v in terms.scalars().items() if not math.isfinite(v)]
            if bad:
                return ", ".join(bad)
        return f"loss={float(value.detach().float().mean()) if value.numel() else value}"

    def __call__(self, engine: Engine) -> None:
        value = engine.state.output[CommonKeys.LOSS]
        finite = torch.isfinite(value.detach()).all().to(torch.int32)
        if idist.get_world_size() > 1:
            finite = idist.all_reduce(finite, op="MIN")
        if bool(finite):
            self.consecutive = 0
            return
        self.consecutive += 1
        amp = bool(getattr(engine, "amp", False)) and getattr(engine, "scaler", None) is not None
        where = f"iteration {engine.state.iteration} (epoch {engine.state.epoch})"
        local = bool(torch.isfinite(value.detach()).all())
        terms = "finite on this rank, non-finite on another" if local else self._terms(engine, value)
        if amp and self.consecutive < self.amp_patience:
            self.logger.warning(
                f"Non-finite loss at {where}: {terms}; AMP skips this step "
                f"({self.consecutive}/{self.amp_patience} consecutive before training stops)."
            )
            loss = self.loss if self.loss is not None else getattr(engine, "loss_function", None)
            last = getattr(getattr(loss, "module", loss), "last_terms", None)
            if last is not None:  # keep DTM's EMAs: this iteration observes no modality
                for t in (last.relation_gap_sum, last.prototype_gap_sum, last.modality_count):
                    t.zero_()
            return
        streak = f" in {self.consecutive} consecutive AMP iterations" if amp else ""
        msg = (
            f"Non-finite loss at {where}{streak}: {terms}. Training stopped before the optimizer step; nothing from "
            "this iteration was saved (check the inputs for NaN/inf voxels, or lower the learning rate)."
        )
        self.logger.error(msg)
        raise NonFiniteError(msg)


class FiniteCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver` that never writes a state holding NaN/inf.

    Every save (key metric, interval, final, on exception) first checks the tensors of ``save_dict``; a non-finite
    state is not written and :class:`NonFiniteError` is raised (on an exception, the exception is re-raised). After a
    :class:`NonFiniteError`, no "final" checkpoint is written on the exception event either: the state of a failed
    iteration is half-way through it, and the last interval checkpoint is the one to resume from. Nor after a data
    error or a refusal (:class:`~dmaf_components.data.DMAFDataError`, ``SystemExit``): a resume refused at its start
    would otherwise write the state it did not restore over the checkpoint it was given.

    With ``epoch_level=False`` (a checkpoint every ``save_interval`` iterations), the last iteration of an epoch is
    not saved here: its epoch-end handlers (learning-rate step, validation) have not run yet, so that the
    checkpoint would not resume exactly; the epoch-level saver saves that point after them.

    It is also a checkpointable object: :meth:`state_dict` holds the key-metric tracking (which best models were
    written, with their scores) and the attached engine's ``best_metric``/``best_metric_epoch``, so that a resumed
    training overwrites ``model.pt`` only with a better model, as the uninterrupted run would.

    Args: as :class:`~monai.handlers.CheckpointSaver`.
    """

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        super().attach(engine)

    @property
    def saved_key_metric(self) -> bool:
        """Whether a key-metric (best) checkpoint was written (in this run or before the resume)."""
        return self._key_metric_checkpoint is not None and len(self._key_metric_checkpoint._saved) > 0

    def check_finite(self, what: str) -> None:
        """Raise :class:`NonFiniteError` if the state to save holds NaN/inf."""
        bad = non_finite_entries(self.save_dict)
        if bad:
            msg = f"Refusing to save the {what} in {self.save_dir}: non-finite values in {_describe(bad)}."
            self.logger.error(msg)
            raise NonFiniteError(msg)

    def completed(self, engine: Engine) -> None:
        self.check_finite("final checkpoint")
        super().completed(engine)

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        if isinstance(e, (NonFiniteError, DMAFError, SystemExit)) or non_finite_entries(self.save_dict):
            self.logger.error(f"Not saving a final checkpoint after this exception: {e}")
            raise e
        super().exception_raised(engine, e)

    def metrics_completed(self, engine: Engine) -> None:
        self.check_finite("best model")
        super().metrics_completed(engine)

    def interval_completed(self, engine: Engine) -> None:
        length = engine.state.epoch_length
        if not self.epoch_level and length and engine.state.iteration % length == 0:
            return  # the epoch-level checkpoint, after the epoch-end handlers, covers this point
        self.check_finite("checkpoint")
        super().interval_completed(engine)

    def state_dict(self) -> dict[str, Any]:
        """Key-metric tracking and the engine's best metric (for resuming)."""
        saved = [] if self._key_metric_checkpoint is None else self._key_metric_checkpoint._saved
        state = getattr(getattr(self, "_engine", None), "state", None)
        return {
            "saved": [(float(item.priority), str(item.filename)) for item in saved],
            "best_metric": float(getattr(state, "best_metric", -1)),
            "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1)),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` returned (also accepts MONAI's key-metric ``{"_saved": ...}`` form)."""
        if "saved" not in state_dict:
            super().load_state_dict(state_dict)
            return
        if self._key_metric_checkpoint is not None:
            self._key_metric_checkpoint.load_state_dict({"_saved": [tuple(i) for i in state_dict["saved"]]})
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.state.best_metric = float(state_dict["best_metric"])
            engine.state.best_metric_epoch = int(state_dict["best_metric_epoch"])


class FinalModelFallback:
    """At the end of training, write the final weights as the model file when validation never saved a best one.

    A short training (``max_epochs`` < ``val_interval``) would otherwise end without a model to evaluate or infer
    with. The log says which model the file holds. The weights are checked to be finite and written atomically
    (:func:`~dmaf_components.outputs.atomic_write`); only rank 0 writes under DDP.

    Args:
        model_saver: the validation's :class:`FiniteCheckpointSaver` (``save_key_metric=True``).
        network: the trained network (a DDP wrapper is unwrapped).
        filepath: the model file, e.g. ``models/model.pt`` (the saver's ``key_metric_filename`` in its folder).
        name: logger name; default: the engine's logger.
    """

    def __init__(self, model_saver: FiniteCheckpointSaver, network: nn.Module, filepath: str, name: str | None = None):
        self.model_saver = model_saver
        self.network = network
        self.filepath = filepath
        self.logger = logging.getLogger(name)
        self._name = name

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        if self.model_saver.saved_key_metric:
            state = self.model_saver.state_dict()
            self.logger.info(
                f"{self.filepath} holds the best model by validation "
                f"(metric {state['best_metric']:.4f} at epoch {state['best_metric_epoch']})."
            )
            return
        bad = non_finite_entries({"model": self.network})
        if bad:
            msg = f"Refusing to save the final weights as {self.filepath}: non-finite values in {_describe(bad)}."
            self.logger.error(msg)
            raise NonFiniteError(msg)
        state = _state_of(self.network)
        atomic_write(self.filepath, lambda f: torch.save(state, f), binary=True, what="the final weights")
        self.logger.info(
            f"No validation ran in this training: {self.filepath} holds the final weights "
            f"(epoch {engine.state.epoch}, iteration {engine.state.iteration})."
        )


class OneLineExit:
    """Ends a training with one line, and no traceback, when it fails on bad data or a refused setting.

    Attached to ``Events.EXCEPTION_RAISED``; list it first among the trainer's handlers, as Ignite stops at the
    first exception handler that raises. For a failure that :func:`one_line_message` describes in one line (a data
    error of the loader, a non-finite loss, a refused resume), the line is logged as an error and
    :class:`~dmaf_components.errors.BundleExit` raised: exit status 1 and the line as the last line of the
    output. Any other exception is left to the next exception handlers (MONAI's ``StatsHandler`` logs its traceback
    and re-raises it), or re-raised here when there is none.

    Args:
        name: logger name; default: the engine's logger.
    """

    def __init__(self, name: str | None = None) -> None:
        self.logger = logging.getLogger(name)
        self._name = name

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, e: BaseException) -> None:
        from ignite.engine import Events

        if isinstance(e, BundleExit):
            raise e  # (Ignite hands an exception to its handlers once per loop level: it is logged already)
        message = one_line_message(e)
        if message is not None:
            if not isinstance(e, NonFiniteError):  # (which its handler has logged)
                self.logger.error(message)
            raise BundleExit(message) from None
        if len(getattr(engine, "_event_handlers", {}).get(Events.EXCEPTION_RAISED, ())) <= 1:
            raise e


def _is_loader(handler: Any) -> bool:
    parent = getattr(handler, "_parent", None)  # (Ignite wraps filtered handlers)
    return isinstance(parent() if callable(parent) else handler, CheckpointLoader)


class TrainingPreflight:
    """Checks of a training's settings and output folder, before anything is trained or written.

    - ``max_epochs`` must be a whole number >= 1;
    - ``ckpt_dir`` must not hold the ``.pt`` files (``model.pt``, ``checkpoint_*.pt``) of an earlier training, which
      this one would replace (MONAI's default), unless ``overwrite`` is true, ``resume_from`` names the checkpoint to
      continue, or another ``CheckpointLoader`` attached to the trainer starts it from a checkpoint (MONAI Label's
      train task, which fine-tunes ``models/model.pt`` and writes the result back there).

    A refusal is :class:`~dmaf_components.errors.BundleExit`: exit status 1 and one line, nothing written.
    :meth:`check` runs the checks when the bundle's ``initialize`` calls it (before the data is read and cached); the
    output folder is checked there only in a ``python -m monai.bundle`` process, as a program that creates the
    workflow itself may add its own loader. :meth:`attach` (the trainer's handlers: every process, DDP included)
    runs them all again when the trainer is built, where the other loaders are known.

    Args:
        ckpt_dir: the folder the training writes its model and checkpoints to (the bundle's ``ckpt_dir``).
        resume_from: the checkpoint the training continues from, if any.
        overwrite: replace the files of an earlier training (``true``/``false``, any case, or a bool).
        max_epochs: the number of epochs to train to; None: not checked.
        name: logger name; default: the engine's logger.
    """

    def __init__(
        self,
        ckpt_dir: str,
        resume_from: str | None = "",
        overwrite: bool | str = False,
        max_epochs: Any = None,
        name: str | None = None,
    ) -> None:
        self.ckpt_dir = os.fspath(ckpt_dir)
        self.resume_from = resume_from or ""
        self.overwrite = overwrite
        self.max_epochs = max_epochs
        self.logger = logging.getLogger(name)
        self._name = name

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        if self._name is None:
            self.logger = engine.logger
        loaders = [h for h, _, _ in getattr(engine, "_event_handlers", {}).get(Events.STARTED, ()) if _is_loader(h)]
        self.check(output=True, loader=bool(loaders))

    def check(self, output: bool | None = None, loader: bool | None = None) -> None:
        """Run the checks; raise :class:`~dmaf_components.errors.BundleExit` with one line at the first refusal.

        Args:
            output: check the output folder; None: only in a ``python -m monai.bundle`` process.
            loader: whether the trainer starts from a checkpoint through a ``CheckpointLoader`` of its own; None: not
                known yet (the files an allowed run will replace are then listed later, by :meth:`attach`).
        """
        from ..bundle_args import is_bundle_command_line

        try:
            overwrite = as_bool(self.overwrite, "overwrite")
        except DMAFError as exc:
            raise BundleExit(str(exc)) from None
        epochs = self.max_epochs
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
            raise BundleExit(
                f"epochs: expected a whole number of epochs >= 1 (--epochs; --max_epochs is its old name), "
                f"got {epochs!r}"
            )
        if output is None:
            output = is_bundle_command_line()
        if not output or self.resume_from or not os.path.isdir(self.ckpt_dir):
            return
        found = sorted(f for f in os.listdir(self.ckpt_dir) if f.endswith(".pt"))
        if not found:
            return
        if overwrite or loader:
            if loader is None:
                return
            why = "--overwrite true" if overwrite else "this training starts from a checkpoint (a CheckpointLoader)"
            self.logger.warning(
                f"ckpt_dir {self.ckpt_dir}: {why}: the files of the earlier training ({', '.join(found)}) are replaced "
                "as this training writes its own; those it does not write stay."
            )
            return
        checkpoints = sorted(
            (f for f in found if f.startswith("checkpoint_")),
            key=lambda f: os.path.getmtime(os.path.join(self.ckpt_dir, f)),
        )
        resume = ""
        if checkpoints:
            resume = f", --resume_from {os.path.join(self.ckpt_dir, checkpoints[-1])} to continue that training"
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise BundleExit(
            f"ckpt_dir {self.ckpt_dir}: holds {len(found)} file(s) of an earlier training ({shown}); they are kept: "
            f"pass --overwrite true to replace them{resume}, or choose another --bundle_root"
        )
