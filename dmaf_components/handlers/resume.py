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
"""Exact resume: random state in the checkpoint, sample order and augmentation draws that depend on the epoch only.

A training resumed from a checkpoint continues bitwise as the uninterrupted run would have (on the same machine and
software), from the end of an epoch or from any iteration, with any number of loader workers:

- :class:`ResumableSampler` orders an epoch's samples from ``(seed, epoch)`` alone, draws one augmentation seed per
  sample from the same generator, and can skip the samples of an epoch that were already trained on;
- :class:`SeededDataset` re-seeds the random transforms with the sample's seed before each sample, so that the draws
  of a sample depend neither on the samples before it nor on the worker that loads it;
- :class:`RandomStateHandler` checkpoints the global generators (torch CPU/CUDA, numpy, python) and tells the sampler
  the epoch and where in it training resumes;
- :class:`ResumeCheckpointLoader` loads the checkpoint, refuses one that does not fit the run, makes the learning
  rate follow a changed ``max_epochs`` or ``learning_rate``, and says where training resumes.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Mapping, Sized
from typing import TYPE_CHECKING, Any

import ignite.distributed as idist
import numpy as np
import torch
from monai.data.utils import set_rnd
from monai.handlers import CheckpointLoader
from monai.utils import MAX_SEED
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import Dataset, Sampler

from ..checkpoints import _first_line, check_state_fits, read_checkpoint
from ..errors import DMAFCheckpointError, DMAFError

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["ResumableSampler", "SeededDataset", "RandomStateHandler", "ResumeCheckpointLoader"]


class ResumableSampler(Sampler):
    """Shuffling sampler whose epoch order is a function of ``(seed, epoch)``, resumable in the middle of an epoch.

    It yields ``(index, sample_seed)`` pairs, for a :class:`SeededDataset`. Like ``DistributedSampler``, it splits
    each epoch among ``num_replicas`` ranks (padding with the first samples when ``even_divisible``). The epoch is set
    by :meth:`set_epoch` (a :class:`RandomStateHandler` does it at every ``EPOCH_STARTED``); :meth:`set_start` makes
    the next iteration over the sampler skip the first samples of this rank's share of the epoch, without loading
    them, and ``len()`` stays the full share, so that the loader's epoch length does not change.

    Args:
        dataset: the dataset (only its length is used).
        shuffle: permute the samples of each epoch.
        seed: base seed of the permutation and of the per-sample seeds.
        num_replicas: number of ranks; default: the distributed world size (1 without DDP).
        rank: this rank; default: the distributed rank.
        even_divisible: pad every rank's share to the same length (as ``DistributedSampler``); otherwise the first
            ranks get one sample more.
    """

    def __init__(
        self,
        dataset: Sized,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        even_divisible: bool = True,
    ) -> None:
        self.size = len(dataset)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = idist.get_world_size() if num_replicas is None else int(num_replicas)
        self.rank = idist.get_rank() if rank is None else int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in [0, {self.num_replicas}).")
        self.even_divisible = even_divisible
        if even_divisible:
            self.num_samples = math.ceil(self.size / self.num_replicas)
        else:
            self.num_samples = len(range(self.rank, self.size, self.num_replicas))
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration yields."""
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's share in the next iteration (only)."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}.")
        self.start = int(start)

    def epoch_items(self) -> list[tuple[int, int]]:
        """This rank's ``(index, sample_seed)`` pairs of the current epoch, none skipped."""
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + self.epoch) % MAX_SEED)
        order = torch.randperm(self.size, generator=g).tolist() if self.shuffle else list(range(self.size))
        seeds = torch.randint(0, MAX_SEED, (self.size,), generator=g, dtype=torch.int64).tolist()
        if self.even_divisible and self.size:
            total = self.num_samples * self.num_replicas
            order = (order * math.ceil(total / self.size))[:total]
        mine = order[self.rank :: self.num_replicas]
        return [(i, seeds[i]) for i in mine]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self.start = self.start, 0
        return iter(self.epoch_items()[start:])

    def __len__(self) -> int:
        return self.num_samples


