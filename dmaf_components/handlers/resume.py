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
- :class:`ResumeCheckpointLoader` loads the checkpoint and says where training resumes.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sized
from typing import TYPE_CHECKING, Any

import ignite.distributed as idist
import numpy as np
import torch
from monai.data.utils import set_rnd
from monai.handlers import CheckpointLoader
from monai.utils import MAX_SEED
from torch.utils.data import Dataset, Sampler

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
    """MONAI's :class:`~monai.handlers.CheckpointLoader` that tells where training resumes, and loads older
    checkpoints.

    After restoring, it logs one line: the checkpoint, the epoch and iteration it was saved at and the next ones
    (Ignite's own "resuming from iteration 0, epoch 0" line is printed before the checkpoint is read). Objects of
    ``load_dict`` that the checkpoint lacks (a checkpoint written before they were added, e.g. the random state) are
    skipped with a warning that the resume is then not exact.

    Args: as :class:`~monai.handlers.CheckpointLoader`.
    """

    def __call__(self, engine: Engine) -> None:
        checkpoint = torch.load(self.load_path, map_location="cpu", weights_only=True, mmap=True)  # keys only
        full = self.load_dict
        if isinstance(checkpoint, dict) and len(full) > 1:
            missing = [k for k in full if k not in checkpoint]
            if missing:
                self.logger.warning(
                    f"{self.load_path} has no {', '.join(missing)}: those are not restored and the resume is not "
                    "exact (a checkpoint written by an older version)."
                )
                self.load_dict = {k: v for k, v in full.items() if k in checkpoint}
        try:
            super().__call__(engine)
        finally:
            self.load_dict = full
        state = engine.state
        length = state.epoch_length or 0
        mid = f", {state.iteration - state.epoch * length} iterations into epoch {state.epoch + 1}" if length and (
            state.iteration % length
        ) else ""
        self.logger.info(
            f"Resumed from checkpoint {self.load_path} at epoch {state.epoch}, iteration {state.iteration}{mid}: "
            f"training continues with iteration {state.iteration + 1} until epoch {state.max_epochs}."
        )
