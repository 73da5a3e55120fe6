"""Capacity: the largest batch that completes a decode of N new tokens within a memory budget, and
what that batch is worth in decode tokens per second.

A real search that runs points (each probe a memory measurement in its own child), not a
formula: the analytic KV model only chooses where to start. Assumes a batch that fits implies
every smaller one fits; a probe fits when it finishes without OOM and its peak (the CUDA
allocator's, or the process RSS above baseline on a CPU) is within the budget. Then, when the
point asks for timed runs, the latency machinery (its engine, warm-up, timed runs, roofline)
measures steady-state decode at the largest batch and at batch 1, each in a fresh child:
throughput is measured, never derived from the batch size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from melt_bench.models import count_parameters, get_preset, kv_bytes_per_token
from melt_bench.models.kv_policy import kv_side_buffer_bytes
from melt_bench.scenarios.capacity import CapacityPoint
from melt_bench.units import parse_dtype


@dataclass
class Probe:
    batch_size: int
    fits: bool
    status: str
    peak_bytes: int | None


@dataclass
class SearchResult:
    max_batch: int  # 0 when even batch 1 does not fit
    start_batch: int
    probes: list[Probe] = field(default_factory=list)
    hit_limit: bool = False  # stopped at max_batch_limit without a failure


def find_max_batch(probe: Callable[[int], Probe], start: int, limit: int = 4096) -> SearchResult:
    """Exponential search from `start` (up while it fits, down while it does not), then
    bisection between the last fit and the first failure. Each batch is probed at most once."""
    start = max(1, min(start, limit))
    result = SearchResult(0, start)
    seen: dict[int, Probe] = {}

    def fits(batch: int) -> bool:
        if batch not in seen:
            seen[batch] = probe(batch)
            result.probes.append(seen[batch])
        return seen[batch].fits

    if fits(start):
        good, bad = start, None
        while bad is None:
            if good == limit:
                result.max_batch, result.hit_limit = good, True
                return result
            trial = min(good * 2, limit)
            if fits(trial):
                good = trial
            else:
                bad = trial
    else:
        good, bad = 0, start
        while bad > 1:
            trial = bad // 2
            if fits(trial):
                good = trial
                break
            bad = trial
        if good == 0:
            return result
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    result.max_batch = good
    return result


def analytic_start(model: str, loops: int, tokens: int, dtype: str, budget_bytes: int,
                   kv_policy: str | None = None, decode_reads: str | None = None, kv_quant: str | None = None) -> int:
    """Where the search starts: the batch whose weights + KV cache alone fill the budget."""
    preset = get_preset(model)
    torch_dtype = parse_dtype(dtype)
    weights = count_parameters(preset) * torch.empty((), dtype=torch_dtype).element_size()
    config = preset.config()
    if decode_reads is not None:
        config.decode_reads = decode_reads
    per_sequence = (kv_bytes_per_token(config, loops, torch_dtype, kv_policy, kv_quant) * tokens
                    + kv_side_buffer_bytes(config, loops, torch_dtype, tokens))
    return max(1, (budget_bytes - weights) // max(per_sequence, 1))


def probe_fits(row: dict, budget_bytes: int) -> Probe:
    """A probe's verdict from its memory row: finished, and peaked within the budget."""
    peak = row["metrics"].get("peak_bytes")
    fits = row["status"] == "ok" and peak is not None and peak <= budget_bytes
    return Probe(row["batch_size"], fits, row["status"], peak)


def search_capacity(point: CapacityPoint, timeout_s: float, limit: int = 4096, gpu: str | None = None) -> dict:
    """Run the search for one (model, loops, seq_len) point within its budget; returns the row's
    status/metrics. Every probe runs in a fresh child (pinned to `gpu` when given: --gpus, Ray)."""
    from dataclasses import asdict

    from melt_bench.running.executors import run_pinned
    from melt_bench.running.launcher import run_in_child
    from melt_bench.scenarios.measure_memory import measure_memory_point

    budget_bytes = point.memory_budget_bytes
    origin = {}  # where the probes' weights came from (point_setup.weights_origin), for the row

    def probe(batch: int) -> Probe:
        outcome = run_in_child(run_pinned, (gpu, measure_memory_point, point.probe(batch), 10.0, None, budget_bytes),
                               timeout_s)
        if outcome.status != "ok":
            return Probe(batch, False, "timeout" if outcome.status == "timeout" else "error", None)
        origin.update({k: v for k, v in outcome.value["metrics"].items() if k in WEIGHTS_FIELDS})
        return probe_fits({**outcome.value, "batch_size": batch}, budget_bytes)

    start = analytic_start(point.model, point.loops, point.seq_len + point.new_tokens, point.dtype, budget_bytes,
                           point.kv_policy, point.decode_reads, point.kv_quant)
    result = find_max_batch(probe, start, limit)
    failed = [p for p in result.probes if p.status not in ("ok", "oom")]
    status = "error" if failed and result.max_batch == 0 else "ok"
    fitting = [p for p in result.probes if p.fits and p.batch_size == result.max_batch]
    metrics = {
        "max_batch": result.max_batch,
        "start_batch": result.start_batch,
        "hit_batch_limit": result.hit_limit,
        "budget_bytes": budget_bytes,
        "peak_bytes_at_max_batch": fitting[0].peak_bytes if fitting else None,
        "probes": [asdict(p) for p in result.probes],
        **origin,
    }
    error = f"probe at batch {failed[0].batch_size}: {failed[0].status}" if status == "error" else None
    if point.timed_runs > 0:
        metrics.update(throughput_at_budget(point, result.max_batch, timeout_s, gpu))
    return {"status": status, "error": error, "metrics": metrics}


