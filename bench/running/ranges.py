"""The list grammar every sweep option shares: `1..16`, `1..16:2`, `1,2,4,8`, and mixes
(`1..4,8,16`). Values are positive integers, ranges ascend, and no item is empty."""

from __future__ import annotations

import re

_RANGE = re.compile(r"^(\d+)\.\.(\d+)(?::(\d+))?$")


class RangeError(ValueError):
    """A malformed list; the message names the option and the bad text."""


def parse_int_list(text: str, option: str = "list") -> list[int]:
    """`"1..4,8"` -> [1, 2, 3, 4, 8]. Duplicates are dropped, the order of first mention kept."""
    if not text or not text.strip():
        raise RangeError(f"{option}: empty list")
    values: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise RangeError(f"{option}: empty item in {text!r}")
        values.extend(_parse_item(item, option))
    return list(dict.fromkeys(values))


def _parse_item(item: str, option: str) -> list[int]:
    if item.isdigit():
        value = int(item)
        if value < 1:
            raise RangeError(f"{option}: {item!r} must be a positive integer")
        return [value]
    match = _RANGE.match(item)
    if not match:
        raise RangeError(f"{option}: {item!r} is neither a positive integer nor a range like 1..16 or 1..16:2")
    start, stop, step = int(match[1]), int(match[2]), int(match[3] or 1)
    if start < 1:
        raise RangeError(f"{option}: {item!r} must start at a positive integer")
    if stop < start:
        raise RangeError(f"{option}: {item!r} descends; write the smaller bound first")
    if step < 1:
        raise RangeError(f"{option}: {item!r} needs a positive step")
    return list(range(start, stop + 1, step))


def parse_name_list(text: str, option: str = "list") -> list[str]:
    """`"ouro-1.4b, melt-1.4b"` -> ['ouro-1.4b', 'melt-1.4b']; empty items are refused."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise RangeError(f"{option}: empty item in {text!r}")
    return list(dict.fromkeys(items))
