"""What to run: a sweep spec (lists per axis) and the points it expands to."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field

from .ranges import RangeError, parse_int_list, parse_name_list

PHASES = ("prefill", "decode", "generate")


@dataclass(frozen=True)
class SweepPoint:
    """One measurement: everything that decides what the child process runs."""

    command: str
    model: str
    loops: int
    seq_len: int
    batch_size: int
    phase: str
    new_tokens: int
    dtype: str
    device: str
    weights: str | None = None
    repeat: int = 0

    @property
    def point_id(self) -> str:
        """Content hash of the normalised point, stable across runs (used by --resume)."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SweepSpec:
    """The lists of a sweep; `points()` is their product."""

    command: str
    models: list[str]
    loops: list[int]
    seq_lens: list[int]
    batch_sizes: list[int]
    phase: str = "decode"
    new_tokens: int = 128
    dtype: str = "bfloat16"
    device: str = "cpu"
    weights: str | None = None
    repeats: int = 1
    notes: list[str] = field(default_factory=list)

    def points(self) -> list[SweepPoint]:
        # Loops vary fastest so a model's memory-vs-loops curve (and its OOM wall) fills in order.
        return [
            SweepPoint(self.command, model, loops, seq, batch, self.phase, self.new_tokens, self.dtype,
                       self.device, self.weights, repeat)
            for model, seq, batch, repeat, loops in itertools.product(
                self.models, self.seq_lens, self.batch_sizes, range(self.repeats), self.loops
            )
        ]


def as_int_list(value: object, option: str) -> list[int]:
    """A list option given as grammar text ('1..16') or, from YAML, as int / list of ints."""
    if isinstance(value, bool):
        raise RangeError(f"{option}: {value!r} is not a list of positive integers")
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str):
        raise RangeError(f"{option}: {value!r} is not a list of positive integers")
    return parse_int_list(value, option)


def as_name_list(value: object, option: str) -> list[str]:
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str):
        raise RangeError(f"{option}: {value!r} is not a comma-separated list of names")
    return parse_name_list(value, option)
