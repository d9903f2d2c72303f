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
"""A strict command-line parser built from a method's signature and Google-style docstring (argparse).

The whole command line is parsed before the method runs: an unknown flag (with the nearest known one), a flag given
twice, a missing or extra argument raise :class:`UsageError`, one line that ends the ``dmaf`` command with exit status
2, so a typo never runs a command with defaults. Values are Python literals where they are one (:func:`_value`); a
method with ``**kwargs`` accepts any flag (e.g. bundle overrides). Booleans follow the one policy of
:func:`~dmaf_components.errors.as_bool`.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


from .errors import DMAFConfigError, DMAFError, as_bool

__all__ = ["UsageError", "command_parser", "bind_arguments", "suggest"]


class UsageError(DMAFConfigError):
    """A command line that does not fit the command: unknown command or flag, missing or extra argument."""


def _value(text: str) -> Any:
    """A command-line value: a Python literal when it is one (``2``, ``-1``, ``0.5``, ``8,8,8``, ``[0,2]``,
    ``False``, ``None``), bare words inside one read as text (``[a,b]`` is ``['a', 'b']``, as python-fire reads
    it, so that bundle overrides keep their types), anything else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return text

    class Words(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            return ast.copy_location(ast.Constant(node.id), node)

    try:
        return ast.literal_eval(Words().visit(tree))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


class _Once(argparse.Action):
    """Store a flag's value read by ``parse`` (the text, or True for a flag standing alone), refusing a flag given
    twice (``--seed 1 --seed=2``); ``parse`` is called with the flag's name."""

    def __init__(self, *args: Any, parse: Callable[[Any, str], Any] = lambda v, name: v, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parse = parse

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if self.dest in namespace._given:
            raise argparse.ArgumentError(None, f"--{self.dest} given twice")
        try:
            value = self.parse(values, self.dest)
        except DMAFError as exc:
            raise argparse.ArgumentError(None, str(exc)) from None
        namespace._given.append(self.dest)
        setattr(namespace, self.dest, value)


def _text(value: Any, name: str) -> Any:
    return _value(value) if isinstance(value, str) else value


def _switch(value: Any, name: str) -> bool:
    """A boolean flag's value (``--overwrite``, ``--overwrite false``): the one policy of
    :func:`~dmaf_components.errors.as_bool`."""
    return as_bool(_text(value, name), f"--{name}")


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are raised as :class:`UsageError` (one line, exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _arg_help(doc: str) -> dict[str, str]:
    """The ``Args:`` section of a Google-style docstring: parameter name -> its text (continuation lines joined)."""
    helps: dict[str, str] = {}
    lines = doc.splitlines()
    if "Args:" not in [line.strip() for line in lines]:
        return helps
    start = [line.strip() for line in lines].index("Args:") + 1
    name, indent = None, None
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        match = re.match(r"(\w+): ?(.*)", line.strip())
        if depth < indent:
            break
        if depth == indent and match:
            name = match.group(1)
            helps[name] = match.group(2)
        elif name is not None:
            helps[name] += " " + line.strip()
    return helps


def _is_switch(param: inspect.Parameter) -> bool:
    return param.annotation in (bool, "bool") or isinstance(param.default, bool)


def command_parser(method: Callable, command: str, args: Sequence[str]) -> tuple[_Parser, list[inspect.Parameter]]:
    """The parser of one command, built from its method's signature and docstring.

    Every parameter is a flag ``--name VALUE`` or ``--name=VALUE`` (also with hyphens, ``--no-check``), ``-x`` where
    ``x`` starts no other parameter's name; a boolean one (``--overwrite``) also stands alone for true and as
    ``--nooverwrite`` for false. Arguments that are not flags fill, in order, the parameters not given as flags. A
    method with ``**kwargs`` (bundle overrides) takes any other flag in ``args`` as well.
    """
    doc = inspect.getdoc(method) or ""
    params = list(inspect.signature(method).parameters.values())[1:]  # without self
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = " ".join(p.name.upper() for p in named if p.default is p.empty)
    parser = _Parser(
        prog=f"dmaf {command}",
        usage=f"dmaf {command} {required} [--FLAG VALUE ...]".replace("  ", " "),
        description=doc.split("\n\nArgs:")[0],
        allow_abbrev=False,  # --out is not --output: an unknown flag, never a guess
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("_values", nargs="*", type=_value, help=argparse.SUPPRESS)
    helps = _arg_help(doc)
    initials = [p.name[0] for p in named]
    known = {"-h", "--help"}
    for p in named:
        flags = [f"--{p.name}"] + ([f"--{p.name.replace('_', '-')}"] if "_" in p.name else [])
        if initials.count(p.name[0]) == 1 and p.name[0] != "h":  # -h is --help
            flags.append(f"-{p.name[0]}")
        text = helps.get(p.name, "")
        if p.default not in (p.empty, None) and "default" not in text:
            text += f" (default: {p.default!r})"
        if _is_switch(p):
            parser.add_argument(
                *flags, dest=p.name, nargs="?", const=True, parse=_switch, action=_Once, metavar="true|false", help=text
            )
            if not p.name.startswith("no"):  # --nooverwrite; --no_check is a switch of its own
                parser.add_argument(
                    f"--no{p.name}",
                    dest=p.name,
                    nargs=0,
                    parse=lambda v, name: False,
                    action=_Once,
                    help=argparse.SUPPRESS,
                )
                known.add(f"--no{p.name}")
        else:
            parser.add_argument(*flags, dest=p.name, parse=_text, action=_Once, metavar=p.name.upper(), help=text)
        known.update(flags)
    if any(p.kind == p.VAR_KEYWORD for p in params):
        for arg in args:
            flag = arg.partition("=")[0]
            if re.match(r"^--[A-Za-z_]", arg) and flag not in known:
                known.add(flag)
                parser.add_argument(
                    flag,
                    dest=flag[2:].replace("-", "_"),
                    nargs="?",
                    const=True,
                    parse=_text,
                    action=_Once,
                    help=argparse.SUPPRESS,
                )
    return parser, params


def suggest(word: str, choices, prefix: str = "") -> str:
    """``"; did you mean <prefix><closest>?"`` for the choice nearest ``word``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def bind_arguments(method: Callable, command: str, args: Sequence[str]) -> dict[str, Any]:
    """The keyword arguments of ``method`` (the command ``command``) for a command line (those given; the rest keep
    the method's defaults), or :class:`UsageError` naming the unknown flag (with the nearest known one), the flag
    given twice, the missing or extra argument."""
    if "--" in args:  # it would make the next flag a value: `-- --trace` an output file named --trace
        raise UsageError(f"{command}: unexpected argument '--' (see dmaf {command} --help)")
    parser, params = command_parser(method, command, args)
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    try:
        space, unknown = parser.parse_known_intermixed_args(args, argparse.Namespace(_given=[]))
    except UsageError as exc:
        raise UsageError(f"{command}: {exc} (see dmaf {command} --help)") from None
    for arg in unknown:
        flag = arg.partition("=")[0]
        key = flag.lstrip("-").replace("-", "_")
        if len(key) == 1 and [n[0] for n in named].count(key) > 1:
            choices = " or ".join(f"--{n}" for n in named if n[0] == key)
            raise UsageError(f"{command}: flag {flag} is ambiguous: {choices}")
        raise UsageError(f"{command}: unknown flag {flag}{suggest(key, named, '--')} (see dmaf {command} --help)")
    values = {name: getattr(space, name) for name in space._given}
    free = [n for n in named if n not in values]
    positional = list(space._values)
    if len(positional) > len(free):
        raise UsageError(f"{command}: unexpected argument {positional[len(free)]!r} (see dmaf {command} --help)")
    values.update(zip(free, positional))
    missing = [p.name for p in params if p.name in named and p.name not in values and p.default is p.empty]
    if missing:
        raise UsageError(f"{command}: missing argument {missing[0].upper()} (see dmaf {command} --help)")
    return values
