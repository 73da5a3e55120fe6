"""`melt-bench capacity`: its options, its point, its end-of-sweep table, and its measurement
(`measure`: the batch search of scenarios/measure_capacity.py, whose probes are memory points and
whose throughput runs are latency points). Torch-free: the command line builds these before
torch loads."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from melt_bench.models.names import Engine
from melt_bench.reporting.summary_tables import Column, TableSpec, rate_cell
from melt_bench.running.sweep_plan import SweepPoint
from melt_bench.scenarios.latency import LatencyPoint
from melt_bench.scenarios.memory import MemoryPoint

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_TIMING = ("warmup", "timed_runs", "early_exit", "engine", "static_cache", "threads")


def parse_bytes(text: str) -> int:
    """'80GiB' -> 85899345920; '1.5GB' -> 1500000000; a bare number is bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size like 80GiB, 512MiB or 1.5GB")
    value = float(match[1]) * _UNITS[(match[2] or "b").lower()]
    if value < 1:
        raise ValueError(f"{text!r} must be at least one byte")
    return int(value)


@dataclass(frozen=True)
class CapacityPoint(LatencyPoint):
    """The largest batch within a budget (batch_size 0: searched) and, when it has timed runs,
    its decode throughput, timed as latency times it."""

    memory_budget_bytes: int | None = None

    def to_dict(self) -> dict:
        """Without timed runs the point has no engine or timing to record."""
        return {name: value for name, value in asdict(self).items() if self.timed or name not in _TIMING}

    def probe(self, batch: int) -> MemoryPoint:
        """The memory point that tells whether `batch` fits."""
        return self._as(MemoryPoint, command="memory", batch_size=batch)

    def timed_at(self, batch: int) -> LatencyPoint:
        """The latency point that times decode at `batch`."""
        return self._as(LatencyPoint, command="latency", batch_size=batch)

    def _as(self, kind: type, **changes):
        """This point as a `kind` point (a type whose fields this one has), with `changes`."""
        return kind(**{**{f.name: getattr(self, f.name) for f in fields(kind)}, **changes})


@dataclass(frozen=True)
class CapacityOptions:
    """capacity's own flags. timed_runs 0: find the batch only (and keep the point ids of capacity
    files from before throughput was measured)."""

    budget_bytes: int
    max_batch: int = 4096
    engine: Engine = "eager"
    warmup: int = 1
    timed_runs: int = 3
    prefill_chunk: int | None = None
    threads: int | None = None

    def point(self, axes: SweepPoint) -> CapacityPoint:
        timed = self.timed_runs > 0
        return CapacityPoint(**{**axes.axes(), "batch_size": 0}, prefill_chunk=self.prefill_chunk,
                             warmup=self.warmup if timed else 0, timed_runs=self.timed_runs,
                             engine=self.engine if timed else "eager", memory_budget_bytes=self.budget_bytes,
                             threads=self.threads if timed else None)


def _max_batch(metrics: dict) -> str:
    """The search's answer; '>= N' when it stopped at --max-batch without a failure."""
    if "max_batch" not in metrics:
        return "-"
    text = f">= {metrics['max_batch']}" if metrics.get("hit_batch_limit") else str(metrics["max_batch"])
    low, high = metrics.get("max_batch_repeat_min"), metrics.get("max_batch_repeat_max")
    return text + (f" ({low}-{high})" if low is not None and low != high else "")


SUMMARY = TableSpec(
    "capacity", "largest batch within the budget, and its decode throughput",
    [Column(" max batch", _max_batch), Column(" tok/s", rate_cell("decode_tokens_per_s_at_max_batch")),
     Column(" tok/s batch 1", rate_cell("decode_tokens_per_s_at_batch_1"))],
    "max_batch", "max batch", ("seq_len", "new_tokens", "dtype", "device", "memory_budget_bytes"),
    measured=lambda metrics: (metrics.get("max_batch") or 0) > 0,
    nothing_measured="not even batch 1 fits the budget at any point, so nothing was timed: raise --budget",
)


def measure(point: CapacityPoint, options: CapacityOptions, timeout_s: float, gpu: str | None = None) -> dict:
    """The search (in this process: each probe and timed run is a child of its own)."""
    from melt_bench.scenarios.measure_capacity import search_capacity

    return search_capacity(point, timeout_s, options.max_batch, gpu)
