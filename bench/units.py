"""Formatting numbers with their units, one way everywhere."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from melt_bench.models.names import DTYPES

if TYPE_CHECKING:
    import torch


LARGEST_COUNT = 2**31 - 1  # no count, length or step number of a run comes near it; seeds go to 2**63


def number_problem(value: float | int, largest: int = LARGEST_COUNT) -> str | None:
    """Why `value` is no number a run can use (nan, inf, an integer past any count), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    if isinstance(value, int) and abs(value) > largest:
        return f"{value} is larger than any count melt-bench runs (at most {largest:,})"
    return None


def check_dtype(name: str) -> None:
    """ValueError naming the bad text unless `name` is a dtype name ('bfloat16', 'bf16', ...)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")


def parse_dtype(name: str) -> torch.dtype:
    """torch dtype for a name such as 'bfloat16' or 'bf16'; ValueError names the bad text."""
    import torch  # here, so formatting and name checks stay free of it

    check_dtype(name)
    return getattr(torch, DTYPES[name])


def format_bytes(n: int | float | None) -> str:
    """Binary units: 1,536 -> '1.50 KiB'."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_count(n: int) -> str:
    """Parameter counts: 1_434_652_673 -> '1.435 B'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return str(n)


def format_seconds(seconds: float) -> str:
    """A duration for people: '42 s', '12.5 min', '3.2 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def byte_scale(values) -> tuple[float, str]:
    """The binary unit that suits the largest of `values`: (bytes per unit, its name)."""
    top = max((abs(v) for v in values if v == v and v is not None), default=0)
    for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if top >= scale:
            return float(scale), name
    return 1.0, "B"
