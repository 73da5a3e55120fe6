"""What to run: a sweep spec (lists per axis) and the points it expands to."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, fields, replace

from melt_bench.models.preset_table import is_melt
from melt_bench.running.ranges import RangeError, parse_int_list, parse_name_list

PHASES = ("prefill", "decode", "generate")
_OPTIONAL = ("warmup", "timed_runs", "early_exit", "engine", "static_cache", "memory_budget_bytes", "prefill_chunk",
             "kv_policy", "decode_reads", "kv_quant")


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
    # Ouro-family models: prefill in chunks of this many tokens (None = one chunk; MELT chunks by
    # its config's chunk_size)
    prefill_chunk: int | None = None
    # Ouro-family models: run under this training-free KV policy (None = the model's own)
    kv_policy: str | None = None
    # MELT models: what decoded tokens read, "final" or "chunk" (None = the config's)
    decode_reads: str | None = None
    # any model: cached rows packed to "int8" / "int4" (None = full precision)
    kv_quant: str | None = None
    # latency only
    warmup: int = 0
    timed_runs: int = 0
    early_exit: float | None = None  # early-stop threshold, None = off
    engine: str = "eager"  # eager | compiled (the same step function) | forward (the model's forward)
    static_cache: bool = False  # forward engine: allocate the cache ahead
    # capacity only: the budget a batch must fit in (batch_size 0 = searched)
    memory_budget_bytes: int | None = None

    @property
    def point_id(self) -> str:
        """Content hash of the normalised point (fields at their defaults left out, so adding a
        field keeps old ids), stable across runs (used by --resume)."""
        defaults = {f.name: f.default for f in fields(self)}
        blob = {k: v for k, v in asdict(self).items() if k not in _OPTIONAL or v != defaults[k]}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        """The settings that apply to this point's command (a memory point has no engine or
        warm-up, only capacity has a budget): what a row records and the plan shows. The point
        id still hashes every field (ids of earlier results stay valid)."""
        timed = ("warmup", "timed_runs", "early_exit", "engine", "static_cache")  # latency, capacity's throughput
        times = self.command == "latency" or (self.command == "capacity" and self.timed_runs > 0)
        return {name: value for name, value in asdict(self).items()
                if (name not in timed or times)
                and (name != "memory_budget_bytes" or self.command == "capacity")}


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
    point_options: dict = field(default_factory=dict)  # command-specific SweepPoint fields

    def points(self) -> list[SweepPoint]:
        # Loops vary fastest so a model's memory-vs-loops curve (and its OOM wall) fills in order.
        return [
            replace(
                SweepPoint(self.command, model, loops, seq, batch, self.phase, self.new_tokens, self.dtype,
                           self.device, self.weights, repeat, kv_policy=policy, decode_reads=reads, kv_quant=quant),
                **self.point_options,
            )
            for model in self.models for policy in self.policies_for(model) for reads in self.decode_reads_for(model)
            for quant in self.kv_quants
            for seq, batch, repeat, loops in itertools.product(
                self.seq_lens, self.batch_sizes, range(self.repeats), self.loops
            )
        ]

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
