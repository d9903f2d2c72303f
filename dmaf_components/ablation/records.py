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
"""A run's record and its provenance: what makes a run a study's run, the ``record.json`` it leaves, and the checks
that a study's records, and a reference study's, belong to the study.

A record holds the run's setting, seed, dataset, datalist (path and SHA-256), every bundle override, the command that
trained it, the package versions and code commit, its timings, its learning curve and its evaluation (per-combination
tables and per-case values). A record exists only when complete: it is written whole (:func:`write_json`). An
unfinished run's ``run.json`` holds its identity (:func:`run_identity`), so that a resumed run is checked too.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..bundle_args import canonical_overrides
from ..data.atomic import atomic_replace
from ..data.constants import DMAFDataError
from ..errors import DMAFRunError
from .settings import COMPONENT_KEYS, SETTINGS, setting_overrides

__all__ = [
    "RECORD",
    "STARTED",
    "file_sha256",
    "read_json",
    "read_record",
    "write_json",
    "run_identity",
    "check_identity",
    "override_diff",
    "check_one_budget",
    "reference_records",
    "validation_curve",
    "make_record",
]

#: a finished run's record, and an unfinished run's identity, in its folder
RECORD, STARTED = "record.json", "run.json"
_UNSET = "(not set)"


def file_sha256(path: str) -> str:
    """The SHA-256 of a file (a datalist: the records of one study, and of its reference, share it)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_json(path: str, what: str) -> Any:
    """A JSON file, or a one-line error naming it as ``what``."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise DMAFDataError(f"{path}: cannot read the {what} ({exc})") from None


def read_record(path: str) -> dict:
    """A run's ``record.json``, refused when it is not a record (no setting, seed or evaluation)."""
    record = read_json(path, "record")
    missing = [k for k in ("setting", "seed", "evaluation") if not isinstance(record, dict) or k not in record]
    if missing:
        raise DMAFDataError(f"{path}: not a run record (no {', '.join(missing)})")
    return record


def write_json(path: str, content: Any) -> None:
    """Write ``content`` as JSON, replacing ``path`` whole (:func:`~dmaf_components.data.atomic.atomic_replace`): a
    kill mid-write leaves the previous file or none."""
    atomic_replace(path, lambda f: json.dump(content, f, indent=1))


def run_identity(setting: str, seed: int, dataset: str, datalist_sha256: str, overrides: Mapping) -> dict:
    """What makes a run a study's run: its setting, seed, dataset, datalist (hash) and every bundle override
    (:func:`~dmaf_components.ablation.settings.run_overrides`), as JSON values."""
    return {
        "setting": setting,
        "seed": seed,
        "dataset": dataset,
        "datalist_sha256": datalist_sha256,
        "overrides": json.loads(json.dumps(dict(overrides))),
    }


def check_identity(found: Mapping, want: Mapping, path: str, advice: str, compare_overrides: bool = True) -> None:
    """Refuse a record (or an unfinished run's ``run.json``) at ``path`` whose identity differs from ``want``
    (:func:`run_identity`); fields a record of an older version does not have are not compared, nor the overrides
    unless ``compare_overrides``. ``advice`` ends the message."""
    for key in ("setting", "seed", "dataset", "datalist_sha256"):
        if key in found and not _same(found[key], want[key]):
            raise DMAFRunError(f"{path}: made with {key} {found[key]!r}, but this study asks {want[key]!r}{advice}")
    if "overrides" in found and compare_overrides:
        diff = override_diff(found["overrides"] or {}, want["overrides"])
        if diff:
            raise DMAFRunError(f"{path}: made with other overrides: {diff}{advice}")


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values, with True not equal to 1 (a bool override is not a number override)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def override_diff(had: Mapping, asked: Mapping) -> str:
    """``--key had (now asked)`` for every override that differs, or ''; a key's old name (``max_epochs``, in records
    of older versions) counts as its model-zoo name (``epochs``)."""
    show = lambda v: v if v is _UNSET else repr(v)  # noqa: E731
    had, asked = canonical_overrides(had), canonical_overrides(asked)
    return ", ".join(
        f"--{k} {show(had.get(k, _UNSET))} (now {show(asked.get(k, _UNSET))})"
        for k in sorted(set(had) | set(asked))
        if not _same(had.get(k, _UNSET), asked.get(k, _UNSET))
    )


