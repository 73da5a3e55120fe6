"""Every number a flag takes is one a run can use: a float is finite (nan and inf refused: a NaN
learning rate once trained a NaN model, exit 0) and an integer fits what a count can be (a
20-digit --repeats once ended in an OverflowError). Applied to every command's flags at once
(cli.py), so a flag added later cannot forget it."""

from __future__ import annotations

import inspect
import typing
from typing import Any

import typer
from typer.models import OptionInfo

from melt_bench.units import LARGEST_COUNT, number_problem


def guard_number_flags(app: typer.Typer) -> None:
    """Give every float and int option of `app`'s commands the check below (once per option)."""
    for command in app.registered_commands:
        for param in inspect.signature(command.callback, eval_str=True).parameters.values():
            info, kind = param.default, _number_kind(param.annotation)
            if isinstance(info, OptionInfo) and kind is not None and not hasattr(info.callback, "number_kind"):
                info.callback = _checked(kind, info.callback)


def _number_kind(annotation: Any) -> type | None:
    """float or int for `float`, `int` and their Optional forms; None for anything else (bool too)."""
    options = [arg for arg in typing.get_args(annotation) if arg is not type(None)] or [annotation]
    return options[0] if len(options) == 1 and options[0] in (float, int) else None


def _checked(kind: type, previous: Any) -> Any:
    def check(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        if value is not None and not ctx.resilient_parsing:
            problem = number_problem(value, largest=2**63 - 1 if param.name == "seed" else LARGEST_COUNT)
            if problem:
                raise typer.BadParameter(problem)
        return previous(value) if previous is not None else value

    check.number_kind = kind
    return check