class SeededDataset(Dataset):
    """A dataset whose random transforms are re-seeded with each sample's own seed before the sample is made.

    Indexed by the ``(index, sample_seed)`` pairs of a :class:`ResumableSampler` (a plain ``index`` leaves the
    transforms' random state as it is). The random transforms are those reachable from ``dataset.transform`` (a MONAI
    ``Compose`` re-seeds each of its randomizable transforms from the seed), else from the dataset's attributes, as
    MONAI's ``worker_init_fn`` finds them. A sample's augmentation then depends only on its seed: the same in the
    main process and in any loader worker, before and after a resume.

    Args:
        dataset: a map-style dataset, e.g. a MONAI ``CacheDataset`` with random transforms.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, tuple) and len(item) == 2:
            index, seed = item
            transform = getattr(self.dataset, "transform", None)
            set_rnd(transform if hasattr(transform, "set_random_state") else self.dataset, int(seed))
            return self.dataset[index]
        return self.dataset[item]


def _cpu(t: Any) -> torch.Tensor:
    return torch.as_tensor(t).detach().cpu()


class RandomStateHandler:
    """Checkpointable random state of a training, and the epoch/position of a :class:`ResumableSampler`.

    :meth:`state_dict` holds the global generators: torch (CPU, and every CUDA device when CUDA is initialised),
    numpy and python ``random``, as tensors (loadable with ``torch.load(weights_only=True)``). Put the handler in the
    checkpoint (``training_state``); :meth:`load_state_dict` restores them when the checkpoint is loaded (at
    ``Events.STARTED``). Under DDP the checkpoint holds rank 0's state, which every rank restores.

    Attached to the trainer, at every ``EPOCH_STARTED`` it sets the sampler's epoch and, for the first epoch of a run
    resumed from a mid-epoch checkpoint, the number of samples of that epoch already trained on, which the sampler
    skips (Ignite runs the rest of the epoch's iterations only). For a bitwise exact resume, nothing else may draw
    from the global generators between the checkpoint and the next forward: give the loader its own ``generator``
    (its worker seeds are then not drawn from torch's global generator) and use a :class:`SeededDataset`.

    Args:
        sampler: the training loader's sampler; default: the engine's ``data_loader.sampler`` if it is a
            :class:`ResumableSampler`.
        name: logger name; default: the engine's logger.
    """

    def __init__(self, sampler: ResumableSampler | None = None, name: str | None = None) -> None:
        self.sampler = sampler
        self.logger = logging.getLogger(name)
        self._name = name

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        if self._name is None:
            self.logger = engine.logger
        if self.sampler is None:
            sampler = getattr(getattr(engine, "data_loader", None), "sampler", None)
            self.sampler = sampler if isinstance(sampler, ResumableSampler) else None
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)

    def epoch_started(self, engine: Engine) -> None:
        """Tell the sampler the epoch, and how many of its samples were trained on before a mid-epoch resume."""
        if self.sampler is None:
            return
        epoch = engine.state.epoch
        self.sampler.set_epoch(epoch)
        length = engine.state.epoch_length
        done = engine.state.iteration - (epoch - 1) * length if length else 0
        if done > 0:
            batch_size = getattr(getattr(engine, "data_loader", None), "batch_size", None) or 1
            self.sampler.set_start(min(done * batch_size, len(self.sampler)))
            self.logger.info(f"Epoch {epoch}: skipping the {done} of {length} iterations done before the resume.")

    def state_dict(self) -> dict[str, Any]:
        """The global random state, as tensors."""
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "numpy_pos": int(pos),
            "numpy_gauss": (int(has_gauss), float(gauss)),
            "python": torch.tensor(internal, dtype=torch.int64),
            "python_gauss": gauss_next,
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the global random state saved by :meth:`state_dict` (tensors may come on any device)."""
        torch.set_rng_state(_cpu(state["torch"]).to(torch.uint8))
        keys = _cpu(state["numpy_keys"]).numpy().astype(np.uint32)
        has_gauss, gauss = state["numpy_gauss"]
        np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), int(has_gauss), float(gauss)))
        internal = tuple(int(v) for v in _cpu(state["python"]).tolist())
        random.setstate((3, internal, state["python_gauss"]))
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([_cpu(s).to(torch.uint8) for s in cuda])
            else:
                self.logger.warning(
                    f"The checkpoint has the CUDA random state of {len(cuda)} devices, this machine "
                    f"{torch.cuda.device_count()}: CUDA random state not restored."
                )


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI's :class:`~monai.handlers.CheckpointLoader` that checks the checkpoint against the run, follows a changed
    schedule, tells where training resumes, and loads older checkpoints.

    Before anything is restored, the checkpoint is compared with the run; each refusal is one
    :class:`~dmaf_components.errors.DMAFCheckpointError` line naming the file (with
    :class:`~dmaf_components.handlers.reliability.OneLineExit` attached, the run's last line):

    - a file that is missing, truncated or not a PyTorch file, or that holds no training state (e.g. the plain
      weights of ``models/model.pt``);
    - weights of other hyper-parameters than the network's (``--channels``, ``--modalities``...: the fields that
      differ and the override that fits, as :func:`~dmaf_components.checkpoints.check_state_fits`);
    - epochs of another length (another datalist, ``batch_size`` or number of processes): the position in the epoch
      could not be restored;
    - a ``max_epochs`` below the epochs the checkpoint has already trained;
    - any other state that does not load (e.g. an optimizer of other parameter groups: ``--learn_alpha1``).

    A learning-rate scheduler's ``total_iters`` and ``base_lrs`` and an optimizer's ``weight_decay`` are settings of
    the run (``max_epochs``, ``learning_rate``, ``weight_decay``): where the checkpoint's differ from the run's, the
    run's are kept and the rate is recomputed for the epoch reached with the scheduler's closed form (PolynomialLR:
    ``learning_rate * (1 - epoch / max_epochs) ** power``), so that a finished run resumed with a larger
    ``max_epochs`` trains on at a non-zero rate instead of the 0.0 its stored schedule ended at. A scheduler without
    a closed form refuses such a change. Each change is logged. Unchanged settings are left exactly as restored.

    After restoring, it logs one line: the checkpoint, the epoch and iteration it was saved at and the next ones
    (Ignite's own "resuming from iteration 0, epoch 0" line is printed before the checkpoint is read). Objects of
    ``load_dict`` that the checkpoint lacks (a checkpoint written before they were added, e.g. the random state) are
    skipped with a warning that the resume is then not exact.

    Args: as :class:`~monai.handlers.CheckpointLoader`.
    """

    def _check(self, engine: Engine, checkpoint: Any) -> None:
        """Refuse, with one line, a checkpoint that does not fit the run (before anything is restored)."""
        path, full = self.load_path, self.load_dict
        if not isinstance(checkpoint, Mapping) or not any(k in checkpoint for k in full):
            if (
                isinstance(checkpoint, Mapping)
                and checkpoint
                and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
            ):
                what = f"network weights only ({len(checkpoint)} tensors, as models/model.pt)"
            elif isinstance(checkpoint, Mapping):
                what = f"keys {sorted(map(str, checkpoint))[:8]}"
            else:
                what = f"a {type(checkpoint).__name__}"
            raise DMAFCheckpointError(
                f"{path}: not a training checkpoint: it holds {what}; --resume_from takes a models/checkpoint_*.pt, "
                f"which holds {', '.join(full)}"
            )
        for key, obj in full.items():
            state = checkpoint.get(key)
            if isinstance(obj, nn.Module) and isinstance(state, Mapping) and state:
                check_state_fits(obj, state, path if key == next(iter(full)) else f"{path} ({key})")
        trainer = next((checkpoint.get(k) for k, v in full.items() if v is engine), None)
        if not isinstance(trainer, Mapping):
            return
        length, now = trainer.get("epoch_length"), engine.state.epoch_length
        if length and now and int(length) != int(now):
            raise DMAFCheckpointError(
                f"{path}: its epochs have {int(length)} iterations, this run's {int(now)} (another datalist, "
                "batch_size or number of processes): the position in the epoch cannot be restored; resume with the "
                "settings the checkpoint was trained with"
            )
        iteration, max_epochs = int(trainer.get("iteration", 0)), engine.state.max_epochs
        epoch = iteration // int(length) if length else int(trainer.get("epoch", 0))
        if max_epochs is not None and epoch > max_epochs:
            raise DMAFCheckpointError(
                f"{path}: epochs {max_epochs} is below the {epoch} epochs the checkpoint has trained "
                f"(epochs {trainer.get('max_epochs')} when it was saved); pass --epochs {epoch + 1} or more to train on"
            )
        if max_epochs is not None and epoch == max_epochs and length and iteration % int(length) == 0:
            self.logger.warning(
                f"{path} has trained all {max_epochs} epochs: nothing is left to train (pass a larger "
                "--epochs to train on)."
            )

    def _settings(self) -> dict[str, Any]:
        """The run's schedule settings held by the objects of ``load_dict`` (before the checkpoint replaces them)."""
        settings: dict[str, Any] = {}
        for key, obj in self.load_dict.items():
            if isinstance(obj, LRScheduler):
                settings[key] = {"total_iters": getattr(obj, "total_iters", None), "base_lrs": list(obj.base_lrs)}
            elif isinstance(obj, Optimizer):
                settings[key] = {"weight_decay": [g.get("weight_decay") for g in obj.param_groups]}
        return settings

    def _follow(self, before: dict[str, Any]) -> None:
        """Keep the run's schedule settings where the restored ones differ, and recompute the learning rate."""
        path = self.load_path
        for key, old in before.items():
            obj = self.load_dict[key]
            if isinstance(obj, Optimizer):
                for group, decay in zip(obj.param_groups, old["weight_decay"]):
                    if decay is not None and group.get("weight_decay") != decay:
                        self.logger.info(
                            f"Resume: weight_decay {group.get('weight_decay')} in the checkpoint, {decay} "
                            "now: training continues with the new value."
                        )
                        group["weight_decay"] = decay
                continue
            changes = []
            if old["total_iters"] is not None and obj.total_iters != old["total_iters"]:  # type: ignore[attr-defined]
                changes.append(("epochs", obj.total_iters, old["total_iters"]))  # type: ignore[attr-defined]
                obj.total_iters = old["total_iters"]  # type: ignore[attr-defined]
            if list(obj.base_lrs) != old["base_lrs"]:
                changes.append(("learning_rate", _short(obj.base_lrs), _short(old["base_lrs"])))
                obj.base_lrs = list(old["base_lrs"])
                for group, lr in zip(obj.optimizer.param_groups, old["base_lrs"]):
                    group["initial_lr"] = lr
            if not changes:
                continue
            what = "; ".join(f"{name} {a} in the checkpoint, {b} now" for name, a, b in changes)
            closed = getattr(obj, "_get_closed_form_lr", None)
            if closed is None:
                first = changes[0]
                raise DMAFCheckpointError(
                    f"{path}: {what}: {type(obj).__name__} cannot recompute its rate for the new setting; resume with "
                    f"--{first[0]} {first[1]}"
                )
            for group, lr in zip(obj.optimizer.param_groups, closed()):
                group["lr"] = lr
            obj._last_lr = [group["lr"] for group in obj.optimizer.param_groups]
            self.logger.info(
                f"Resume: {what}: the learning-rate schedule ({type(obj).__name__}) follows the new settings; "
                f"learning rate {_short(obj._last_lr)} from epoch {obj.last_epoch + 1}."
            )

    def __call__(self, engine: Engine) -> None:
        checkpoint = read_checkpoint(self.load_path, map_location="cpu", mmap=True)  # keys and shapes only
        full = self.load_dict
        if len(full) > 1:  # (a single object may be loaded from a plain state dict, as MONAI does)
            self._check(engine, checkpoint)
            missing = [k for k in full if k not in checkpoint]
            if missing:
                self.logger.warning(
                    f"{self.load_path} has no {', '.join(missing)}: those are not restored and the resume is not "
                    "exact (a checkpoint written by an older version)."
                )
                self.load_dict = {k: v for k, v in full.items() if k in checkpoint}
        before = self._settings()
        try:
            super().__call__(engine)
        except DMAFError:
            raise
        except Exception as exc:  # an optimizer of other parameter groups, a loss of other terms...
            raise DMAFCheckpointError(
                f"{self.load_path}: the training state does not fit this run ({_first_line(exc)}); resume with the "
                "settings the checkpoint was trained with"
            ) from None
        finally:
            self.load_dict = full
        self._follow(before)
        state = engine.state
        length = state.epoch_length or 0
        mid = (
            f", {state.iteration - state.epoch * length} iterations into epoch {state.epoch + 1}"
            if length and (state.iteration % length)
            else ""
        )
        self.logger.info(
            f"Resumed from checkpoint {self.load_path} at epoch {state.epoch}, iteration {state.iteration}{mid}: "
            f"training continues with iteration {state.iteration + 1} until epoch {state.max_epochs}."
        )


def _short(values: Any) -> str:
    """``[0.0002, 0.0002]`` as ``0.0002``; several different values as a list (4 significant digits)."""
    values = [float(v) for v in values]
    shown = [f"{v:.4g}" for v in values]
    return shown[0] if len(set(shown)) == 1 else "[" + ", ".join(shown) + "]"
