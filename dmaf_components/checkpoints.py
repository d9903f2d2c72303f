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
"""Loading network weights from a plain state dict, a training checkpoint or an exported TorchScript file, with
one-line errors.

A TorchScript file (``models/model.ts``, written by ``monai.bundle ckpt_export``) keeps the network's parameter names,
so its weights load into the eager network like a state dict: a bundle that ships only ``model.ts`` runs inference
with ``--checkpoint models/model.ts``, and every inference option (weight maps, uncertainty from the modalities' own
decoders) keeps working. :func:`weights_sha256` fingerprints the weights themselves, so that the same weights in
either file are recognised as one model.

A checkpoint that does not fit the network is described by the architecture read from its tensor shapes (number of
modalities, channels per level, fusion, transformer layers, token grid), so that the message says which bundle
override makes the network fit, instead of listing thousands of size mismatches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import DMAFCheckpointError

__all__ = [
    "load_model_weights",
    "read_checkpoint",
    "read_state_dict",
    "is_torchscript",
    "weights_sha256",
    "check_state_fits",
    "describe_architecture",
    "MODEL_KEYS",
]

logger = logging.getLogger(__name__)

#: keys under which a training checkpoint keeps the network's state dict (the bundle's CheckpointSaver: ``model``)
MODEL_KEYS = ("model", "state_dict", "network")
#: architecture fields read from a state dict -> the bundle override that sets them
_OVERRIDES = {
    "modalities": "--modalities",
    "spatial_dims": "--spatial_dims",
    "channels": "--channels",
    "fusion": "--fusion",
    "num_layers": "--num_layers",
    "token_grid": "--token_grid",
    "out_channels": "--label_values",
}


def _first_line(exc: BaseException) -> str:
    """The exception's type and first sentence."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0].strip().split('. ')[0]}" if lines else type(exc).__name__