def check_one_budget(
    records: Sequence[Mapping], record_path: Callable[[str, int], str], log: Callable[[str], None]
) -> None:
    """The records of a summary rebuilt without naming any override must agree with each other in their overrides
    beyond what their settings set (one study, one budget); the overrides they share are logged."""
    common: dict[str, Any] = {}
    for record in records:
        own = {
            k: v
            for k, v in canonical_overrides(record.get("overrides") or {}).items()
            if k not in setting_overrides(record["setting"])
        }
        if not common:
            common = {"path": record_path(record["setting"], record["seed"]), "overrides": own}
        elif override_diff(own, common["overrides"]):
            raise DMAFDataError(
                f"{record_path(record['setting'], record['seed'])}: made with other "
                f"overrides than {common['path']}: {override_diff(own, common['overrides'])}"
                "; the folder mixes studies"
            )
    if common and common["overrides"]:
        log(
            "ablation: the runs were made with "
            + " ".join(f"--{k} {json.dumps(v)}" for k, v in sorted(common["overrides"].items()))
        )


def reference_records(
    reference: str, settings: Sequence[str], seeds: Sequence[int], datalist: str, datalist_sha256: str
) -> list[dict]:
    """A reference study's records of these settings and seeds; refused when they were made on another datalist
    than ``datalist`` (their test cases would not pair)."""
    out = []
    for path in sorted(glob.glob(os.path.join(reference, "runs", "*", "seed*", RECORD))):
        record = read_json(path, "record")
        if record.get("setting") not in settings or record.get("seed") not in seeds:
            continue
        if record.get("datalist_sha256") != datalist_sha256:
            raise DMAFDataError(
                f"{path}: datalist_sha256 differs from {datalist}'s; the reference study was "
                "made on other data and cannot be paired"
            )
        out.append(record)
    return out


def validation_curve(run_dir: str) -> dict[str, Any]:
    """The learning curve a run logged: its validation mean Dice by epoch (``val_mean_dice`` in the TensorBoard
    events under ``run_dir/eval``; over several starts of a resumed run, a later start's value wins) and the
    iteration each epoch ended at.

    Returns:
        ``{"epoch": [...], "iteration": [...], "val_mean_dice": [...]}`` (empty lists without events).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dice: dict[int, float] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "events.out.tfevents.*")), key=os.path.getmtime):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        if "val_mean_dice" in acc.Tags()["scalars"]:
            dice.update({int(e.step): float(e.value) for e in acc.Scalars("val_mean_dice")})
    epochs = sorted(dice)
    per_epoch = None
    ckpts = glob.glob(os.path.join(run_dir, "models", "checkpoint_final.pt"))
    if ckpts:
        import torch

        try:
            state = torch.load(ckpts[0], map_location="cpu", weights_only=True, mmap=True)
            trainer = state.get("trainer", {}) if isinstance(state, Mapping) else {}
            per_epoch = int(trainer["epoch_length"]) if "epoch_length" in trainer else None
        except Exception:  # an unreadable checkpoint costs the iteration column, not the record
            per_epoch = None
    return {
        "epoch": epochs,
        "iteration": [e * per_epoch if per_epoch else None for e in epochs],
        "val_mean_dice": [dice[e] for e in epochs],
    }


def make_record(
    identity: Mapping,
    overrides: Mapping,
    data_dir: str,
    datalist: str,
    train_command: list[str],
    bundle_dir: str,
    environment: Mapping[str, str],
    times: Mapping[str, Any],
    run_dir: str,
    evaluation: Any,
) -> dict:
    """A finished run's record: its ``identity`` (:func:`run_identity`) with its ``overrides`` as given, the data,
    the command that trained it, its provenance (package versions, code commit, ``environment`` of its bundle
    processes), its ``times`` (``train_seconds``, ``train_resumed``, ``evaluate_seconds``), its learning curve and
    its ``evaluation``."""
    setting = identity["setting"]
    return {
        "setting": setting,
        "components": dict(zip(COMPONENT_KEYS, SETTINGS[setting])),
        "seed": identity["seed"],
        "dataset": identity["dataset"],
        "data_dir": data_dir,
        "datalist": datalist,
        "datalist_sha256": identity["datalist_sha256"],
        "overrides": dict(overrides),
        "train_command": train_command,
        "versions": _versions(),
        "code_commit": _git_commit(bundle_dir),
        "environment": dict(environment),
        "train_seconds": times["train_seconds"],  # summed over the run's processes (epochs redone after a resume)
        "train_resumed": times["train_resumed"],
        "evaluate_seconds": times["evaluate_seconds"],
        "validation": validation_curve(run_dir),
        "evaluation": evaluation,
    }


def _git_commit(path: str) -> str | None:
    """The commit of the checkout that holds the bundle, with ``+dirty`` when it has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _versions() -> dict[str, str]:
    import monai
    import torch

    from .. import __version__

    return {
        "dmaf_components": __version__,
        "monai": monai.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
