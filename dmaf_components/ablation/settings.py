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
"""The Table-3 settings, and how a setting of a study becomes the bundle overrides and arguments of a run.

A setting switches the paper's three components (DMAF fusion, distillation, DTM) on or off through bundle overrides
(:func:`setting_overrides`); a study's own overrides (a budget, a variant's option) come on top of them
(:func:`run_overrides`) and are checked against the bundle's configs before anything runs
(:func:`check_override_keys`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import DMAFConfigError

__all__ = [
    "SETTINGS",
    "COMPONENTS",
    "COMPONENT_KEYS",
    "BUNDLE_DIR",
    "DATASET_CONFIGS",
    "setting_overrides",
    "resolve_settings",
    "parse_seeds",
    "run_overrides",
    "components",
    "config_files",
    "bundle_args",
    "check_reserved_overrides",
    "check_override_keys",
]

#: Table 3's rows in the paper's order: name -> (DMAF fusion, distillation, DTM)
SETTINGS: dict[str, tuple[bool, bool, bool]] = {
    "baseline": (False, False, False),
    "dmaf": (True, False, False),
    "distill": (False, True, False),
    "dtm": (False, False, True),
    "dmaf+distill": (True, True, False),
    "dmaf+dtm": (True, False, True),
    "distill+dtm": (False, True, True),
    "full": (True, True, True),
}
#: the components of a :data:`SETTINGS` row, as the summaries name them and as records and tables key them
COMPONENTS = ("DMAF", "distillation", "DTM")
COMPONENT_KEYS = ("dmaf", "distillation", "dtm")
BUNDLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bundle")
#: the bundle's training configs of each dataset (``configs/evaluate.json`` is added to evaluate)
DATASET_CONFIGS = {
    "brats": ["configs/train.json"],
    "msd": ["configs/train.json"],
    "myops": ["configs/train.json", "configs/train_myops.json"],
}
#: what a setting sets: a study may change these only as a variant of a reference study
_SETTING_KEYS = {"fusion", "distillation", "dtm_reweight", "dtm_scaling"}
#: what the study sets itself for every run
_STUDY_KEYS = {"seed", "bundle_root", "dataset_dir", "datalist", "data_list_file_path", "resume_from"}


def setting_overrides(name: str) -> dict[str, Any]:
    """Bundle overrides of one Table-3 setting (the components off are: concatenation fusion as in mmFormer/RFNet,
    no L_rel/L_proto, DTM monitoring only)."""
    if name not in SETTINGS:
        raise DMAFConfigError(f"--settings: unknown setting {name!r}; expected table3 or some of {list(SETTINGS)}")
    dmaf, distill, dtm = SETTINGS[name]
    return {
        "fusion": "dmaf" if dmaf else "concat",
        "distillation": distill,
        "dtm_reweight": dtm,
        "dtm_scaling": "gradient" if dtm else "none",
    }


def resolve_settings(spec: str | Sequence[str], with_baseline: bool = True) -> list[str]:
    """``table3`` (all eight rows), or names separated by commas, e.g. ``baseline,full``; returned in Table 3's
    order, the baseline always first (every difference is taken against it) unless ``with_baseline`` is False (a
    study compared with a reference study instead)."""
    names = list(spec) if not isinstance(spec, str) else [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["table3"]:
        return list(SETTINGS)
    for name in names:
        setting_overrides(name)
    if not names:
        raise DMAFConfigError("--settings: no setting named")
    chosen = set(names) | ({"baseline"} if with_baseline else set())
    return [s for s in SETTINGS if s in chosen]


def parse_seeds(seeds: Any) -> list[int]:
    """``--seeds``: a count N (seeds 0 .. N-1) or distinct seeds, e.g. ``[0,2,5]``."""
    if isinstance(seeds, str) and seeds.strip().lstrip("-").isdigit():
        seeds = int(seeds)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise DMAFConfigError(f"--seeds: need at least one seed, got {seeds} (seed 0 alone: --seeds [0])")
        return list(range(seeds))
    if (
        isinstance(seeds, (list, tuple))
        and seeds
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        if len(set(seeds)) != len(seeds):
            raise DMAFConfigError(f"--seeds: seed given twice in {list(seeds)}")
        return list(seeds)
    raise DMAFConfigError(
        f"--seeds: need a count (e.g. 3) or a list of distinct seeds >= 0 (e.g. [0,2]), got {seeds!r}"
    )


def run_overrides(setting: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Every bundle override of one run: its setting's, then the study's (which a variant study may use to change a
    setting's)."""
    return {**setting_overrides(setting), **overrides}


