"""Reading JSON-lines data files with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line; ValueError at the first line that
    is not JSON."""
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            line = decoded_line(raw, path, number)
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from exc


def decoded_line(raw: bytes, path: Path, number: int) -> str:
    """Line `number` of `path` as text; ValueError naming the file, line and byte if it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                         f"{exc.start + 1}): is it a binary file?") from None
