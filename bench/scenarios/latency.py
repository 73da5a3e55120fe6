"""`melt-bench latency`: its options, its point, its end-of-sweep table, and its measurement
(`measure`, which runs scenarios/measure_latency.py in the point's child). Torch-free: the
command line builds these before torch loads."""

from __future__ import annotations

from dataclasses import dataclass

from melt_bench.models.names import Engine
from melt_bench.reporting.summary_tables import Column, TableSpec, ms_cell, rate_cell
from melt_bench.running.sweep_plan import SweepPoint


@dataclass(frozen=True)
class LatencyPoint(SweepPoint):
    """Timed prefill and decode of one run: the sweep's axes, the engine and the timing."""

    # Ouro-family models: prefill in chunks of this many tokens (None = one chunk)
    prefill_chunk: int | None = None
    warmup: int = 0  # untimed runs first
    timed_runs: int = 0
    early_exit: float | None = None  # early-stop threshold, None = off
    engine: Engine = "eager"  # eager | compiled (the same step function) | forward (the model's forward)
    static_cache: bool = False  # forward engine: allocate the cache ahead
    # --threads: torch intra-op threads in the child (None: 1 on a CPU, torch's default on CUDA)
    threads: int | None = None

    @property
    def timed(self) -> bool:
        return self.timed_runs > 0


@dataclass(frozen=True)
class LatencyOptions:
    """latency's own flags (checked by the command: engine names, counts)."""

    warmup: int = 2
    timed_runs: int = 5
    early_exit: float | None = None
    engine: Engine = "eager"
    static_cache: bool = False
    prefill_chunk: int | None = None
    threads: int | None = None

    def point(self, axes: SweepPoint) -> LatencyPoint:
        return LatencyPoint(**axes.axes(), prefill_chunk=self.prefill_chunk, warmup=self.warmup,
                            timed_runs=self.timed_runs, early_exit=self.early_exit, engine=self.engine,
                            static_cache=self.static_cache, threads=self.threads)


SUMMARY = TableSpec(
    "latency", "latency (median over timed runs)",
    [Column(" prefill", ms_cell("prefill_ms")), Column(" decode/token", ms_cell("decode_ms_per_token_mean")),
     Column(" roofline/token", ms_cell("roofline_decode_ms_per_token")),
     Column(" MBU", lambda m: f"{m['decode_mbu']:.1%}" if m.get("decode_mbu") is not None else "-"),
     Column(" tok/s", rate_cell("decode_tokens_per_s"))],
    "decode_ms_per_token_mean", "decode ms/token", ("phase", "seq_len", "batch_size", "dtype", "device", "engine"),
)


def measure(point: LatencyPoint) -> dict:
    """The point's measurement (in its child): prefill, decode steps, roofline, energy."""
    from melt_bench.scenarios.measure_latency import measure_latency_point

    return measure_latency_point(point)