def components(record: Mapping, setting: str) -> tuple[bool, bool, bool]:
    """(DMAF, distillation, DTM) a run trained with: from its record's overrides (a variant study may change them),
    else from its setting's name."""
    ov = record.get("overrides")
    if not ov:
        return SETTINGS[setting]
    dtm = bool(ov.get("dtm_reweight", True)) or ov.get("dtm_scaling", "gradient") != "none"
    return ov.get("fusion", "dmaf") == "dmaf", bool(ov.get("distillation", True)), dtm


def config_files(dataset: str, evaluate: bool) -> str:
    """The ``--config_file`` value of a run's bundle command: the dataset's training configs, and to evaluate
    ``configs/evaluate.json`` after them."""
    files = DATASET_CONFIGS[dataset] + (["configs/evaluate.json"] if evaluate else [])
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def bundle_args(data_dir: str, datalist: str, run_dir: str, seed: int, overrides: Mapping[str, Any]) -> list[str]:
    """The command-line arguments that make a bundle command one run: its data, its folder, its seed and every
    override (:func:`run_overrides`)."""
    args = ["--dataset_dir", data_dir, "--data_list_file_path", datalist, "--bundle_root", run_dir, "--seed", str(seed)]
    for key, value in overrides.items():
        args += [f"--{key}", _cli_value(value)]
    return args


def _cli_value(value: Any) -> str:
    """A value as ``monai.bundle run`` (python-fire) reads it back: Python literals, so False stays a bool."""
    return value if isinstance(value, str) else repr(value)


def check_reserved_overrides(overrides: Mapping[str, Any], variant: bool) -> None:
    """Refuse overrides of what the study sets itself: the seed and the paths, and what a setting sets unless the
    study is a ``variant`` of a reference study (e.g. ``--dtm_scaling none``)."""
    reserved = _STUDY_KEYS | (set() if variant else _SETTING_KEYS)
    clash = sorted(reserved & set(overrides))
    if clash:
        raise DMAFConfigError(
            f"overrides {clash}: set by the study itself (settings, seeds, paths)"
            + ("" if variant else "; a variant study with --reference may set the settings' keys")
        )


def check_override_keys(bundle_dir: str, dataset: str, overrides: Mapping[str, Any]) -> None:
    """Every override must name a key of the bundle's configs: a typo would otherwise run the whole study with the
    default silently (``monai.bundle run`` adds unknown keys without a word). A value must be of the kind of the
    key's literal default (a number, a bool, a list), so that ``--epochs abc`` is refused here rather than in
    every run."""
    import difflib

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(bundle_dir, c) for c in DATASET_CONFIGS[dataset] + ["configs/evaluate.json"]])
    for key in overrides:
        if key not in parser:
            close = difflib.get_close_matches(key, [k for k in parser.get() if isinstance(k, str)], n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise DMAFConfigError(f"--{key}: not a key of the bundle's configs{hint}")
        default = parser.get(key)
        for _ in range(8):  # a plain reference ("max_epochs": "@epochs") has its target's kind
            if not (isinstance(default, str) and default.startswith("@") and default[1:] in parser):
                break
            default = parser.get(default[1:])
        _check_value(key, overrides[key], default)


def _check_value(key: str, value: Any, default: Any) -> None:
    """An override's value must be of the kind of the key's literal default; MONAI references and expressions
    (``@key``, ``$...``) and string defaults are not checked."""
    if isinstance(value, str) and value.startswith(("@", "$")):
        return
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "True or False"
    elif isinstance(default, int):
        ok, kind = is_number and isinstance(value, int), "a whole number"
    elif isinstance(default, float):
        ok, kind = is_number, "a number"
    elif isinstance(default, list):
        ok, kind = isinstance(value, (list, tuple)), "a list such as [96,96]"
    else:
        return
    if not ok:
        raise DMAFConfigError(f"--{key}: expected {kind} (the bundle's default is {default!r}), got {value!r}")
