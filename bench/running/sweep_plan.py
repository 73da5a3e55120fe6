"""What to run: a sweep spec (lists per axis) and the points it expands to."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, Protocol, get_args

from melt_bench.models.names import DecodeReads, KvQuant
from melt_bench.models.preset_table import is_melt
from melt_bench.running.ranges import RangeError, parse_int_list, parse_name_list

Phase = Literal["prefill", "decode", "generate"]
PHASES: tuple[str, ...] = get_args(Phase)
# Settings a point id leaves out while they hold these values (the values every point had before
# the setting existed), so adding a setting keeps the ids of earlier results: --resume keys on them.
# Fixed here, not read from the point types, whose defaults may differ (latency warms up twice).
_ID_DEFAULTS = {"warmup": 0, "timed_runs": 0, "early_exit": None, "engine": "eager", "static_cache": False,
                "memory_budget_bytes": None, "prefill_chunk": None, "kv_policy": None, "decode_reads": None,
                "kv_quant": None, "threads": None}


@dataclass(frozen=True)
class SweepPoint:
    """One measurement's axes, which every sweep shares; each command's point type
    (scenarios/memory.py, latency.py, capacity.py) adds its own settings."""

    command: str
    model: str
    loops: int
    seq_len: int
    batch_size: int
    phase: Phase
    new_tokens: int
    dtype: str
    device: str
    weights: str | None = None
    repeat: int = 0
    # Ouro-family models: run under this training-free KV policy (None = the model's own)
    kv_policy: str | None = None
    # MELT models: what decoded tokens read, "final" or "chunk" (None = the config's)
    decode_reads: DecodeReads | None = None
    # any model: cached rows packed to "int8" / "int4" (None = full precision)
    kv_quant: KvQuant | None = None

    @property
    def point_id(self) -> str:
        """Content hash of the point's settings (those at their _ID_DEFAULTS left out), stable
        across runs and versions (used by --resume)."""
        blob = {k: v for k, v in asdict(self).items() if k not in _ID_DEFAULTS or v != _ID_DEFAULTS[k]}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        """The point's settings: what a row records and the plan shows."""
        return asdict(self)

    def axes(self) -> dict:
        """The shared axes by name, for a command's point type to extend (PointOptions.point)."""
        return {f.name: getattr(self, f.name) for f in fields(SweepPoint)}

    @property
    def timed(self) -> bool:
        """Whether the point times decode steps (latency; capacity's throughput)."""
        return False

    def label(self) -> str:
        """What the progress bar shows of the point: 'melt-tiny reads=chunk loops=4 seq=512 batch=1'."""
        batch = self.batch_size or "searched"  # capacity points search their batch
        return f"{variant_label(self)} loops={self.loops} seq={self.seq_len} batch={batch}"


def variant_label(point) -> str:
    """The model with the KV policy / decode reads / KV quantisation a point (of any command)
    asks for: 'melt-tiny reads=chunk'."""
    policy = f" kv={point.kv_policy}" if point.kv_policy else ""
    quant = f" kv_quant={point.kv_quant}" if point.kv_quant else ""
    return point.model + policy + (f" reads={point.decode_reads}" if point.decode_reads else "") + quant


class PointOptions(Protocol):
    """A command's own settings (typed: scenarios/memory.MemoryOptions, ...), which turn the
    sweep's axes into that command's point."""

    def point(self, axes: SweepPoint) -> SweepPoint: ...


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
    # training-free KV policies for Ouro-family models ([None]: each model's own; MELT always)
    kv_policies: list[str | None] = field(default_factory=lambda: [None])
    # MELT's decode_reads modes ([None]: each model's config; Ouro-family models always)
    decode_reads: list[str | None] = field(default_factory=lambda: [None])
    # KV quantisation modes ([None]: full precision)
    kv_quants: list[str | None] = field(default_factory=lambda: [None])

    def points(self, options: PointOptions | None = None) -> list[SweepPoint]:
        """Every combination of the lists, as the command's points (`options`; None: the bare axes)."""
        # Loops vary fastest so a model's memory-vs-loops curve (and its OOM wall) fills in order.
        axes = [
            SweepPoint(self.command, model, loops, seq, batch, self.phase, self.new_tokens, self.dtype, self.device,
                       self.weights, repeat, kv_policy=policy, decode_reads=reads, kv_quant=quant)
            for model in self.models for policy in self.policies_for(model) for reads in self.decode_reads_for(model)
            for quant in self.kv_quants
            for seq, batch, repeat, loops in itertools.product(
                self.seq_lens, self.batch_sizes, range(self.repeats), self.loops
            )
        ]
        return axes if options is None else [options.point(point) for point in axes]

    def policies_for(self, model: str) -> list[str | None]:
        """MELT keeps its own gated policy; Ouro-family models take every asked-for policy."""
        return [None] if is_melt(model) else self.kv_policies

    def decode_reads_for(self, model: str) -> list[str | None]:
        """decode_reads is MELT's: Ouro-family models run once."""
        return self.decode_reads if is_melt(model) else [None]


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
