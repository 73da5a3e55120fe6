"""`melt-bench memory | latency | capacity`: sweeps of points, each measured in a fresh child."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional

import typer

from melt_bench.commands.app import UserError, app
from melt_bench.commands.options import (
    PREFILL_CHUNK,
    SUITE,
    THREADS,
    run_flags,
    sweep_flags,
)
from melt_bench.commands.support import (
    Placement,
    RunOptions,
    check_prefill_chunk,
    checked_points,
    device_total_bytes,
    parse_budget,
    parse_early_exit,
    plan_and_run,
    resolve,
)
from melt_bench.running.sweep_options import SweepFlags


@app.command()
@sweep_flags()
@run_flags()
def memory(
    phase: Optional[str] = typer.Option(None, help="prefill | decode | generate (default: decode)"),
    suite: Optional[str] = SUITE,
    repeats: Optional[int] = typer.Option(None, help="measure each point this many times, each in a fresh process "
                                          "(default: 2 on CPU, 1 on CUDA)"),
    nvml_interval_ms: float = typer.Option(10.0, "--nvml-interval-ms", help="NVML sampling interval"),
    cpu_workers: Optional[int] = typer.Option(None, "--cpu-workers", help="CPU sweeps: points measured at once, each "
                                              "in its own child with one intra-op thread (its peak is its own "
                                              "resident set); default: the machine's cores"),
    prefill_chunk: Optional[int] = PREFILL_CHUNK,
    flags: SweepFlags = None,
    run: RunOptions = None,
    placement: Placement = None,
) -> None:
    """Peak memory across loops x sequence lengths x batch sizes x models, every source measured."""
    if nvml_interval_ms <= 0:
        raise UserError(f"--nvml-interval-ms: {nvml_interval_ms:g} must be positive")
    if cpu_workers is not None and cpu_workers < 1:
        raise UserError(f"--cpu-workers: {cpu_workers} must be at least 1")
    flags = replace(flags, phase=phase, repeats=repeats)
    prefill_chunk = check_prefill_chunk(prefill_chunk)
    resolved = resolve("memory", flags, suite, run)
    from melt_bench.running.sweep import in_child
    from melt_bench.scenarios import memory as scenario

    options = scenario.MemoryOptions(prefill_chunk, nvml_interval_ms)
    points = checked_points(resolved, options)
    workers = (cpu_workers or os.cpu_count() or 1) if resolved.spec.device == "cpu" else 1
    plan_and_run(scenario.SUMMARY, resolved, points,
                 lambda: in_child(scenario.measure, (options,), resolved.point_timeout), run,
                 replace(placement, cpu_workers=workers))


@app.command()
@sweep_flags()
@run_flags()
def latency(
    warmup: int = typer.Option(2, help="untimed runs before the timed ones (the first one's time is reported apart)"),
    repeats: int = typer.Option(5, help="timed runs per point; figures are medians with min and max"),
    early_exit: str = typer.Option("off", "--early-exit", help="off | threshold:P (stop the loop once every "
                                   "sequence's exit probability reaches P)"),
    engine: str = typer.Option("eager", "--engine", help="eager | compiled: the same static-shape decode step, "
                               "as is or through torch.compile (CUDA graphs on CUDA); forward: the model's "
                               "forward() per token, as generate() calls it"),
    static_cache: bool = typer.Option(False, "--static-cache", help="--engine forward: allocate the KV cache ahead "
                                      "at full size (default: a growing cache; eager and compiled always do)"),
    threads: Optional[int] = THREADS,
    prefill_chunk: Optional[int] = PREFILL_CHUNK,
    suite: Optional[str] = SUITE,
    flags: SweepFlags = None,
    run: RunOptions = None,
    placement: Placement = None,
) -> None:
    """Prefill (time to first token), per-token decode latency and tokens/s across loops."""
    if warmup < 0 or repeats < 1:
        raise UserError(f"--warmup must be >= 0 and --repeats >= 1 (got {warmup}, {repeats})")
    flags = replace(flags, phase="decode")
    check_engine(engine)
    if static_cache and engine != "forward":
        raise UserError("--static-cache applies to --engine forward (eager and compiled always preallocate)")
    threshold, prefill_chunk = parse_early_exit(early_exit), check_prefill_chunk(prefill_chunk)
    check_threads(threads)
    resolved = resolve("latency", flags, suite, run)
    from melt_bench.running.sweep import in_child
    from melt_bench.scenarios import latency as scenario

    options = scenario.LatencyOptions(warmup, repeats, threshold, engine, static_cache, prefill_chunk,
                                      threads)
    points = checked_points(resolved, options)
    plan_and_run(scenario.SUMMARY, resolved, points, lambda: in_child(scenario.measure, (), resolved.point_timeout),
                 run, placement)


@app.command()
@sweep_flags(batch_sizes=False)
@run_flags()
def capacity(
    budget: str = typer.Option(..., help="memory budget, e.g. 80GiB, 512MiB, or auto (a GPU's total memory)"),
    max_batch: int = typer.Option(4096, "--max-batch", help="largest batch the search tries"),
    engine: str = typer.Option("eager", "--engine", help="the decode engine throughput is timed with (as latency)"),
    warmup: int = typer.Option(1, help="untimed decode runs before the timed ones (throughput)"),
    timed_runs: int = typer.Option(3, "--timed-runs", help="timed decode runs at the largest batch and at batch 1 "
                                   "(throughput: their median); 0 finds the batch only"),
    threads: Optional[int] = THREADS,
    prefill_chunk: Optional[int] = PREFILL_CHUNK,
    suite: Optional[str] = SUITE,
    flags: SweepFlags = None,
    run: RunOptions = None,
    placement: Placement = None,
) -> None:
    """The largest batch that decodes N new tokens within a memory budget, and its decode tokens/s."""
    check_throughput_flags(max_batch, engine, warmup, timed_runs)
    check_threads(threads)
    flags = replace(flags, batch_sizes="1", phase="decode")  # the batch is searched
    budget_bytes, prefill_chunk = parse_budget(budget), check_prefill_chunk(prefill_chunk)
    resolved = resolve("capacity", flags, suite, run)
    from melt_bench.running.sweep import in_this_process
    from melt_bench.scenarios import capacity as scenario

    if budget_bytes is None:  # auto
        budget_bytes = device_total_bytes(resolved.spec.device)
    options = scenario.CapacityOptions(budget_bytes, max_batch, engine, warmup, timed_runs, prefill_chunk,
                                       threads)
    points = checked_points(resolved, options)
    # the search runs its probes, each in a child of its own
    runner = in_this_process(scenario.measure, (options, resolved.point_timeout))
    plan_and_run(scenario.SUMMARY, resolved, points, lambda: runner, run, placement)


def check_throughput_flags(max_batch: int, engine: str, warmup: int, timed_runs: int) -> None:
    """capacity's own numbers, refused in one line before torch loads."""
    if max_batch < 1:
        raise UserError(f"--max-batch: {max_batch} must be at least 1")
    check_engine(engine)
    if warmup < 0 or timed_runs < 0:
        raise UserError(f"--warmup and --timed-runs must be >= 0 (got {warmup}, {timed_runs})")


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise UserError(f"--threads: {threads} must be at least 1")


def check_engine(engine: str) -> None:
    """--engine (latency, capacity's throughput), refused in one line before torch loads."""
    from melt_bench.models.names import LATENCY_ENGINES

    if engine not in LATENCY_ENGINES:
        raise UserError(f"--engine: {engine!r} is not one of {', '.join(LATENCY_ENGINES)}")
