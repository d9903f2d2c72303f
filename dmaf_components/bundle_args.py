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
"""Command-line runs of ``python -m monai.bundle run``: warn about keys that no config defines and about the old
names of keys; end with one line on a data error.

``monai.bundle run`` adds every ``--key value`` to the config, so a mistyped key (``--epoch 1``, ``--max_epoch 1``)
is silently ignored and the run goes on with the default. The bundle's ``initialize`` sections call
:func:`warn_unknown_overrides`, which reads the command line of the running process, loads the same config files and
warns, with the closest key, about every ``--key`` that names nothing. The training's ``initialize`` also calls
:func:`exit_on_data_errors`, so that a data error raised while the configuration is being built (a case that fails
to load while the training set is cached) ends the process with its one line instead of a chain of tracebacks.

Three keys have an old name beside the model zoo's (:data:`DEPRECATED_KEYS`): ``max_epochs`` for ``epochs``,
``datalist`` for ``data_list_file_path`` and ``checkpoint_loader`` for ``checkpointloader``. In the configs the old
name is a reference to the new one and the engines read the old name, so an override of either takes effect; on a
command line the old name warns (``FutureWarning``), and both names with different values are an error.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "DEPRECATED_KEYS",
    "canonical_key",
    "canonical_overrides",
    "deprecated_overrides",
    "check_shadowed_overrides",
    "override_keys",
    "config_ids",
    "unknown_overrides",
    "warn_unknown_overrides",
    "is_bundle_command_line",
    "exit_on_data_errors",
    "choice",
    "fraction",
    "switch",
]


DEPRECATED_KEYS: dict[str, str] = {
    "max_epochs": "epochs",
    "datalist": "data_list_file_path",
    "checkpoint_loader": "checkpointloader",
}
"""Old config key -> the model zoo's name for it; both work as overrides, the old one warns."""


def canonical_key(key: str) -> str:
    """The model zoo's name of a config key (``max_epochs`` -> ``epochs``); other keys unchanged."""
    return DEPRECATED_KEYS.get(key, key)


