"""`melt-bench memory`: its options, its point, its end-of-sweep table, and its measurement
(`measure`, which runs scenarios/measure_memory.py in the point's child). Torch-free: the command
line builds these before torch loads."""

from __future__ import annotations

from dataclasses import dataclass

from melt_bench.reporting.summary_tables import Column, TableSpec, bytes_cell
from melt_bench.running.sweep_plan import SweepPoint
from melt_bench.units import format_bytes


@dataclass(frozen=True)
class MemoryPoint(SweepPoint):
    """The peak memory of one run: the sweep's axes, and how the prompt is prefilled."""

    # Ouro-family models: prefill in chunks of this many tokens (None = one chunk; MELT chunks by
    # its config's chunk_size)
    prefill_chunk: int | None = None


@dataclass(frozen=True)
class MemoryOptions:
    """memory's own flags."""

    prefill_chunk: int | None = None
    nvml_interval_ms: float = 10.0  # how often the NVML sampler reads the device (CUDA)

    def point(self, axes: SweepPoint) -> MemoryPoint:
        return MemoryPoint(**axes.axes(), prefill_chunk=self.prefill_chunk)


SUMMARY = TableSpec(
    "memory", "peak memory",
    [Column("", bytes_cell("peak_bytes")), Column(" KV", lambda m: format_bytes(m.get("kv_cache_bytes")))],
    "peak_bytes", "peak",
)


def measure(point: MemoryPoint, options: MemoryOptions) -> dict:
    """The point's measurement (in its child): peak memory by every source there is."""
    from melt_bench.scenarios.measure_memory import measure_memory_point

    return measure_memory_point(point, options.nvml_interval_ms)
