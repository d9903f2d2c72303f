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
"""The errors a user meets, and how each ends a run: one line naming the file or setting and the cause.

- :class:`DMAFError`, the base of the four kinds a user meets: :class:`DMAFDataError` (a case, file, datalist or
  study folder), :class:`DMAFConfigError` (a setting, override or command line that does not fit),
  :class:`DMAFCheckpointError` (weights or a training checkpoint that cannot be used) and :class:`DMAFRunError` (a
  run that failed or was refused); catch :class:`DMAFError` for all of them. This module imports nothing from the
  package, so every module, ``data/`` included, can raise them;
- :class:`NonFiniteError` (a loss or a state to save holds NaN or inf);
- :class:`BundleExit`: ends a bundle run with exit status 1 and the message as its last line, no traceback;
- :func:`one_line_message` / :func:`describe_failure`: the one line of a failure, found in MONAI's wrapped
  exceptions; :func:`exit_on_data_error` turns a data error into :class:`BundleExit` for bundle configs;
- :func:`as_bool`: the one boolean policy for the command line and the configs (``true``/``false``/``1``/``0``/
  ``yes``/``no`` in any case, or Python's booleans).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = [
    "DMAFError",
    "DMAFDataError",
    "DMAFConfigError",
    "DMAFCheckpointError",
    "DMAFRunError",
    "NonFiniteError",
    "BundleExit",
    "as_bool",
    "describe_failure",
    "exit_on_data_error",
    "one_line_message",
]


class DMAFError(ValueError):
    """An error a user meets: its message is one line naming the file, setting or run and what is wrong."""


class DMAFDataError(DMAFError):
    """Bad input data: a case, file, datalist or study folder (the message names it and what is wrong)."""


class DMAFConfigError(DMAFError):
    """A setting, bundle override or command line that does not fit (the message names the key or flag)."""


class DMAFCheckpointError(DMAFError):
    """Weights or a training checkpoint that cannot be used: missing, torn, foreign, of another architecture."""


class DMAFRunError(DMAFError):
    """A run that failed or was refused: a training or evaluation process, a study's run."""


class NonFiniteError(RuntimeError):
    """A loss or a state to be saved holds NaN or inf values."""


class BundleExit(SystemExit):
    """Ends a bundle run with exit status 1 and ``message`` as the last line printed (no traceback).

    A :class:`SystemExit`, so that MONAI's ``ConfigExpression`` does not bury it under ``RuntimeError: Failed to
    evaluate ConfigExpression``; callers in Python catch it as ``SystemExit`` (``exc.code`` is the message).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def as_bool(value: Any, name: str = "overwrite") -> bool:
    """A switch given in Python or on the command line: ``True``/``False``, or ``true``/``false``/``1``/``0``/``yes``/
    ``no`` in any case (fire passes ``--overwrite false`` as the string ``"false"``, which is truthy).

    Raises:
        DMAFConfigError: any other value.
    """
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise DMAFConfigError(f"{name}: expected true or false, got {value!r}")


def _cause_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during (``__cause__``, else ``__context__``), each once."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def describe_failure(exc: BaseException) -> str:
    """One line for an exception raised while preparing or segmenting a study.

    MONAI wraps transform errors (``RuntimeError: applying transform ...``); the chain is followed to the
    :class:`DMAFError` (whose message names the file) or else to the innermost exception.
    """
    chain = _cause_chain(exc)
    data_errors = [e for e in chain if isinstance(e, DMAFError)]
    if data_errors:
        return str(data_errors[0]).strip().splitlines()[0]
    root = chain[-1]
    lines = [line.strip() for line in str(root).strip().splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__


def exit_on_data_error(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)``, turning a :class:`DMAFError` into :class:`BundleExit` (for bundle configs)."""
    try:
        return func(*args, **kwargs)
    except DMAFError as exc:
        raise BundleExit(str(exc)) from None


def one_line_message(exc: BaseException) -> str | None:
    """The one-line message of a failure that needs no traceback, else None.

    That is a :class:`DMAFError` anywhere in the exception's cause chain (MONAI wraps a transform's error in
    ``RuntimeError: applying transform ...``; a loader worker process passes it on as text, whose
    ``DMAFDataError: ...`` line, or another kind's, is then taken), a :class:`NonFiniteError` or a ``SystemExit``
    carrying a message (:class:`BundleExit`).
    """
    chain = _cause_chain(exc)
    for e in chain:
        if isinstance(e, SystemExit):
            return str(e.code) if isinstance(e.code, str) else None
        if isinstance(e, (DMAFError, NonFiniteError)):
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            return lines[0] if lines else type(e).__name__
    for e in chain:  # e.g. "Caught RuntimeError in DataLoader worker process 0. Original Traceback ..."
        found = re.findall(r"DMAF(?:Data|Config|Checkpoint|Run)?Error: (\S[^\n]*)", str(e))
        if found:
            return found[-1].strip()
    return None