# What a throughput row keeps from a latency measurement, and under which name (units in them).
THROUGHPUT_FIGURES = {"decode_tokens_per_s": "decode_tokens_per_s", "decode_ms_per_token_mean": "decode_ms_per_step",
                      "decode_mbu": "decode_mbu"}


WEIGHTS_FIELDS = ("weights_source", "weights_from", "weights_revision", "melt_gate")  # point_setup.weights_origin
SPREAD_PARTS = ("_min", "_p10", "_p90", "_max", "_cv")  # stability.spread_fields


def throughput_at_budget(point: CapacityPoint, max_batch: int, timeout_s: float, gpu: str | None) -> dict:
    """Decode tokens/s and ms per step (one token for every sequence) at the largest batch that
    fit and at batch 1, each measured by measure_latency_point in a fresh child with the point's
    engine, warm-up and timed runs (one measurement when the largest batch is 1, and the row says
    so). Each timed run's own peak is kept beside its figures, and a run that went over the budget
    is named. A budget no batch fits has nothing to time: it says so."""
    metrics = {"throughput_engine": point.engine}
    if max_batch < 1:
        metrics["throughput_note"] = "no batch fits the budget: no throughput to measure"
        return metrics
    batches = [(max_batch, "at_max_batch")] + ([(1, "at_batch_1")] if max_batch > 1 else [])
    timed = []
    for batch, suffix in batches:
        figures, problem = _timed_decode(point, batch, timeout_s, gpu)
        metrics.update({f"{name}_{suffix}": figures.get(key) for key, name in THROUGHPUT_FIGURES.items()})
        for key, name in list(THROUGHPUT_FIGURES.items())[:2]:  # the timed figures' spread over the runs
            metrics.update({f"{name}_{suffix}{part}": figures.get(f"{key}{part}") for part in SPREAD_PARTS})
        metrics[f"timing_stability_{suffix}"] = figures.get("timing_stability")
        for key in ("torch_num_threads", "cpu_count", "timing_stability_rule"):
            metrics.setdefault(key, figures.get(key))
        metrics.setdefault("loadavg_1m_before", figures.get("loadavg_1m_before"))
        metrics["loadavg_1m_after"] = figures.get("loadavg_1m_after")
        if problem:
            metrics[f"throughput_error_{suffix}"] = problem
            continue
        timed.append(f"batch {batch}")
        runs = figures.get("timed_run_peak_bytes") or []
        metrics[f"timed_run_peak_bytes_{suffix}"] = runs
        over = [peak for peak in runs if peak > point.memory_budget_bytes]
        if over:
            metrics[f"throughput_over_budget_{suffix}"] = (
                f"{len(over)} of {len(runs)} timed runs at batch {batch} peaked above the budget of "
                f"{point.memory_budget_bytes:,} B (largest {max(over):,} B; {figures.get('timed_run_peak_source')})")
    verdicts = [metrics.get(f"timing_stability_{suffix}") for _, suffix in batches]
    metrics["timing_stability"] = next((v for v in ("unstable", "unknown") if v in verdicts), "stable")
    if max_batch == 1 and "throughput_error_at_max_batch" not in metrics:
        metrics.update({f"{name}_at_batch_1{part}": metrics.get(f"{name}_at_max_batch{part}")
                        for name in THROUGHPUT_FIGURES.values() for part in ("", *SPREAD_PARTS)})
        for key in ("timed_run_peak_bytes", "throughput_over_budget"):
            if f"{key}_at_max_batch" in metrics:
                metrics[f"{key}_at_batch_1"] = metrics[f"{key}_at_max_batch"]
        metrics["throughput_at_batch_1_source"] = "the measurement at the largest batch, which is 1"
    metrics["throughput_source"] = (
        f"measure_latency_point, engine {point.engine}: median of {point.timed_runs} timed runs after "
        f"{point.warmup} warm-up, at {' and '.join(timed)}" if timed
        else "no timed run finished: see throughput_error_*")
    return metrics


def _timed_decode(point: CapacityPoint, batch: int, timeout_s: float, gpu: str | None) -> tuple[dict, str | None]:
    from melt_bench.running.executors import run_pinned
    from melt_bench.running.launcher import run_in_child
    from melt_bench.scenarios.measure_latency import measure_latency_point

    outcome = run_in_child(run_pinned, (gpu, measure_latency_point, point.timed_at(batch)), timeout_s)
    if outcome.status != "ok":
        return {}, f"batch {batch}: {outcome.status} ({outcome.error})"
    if outcome.value["status"] != "ok":
        return {}, f"batch {batch}: {outcome.value['status']} ({outcome.value['error']})"
    return outcome.value["metrics"], None