def _is_torn_zip(path: str) -> bool:
    """Whether ``path`` starts as a zip file (the format of ``torch.save``) but lacks the zip's end (truncated)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        return head == b"PK\x03\x04" and not zipfile.is_zipfile(path)
    except OSError:
        return False


def read_checkpoint(path: str, map_location: Any = None, mmap: bool = False) -> Any:
    """What the PyTorch file ``path`` holds, read with ``torch.load(weights_only=True)`` as MONAI does.

    Args:
        path: a ``.pt`` file.
        map_location: passed to ``torch.load``.
        mmap: map the file instead of reading it (to look at its keys and shapes only).

    Raises:
        DMAFCheckpointError: one line naming the file: not found, a folder, empty, truncated or not a PyTorch file, or
            holding objects other than tensors.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DMAFCheckpointError(f"{path}: checkpoint not found")
    if os.path.isdir(path):
        raise DMAFCheckpointError(f"{path}: checkpoint is a folder, expected a .pt file")
    if os.path.getsize(path) == 0:
        raise DMAFCheckpointError(f"{path}: checkpoint is empty (0 bytes)")
    try:  # (only a complete zip-format file can be mapped; any other is read, and its fault reported)
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # zip reader, unpickler and weights-only refusals
        text = str(exc)
        torn = "failed finding central directory" in text or "failed reading" in text or isinstance(exc, EOFError)
        if torn or _is_torn_zip(path):
            raise DMAFCheckpointError(f"{path}: checkpoint is truncated or corrupt ({_first_line(exc)})") from None
        if "Weights only load failed" in text and "Unsupported global" in text:
            raise DMAFCheckpointError(
                f"{path}: checkpoint holds Python objects other than tensors; refused by torch.load(weights_only=True)"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        detail = f"unpickling failed: {reason.group(1).strip()}" if reason else _first_line(exc)
        raise DMAFCheckpointError(f"{path}: not a PyTorch checkpoint ({detail})") from None


def is_torchscript(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``): a zip file with compiled code and constants,
    which ``torch.save`` files do not have."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _torchscript_state(path: str, map_location: Any = None) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the TorchScript module in ``path``, under their eager names."""
    try:
        module = torch.jit.load(path, map_location=map_location)
    except Exception as exc:  # a torn archive, code of another torch version
        raise DMAFCheckpointError(f"{path}: TorchScript file cannot be loaded ({_first_line(exc)})") from None
    return {str(k): v.detach() for k, v in module.state_dict().items()}


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 of a state dict's names, dtypes, shapes and values, in name order: the same for the same weights
    in a ``.pt`` state dict, a training checkpoint or a TorchScript export."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().resolve_conj().resolve_neg().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_state_dict(path: str, map_location: Any = None) -> dict[str, torch.Tensor]:
    """The network state dict held by ``path``: a plain state dict (``models/model.pt``), a training checkpoint, or
    a TorchScript export (``models/model.ts``).

    A training checkpoint is a dict with the state dict under one of :data:`MODEL_KEYS` (the bundle's
    ``CheckpointSaver`` writes ``{"model", "optimizer", "trainer", ...}``). The file is read with
    :func:`read_checkpoint`, a TorchScript file with ``torch.jit.load``. A ``module.`` prefix (a DDP-wrapped network)
    is removed.

    Raises:
        DMAFCheckpointError: one line naming the file: as :func:`read_checkpoint`, a TorchScript file that cannot be
            loaded, or a file holding no state dict.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and is_torchscript(path):
        return _torchscript_state(path, map_location)
    obj = read_checkpoint(path, map_location)
    state = obj
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        key = next((k for k in MODEL_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise DMAFCheckpointError(
                f"{path}: holds a dict without network weights (keys {sorted(map(str, obj))[:8]}; expected a state "
                f"dict or a training checkpoint with a {'/'.join(MODEL_KEYS)} entry)"
            )
        state = obj[key]
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        raise DMAFCheckpointError(f"{path}: holds a {type(obj).__name__}, not network weights (a state dict)")
    return {re.sub(r"^module\.", "", str(k)): v for k, v in state.items()}


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def describe_architecture(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The DMAF-Net hyper-parameters that a state dict's names and shapes determine (absent when undetermined).

    ``modalities`` (number of modality encoders), ``spatial_dims``, ``channels`` (per level), ``fusion``
    (dmaf/concat/mean), ``num_layers`` (transformer layers per DMAF fusion), ``token_grid`` and ``out_channels``.
    The number of attention heads leaves no trace in the shapes.
    """
    info: dict[str, Any] = {}
    encoders = {int(m.group(1)) for k in state if (m := re.match(r"encoders\.(\d+)\.", k))}
    if encoders:
        info["modalities"] = max(encoders) + 1
    levels = {}
    for k, v in state.items():
        m = re.match(r"encoders\.0\.stages\.(\d+)\.entry\.conv\.weight$", k)
        if m:
            levels[int(m.group(1))] = v
    if levels:
        info["channels"] = [int(levels[i].shape[0]) for i in sorted(levels)]
        info["spatial_dims"] = int(levels[min(levels)].ndim) - 2
    if any(k.startswith("fusions.") for k in state):
        layers = {int(m.group(1)) for k in state if (m := re.match(r"fusions\.0\.layers\.(\d+)\.", k))}
        info["fusion"] = "dmaf" if layers else "concat"
        if layers:
            info["num_layers"] = max(layers) + 1
        pos = state.get("fusions.0.pos_embed")
        if pos is not None:
            info["token_grid"] = [int(s) for s in pos.shape[2:]]
    elif encoders:
        info["fusion"] = "mean"
    outs = [v for k, v in state.items() if k.startswith("fusion_decoder.") and k.endswith("weight") and v.ndim > 2]
    if outs:
        info["out_channels"] = int(outs[-1].shape[0])
    return info


def _format(value: Any) -> str:
    return "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, (list, tuple)) else str(value)


def _mismatch(path: str, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """One line saying how a state dict differs from the network's."""
    names, want = set(state), set(expected)
    if not names & want:
        example = next(iter(state))
        return (
            f"{path}: not a weight file of this network (none of its {len(state)} tensor names matches; e.g. "
            f"'{example}')"
        )
    ours, theirs = describe_architecture(expected), describe_architecture(state)
    diffs = [f for f in _OVERRIDES if f in ours and f in theirs and ours[f] != theirs[f]]
    if diffs:
        what = "; ".join(
            f"{f} {_format(theirs[f])} in the checkpoint vs {_format(ours[f])} in the network" for f in diffs
        )
        fixes = []
        for f in diffs:
            if f == "modalities":
                fixes.append(f"--modalities listing {theirs[f]} modalities")
            elif f == "out_channels":
                fixes.append(f"--label_values listing {theirs[f]} values")
            else:
                value = _format(theirs[f])
                fixes.append(f'{_OVERRIDES[f]} "{value}"' if value.startswith("[") else f"{_OVERRIDES[f]} {value}")
        return f"{path}: checkpoint does not fit the network: {what}; run with {' '.join(fixes)}"
    missing, unexpected = sorted(want - names), sorted(names - want)
    shapes = [k for k in sorted(names & want) if tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} network tensor(s) missing (e.g. '{missing[0]}')")
    if unexpected:
        parts.append(f"{len(unexpected)} unknown tensor(s) (e.g. '{unexpected[0]}')")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of other shape (e.g. '{k}' {tuple(state[k].shape)} vs {tuple(expected[k].shape)})")
    return f"{path}: checkpoint does not fit the network: {'; '.join(parts)}"


def check_state_fits(network: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    """Raise a one-line :class:`DMAFCheckpointError` unless ``state`` has exactly the tensor names and shapes of
    ``network``'s state dict (a DDP/DataParallel wrapper is looked through; a ``module.`` prefix is removed).

    The line names ``path`` and, for a DMAF-Net of other hyper-parameters, the fields that differ and the bundle
    override that makes the network fit (e.g. ``channels [8,16,32,64,128] in the checkpoint vs [4,8,16,32] in the
    network; run with --channels "[8,16,32,64,128]"``).
    """
    module = network.module if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else network
    state = {re.sub(r"^module\.", "", str(k)): v for k, v in state.items()}
    expected = module.state_dict()
    fits = set(state) == set(expected) and all(tuple(state[k].shape) == tuple(expected[k].shape) for k in expected)
    if not fits:
        raise DMAFCheckpointError(_mismatch(path, state, expected))


def load_model_weights(network: nn.Module, path: str, map_location: Any = None) -> nn.Module:
    """Load ``path`` into ``network`` strictly: a plain state dict or a training checkpoint (``{"model": ...}``).

    Args:
        network: the network (e.g. the bundle's ``@network``); a DDP/DataParallel wrapper is looked through.
        path: ``models/model.pt`` (state dict), ``models/checkpoint_*.pt`` (the bundle's ``CheckpointSaver``) or
            ``models/model.ts`` (``ckpt_export``'s TorchScript file).
        map_location: passed to ``torch.load`` (e.g. the bundle's ``@device``).

    Returns:
        the network, with the weights loaded.

    Raises:
        DMAFCheckpointError: one line naming the file: missing, truncated or foreign file (:func:`read_state_dict`);
            non-finite weights; weights of another architecture, saying which fields differ (channels, number of
            modalities, fusion, layers, token grid, classes) and the override that makes the network fit.
    """
    module = network.module if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else network
    state = read_state_dict(path, map_location)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise DMAFCheckpointError(f"{path}: {len(bad)} of {len(state)} tensors hold NaN/inf values (e.g. '{bad[0]}')")
    check_state_fits(module, state, path)
    module.load_state_dict(state, strict=True)
    logger.info(f"loaded {len(state)} tensors from {path}")
    return network