def canonical_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` under the model zoo's key names (records of older versions hold ``max_epochs``)."""
    return {canonical_key(str(k)): v for k, v in overrides.items()}


def deprecated_overrides(overrides: Mapping[str, Any]) -> list[str]:
    """One message per old key name among ``overrides`` (``--max_epochs``: use ``--epochs``).

    Args:
        overrides: override keys and their values, from a command line (:func:`override_keys`) or a program.

    Returns:
        messages such as ``"--max_epochs is the old name of --epochs; it still works, but use --epochs"``.

    Raises:
        DMAFConfigError: an old name and its new name given with different values (the run would use the old one's).
    """
    from .errors import DMAFConfigError

    messages = []
    for old, new in DEPRECATED_KEYS.items():
        if old not in overrides:
            continue
        if new in overrides and str(overrides[new]) != str(overrides[old]):
            raise DMAFConfigError(
                f"--{old} {overrides[old]} and --{new} {overrides[new]} set the same key ({old} is the old name of "
                f"{new}): give only --{new}"
            )
        messages.append(f"--{old} is the old name of --{new}; it still works, but use --{new}")
    return messages


def _run_arguments() -> set[str]:
    """Names that ``monai.bundle run`` (and the workflow it creates) takes as its own arguments, not as overrides."""
    from monai.bundle import ConfigWorkflow
    from monai.bundle.scripts import run

    names = set(inspect.signature(run).parameters) | set(inspect.signature(ConfigWorkflow.__init__).parameters)
    return {n for n in names if n not in ("self", "override", "kwargs", "args")}


def override_keys(argv: Sequence[str]) -> dict[str, str | None]:
    """``--key value`` / ``--key=value`` pairs of a command line (value None when a flag has none)."""
    keys: dict[str, str | None] = {}
    argv = list(argv)
    for i, token in enumerate(argv):
        if not token.startswith("--") or token == "--":
            continue
        key, sep, value = token[2:].partition("=")
        if not sep:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            value = None if nxt is None or nxt.startswith("--") else nxt
        keys[key] = value
    return keys


def config_ids(config: Any, prefix: str = "") -> list[str]:
    """Every id of a config (``a``, ``a#b``, ``a#0``...), as ``monai.bundle`` addresses them."""
    ids: list[str] = []
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for k, v in items:
        cid = f"{prefix}{k}"
        ids.append(cid)
        ids.extend(config_ids(v, cid + "#"))
    return ids


def _config_files(value: str | None) -> list[str]:
    if not value:
        return []
    value = value.strip()
    if value.startswith(("[", "(")):
        return [str(f) for f in ast.literal_eval(value)]
    return [f.strip() for f in value.split(",") if f.strip()]


def unknown_overrides(argv: Sequence[str]) -> list[str]:
    """One message per ``--key`` of a ``monai.bundle run`` command line that is neither an argument of ``run`` nor
    an id of the merged ``--config_file`` configs (``_meta_#...`` ids are metadata and not checked).

    Args:
        argv: the command line after ``python -m monai.bundle``, e.g. ``["run", "training", "--config_file", ...]``.

    Returns:
        messages such as ``"--epoch: no config defines this key (did you mean --epochs?); it is ignored"``.
    """
    from monai.bundle import ConfigParser

    keys = override_keys(argv)
    files = _config_files(keys.get("config_file"))
    if not files:
        return []
    parser = ConfigParser()
    parser.read_config(files)
    ids = config_ids(parser.get())
    known = set(ids) | _run_arguments()
    messages = []
    for key in keys:
        if key in known or key.startswith("_meta_"):
            continue
        parent = key.rsplit("#", 1)[0] + "#" if "#" in key else ""
        candidates = [i for i in ids if i.startswith(parent) and "#" not in i[len(parent) :]] or ids
        close = difflib.get_close_matches(key, candidates, n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        messages.append(f"--{key}: no config of this run defines this key{hint}; it is ignored")
    return messages


def check_shadowed_overrides(argv: Sequence[str]) -> None:
    """Refuse a new key name on the command line that a config would silently override: the engines read the old
    name, so a config file that sets ``max_epochs`` to a value (not ``@epochs``) makes ``--epochs`` do nothing.

    Args:
        argv: the command line after ``python -m monai.bundle``.

    Raises:
        DMAFConfigError: ``--epochs 10: the config sets max_epochs (its old name) to 100, ...``.
    """
    from monai.bundle import ConfigParser

    from .errors import DMAFConfigError

    keys = override_keys(argv)
    files = _config_files(keys.get("config_file"))
    if not files or not any(new in keys and old not in keys for old, new in DEPRECATED_KEYS.items()):
        return
    try:
        parser = ConfigParser()
        parser.read_config(files)
        config = parser.get()
    except Exception:  # configs this check cannot read: monai.bundle reports them
        return
    for old, new in DEPRECATED_KEYS.items():
        if new in keys and old not in keys and isinstance(config, dict) and config.get(old, f"@{new}") != f"@{new}":
            raise DMAFConfigError(
                f"--{new} {keys[new]}: a config sets {old} (the old name of {new}) to {config[old]!r}, which the run "
                f"would use instead; give --{old}, or set {new} in that config"
            )


def _is_bundle_command_line(argv: Sequence[str]) -> bool:
    """True when this process is ``python -m monai.bundle ...`` (also under torchrun), not a program that creates a
    workflow itself (a test, MONAI Label), whose command line has nothing to do with the bundle."""
    return bool(argv) and os.path.normpath(argv[0]).endswith(os.path.join("monai", "bundle", "__main__.py"))


def warn_unknown_overrides(argv: Sequence[str] | None = None) -> list[str]:
    """Warn about every command-line key that no config of the run defines (``UserWarning``) and about every old
    key name (``FutureWarning``, :func:`deprecated_overrides`).

    Called from the bundle's ``initialize`` sections; does nothing unless the process is ``python -m monai.bundle``
    (or ``argv`` is given).

    Args:
        argv: the full command line, ``sys.argv`` by default.

    Returns:
        the messages warned.

    Raises:
        DMAFConfigError: an old key name and its new name with different values; a new name that a config's value of
            the old name would override (:func:`check_shadowed_overrides`).
    """
    if argv is None:
        argv = sys.argv
        if not _is_bundle_command_line(argv):
            return []
    old_names = deprecated_overrides(override_keys(list(argv)[1:]))
    check_shadowed_overrides(list(argv)[1:])
    try:
        messages = unknown_overrides(list(argv)[1:])
    except Exception as e:  # a command line this check cannot read must not stop the run: monai.bundle decides
        messages = [f"command-line keys not checked: {e}"]
    unknown = {m.split(":", 1)[0] for m in messages}
    old_names = [m for m in old_names if m.split(" ", 1)[0] not in unknown]  # a key no config has: ignored, not old
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=2)
    for message in old_names:
        warnings.warn(message, FutureWarning, stacklevel=2)
    return messages + old_names


def is_bundle_command_line(argv: Sequence[str] | None = None) -> bool:
    """Whether this process is ``python -m monai.bundle ...`` (``argv``: ``sys.argv`` by default)."""
    return _is_bundle_command_line(sys.argv if argv is None else argv)


def exit_on_data_errors(argv: Sequence[str] | None = None) -> bool:
    """In a ``python -m monai.bundle`` process, print an uncaught exception that holds a data error as its one line.

    Installs a ``sys.excepthook``: an uncaught exception for which
    :func:`~dmaf_components.handlers.reliability.one_line_message` has a line (a
    :class:`~dmaf_components.errors.DMAFError` anywhere in its cause chain, e.g. under MONAI's ``Failed to
    instantiate`` and ``applying transform`` errors) prints that line to stderr, and the process exits with status 1
    at once, after the log is flushed (skipping the interpreter's shutdown, which a loader thread still reading
    another case can abort); any other exception prints its traceback as before. Does nothing in other processes (a
    test, MONAI Label), whose exceptions are theirs to handle.

    Args:
        argv: the full command line, ``sys.argv`` by default.

    Returns:
        whether the hook was installed.
    """
    if not is_bundle_command_line(argv):
        return False
    from .errors import one_line_message

    previous = sys.excepthook
    if getattr(previous, "_dmaf_one_line", False):
        return True

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        message = one_line_message(exc)
        if message is None:
            previous(exc_type, exc, tb)
            return
        logging.shutdown()  # flushes the log files and streams
        sys.stdout.flush()
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        # End now: a loader thread still reading another case (MONAI's CacheDataset pool) can make the interpreter's
        # shutdown abort ("terminate called without an active exception", status 134) after the line.
        os._exit(1)

    hook._dmaf_one_line = True  # type: ignore[attr-defined]
    sys.excepthook = hook
    return True


def choice(key: str, value: Any, allowed: Sequence[str]) -> str:
    """A config value that must be one of ``allowed``; else a one-line error naming the key.

    Raises:
        DMAFConfigError: ``--key: expected one of [...], got ...``.
    """
    from .errors import DMAFConfigError

    if not isinstance(value, str) or value not in allowed:
        raise DMAFConfigError(f"--{key}: expected one of {list(allowed)}, got {value!r}")
    return value


def fraction(key: str, value: Any) -> float:
    """A config value that must be a number in [0, 1]; else a one-line error naming the key.

    Raises:
        DMAFConfigError: ``--key: expected a number in [0, 1], got ...``.
    """
    from .errors import DMAFConfigError

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise DMAFConfigError(f"--{key}: expected a number in [0, 1], got {value!r}")
    return float(value)


def switch(key: str, value: Any) -> bool:
    """A config value that must be true or false (``True``/``False``, or ``true``/``false``/``1``/``0``/``yes``/``no``
    as a command line gives them); else a one-line error naming the key.

    Raises:
        DMAFConfigError: ``--key: expected true or false, got ...``.
    """
    from .errors import as_bool

    return as_bool(value, f"--{key}")
