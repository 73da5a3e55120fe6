"""One serve point: its requests (random tokens, or GSM8K questions tokenised), their arrivals
(closed loop, or Poisson with a seed), warm-up and timed serve runs through the continuous
batcher in a fresh child, and the serving figures of each run: per request TTFT, TPOT, ITL,
E2E and queueing delay; output tokens/s, requests/s, p50/p90/p99 of each latency, goodput under
the SLO, the peak memory and the K/V bytes the running requests held over time. With a budget
the slots are capacity's answer first (its probes, each a memory point in a child of its own).

Every time comes from the batcher's one clock, read after the tokens reached the host; the
median over the timed runs is the row's figure, with its spread and a verdict (stability.py).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass, replace

import torch

from melt_bench.models import load_model
from melt_bench.models.continuous_batching import Completion, ContinuousBatcher, Occupancy, Request
from melt_bench.models.kv_policy import kv_bytes_per_token
from melt_bench.running.stability import load_average, percentile, spread_fields, stability_fields
from melt_bench.scenarios.point_setup import classify_failure, kv_metrics, weights_origin
from melt_bench.scenarios.serve import ServePoint
from melt_bench.trackers.memory_trackers import RunPeakMeter
from melt_bench.units import parse_dtype

LATENCIES = ("ttft", "tpot", "itl", "e2e", "queue")
PERCENTILES = (50, 90, 99)
STABILITY_FIGURES = ("output_tokens_per_s", "tpot_ms_p90")
OCCUPANCY_SAMPLES = 256  # the K/V-in-use series a row keeps, at most


@dataclass(frozen=True)
class PromptSpec:
    prompt: tuple[int, ...]
    output_tokens: int


def random_prompts(point: ServePoint, vocab_size: int) -> list[PromptSpec]:
    """`num_requests` prompts of `seq_len` random token ids (seeded), each asking for `new_tokens`."""
    generator = torch.Generator().manual_seed(point.seed)
    ids = torch.randint(1, vocab_size, (point.num_requests, point.seq_len), generator=generator)
    return [PromptSpec(tuple(row), point.new_tokens) for row in ids.tolist()]


def gsm8k_prompts(point: ServePoint, tokenizer) -> list[PromptSpec]:
    """`num_requests` GSM8K test questions (seeded sample), tokenised; each asks for as many
    tokens as its reference answer holds, at most `new_tokens`."""
    rows = load_gsm8k_test(point.data_dir)
    chosen = random.Random(point.seed).sample(range(len(rows)), min(point.num_requests, len(rows)))
    specs = []
    for index in chosen:
        question, answer = rows[index]["question"], rows[index]["answer"]
        prompt = tuple(tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"])
        answer_tokens = len(tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
        specs.append(PromptSpec(prompt, max(1, min(answer_tokens, point.new_tokens))))
    return specs


def load_gsm8k_test(data_dir: str | None) -> list[dict]:
    """GSM8K's test split: from a local copy (DIR/gsm8k/test.jsonl or DIR/test.jsonl), else the hub."""
    if data_dir is not None:
        from pathlib import Path

        from melt_bench.evaluation.task_files import checked_task_files
        from melt_bench.running.jsonl import iter_jsonl

        path = checked_task_files(Path(data_dir), "gsm8k")["test"]
        return [row for _, row in iter_jsonl(path)]
    from datasets import load_dataset

    return list(load_dataset("openai/gsm8k", "main", split="test"))


def arrivals(point: ServePoint) -> list[float]:
    """Open loop: Poisson arrivals at `request_rate` per second (seeded), the first at 0, as
    `vllm bench serve` sends them. Closed loop: all 0 (the batcher lets them in)."""
    if point.load != "rate":
        return [0.0] * point.num_requests
    rng = random.Random(point.seed)
    times, now = [], 0.0
    for _ in range(point.num_requests):
        times.append(now)
        now += rng.expovariate(point.request_rate)
    return times


def build_requests(specs: list[PromptSpec], times: list[float]) -> list[Request]:
    """EOS is ignored (no stop tokens): every output has its asked length, as in vLLM's random
    dataset with ignore_eos, so runs of different models serve the same tokens."""
    return [Request(index, spec.prompt, spec.output_tokens, arrival_s=at)
            for index, (spec, at) in enumerate(zip(specs, times))]


def run_figures(done: list[Completion], duration_s: float, slo: tuple[float | None, float | None]) -> dict:
    """One run's serving figures: throughput, and each latency's mean and percentiles in ms."""
    output_tokens = sum(len(c.tokens) for c in done)
    figures = {"duration_s": duration_s, "completed_requests": len(done), "output_tokens": output_tokens,
               "input_tokens": sum(c.prompt_tokens for c in done),
               "output_tokens_per_s": output_tokens / duration_s, "requests_per_s": len(done) / duration_s}
    samples = {"ttft": [c.ttft_s for c in done], "tpot": [c.tpot_s for c in done if c.tpot_s is not None],
               "itl": [gap for c in done for gap in c.itl_s], "e2e": [c.e2e_s for c in done],
               "queue": [c.queue_s for c in done]}
    for name, values in samples.items():
        values_ms = [1000 * v for v in values]
        figures[f"{name}_ms_mean"] = statistics.fmean(values_ms) if values_ms else None
        for q in PERCENTILES:
            figures[f"{name}_ms_p{q}"] = percentile(values_ms, q) if values_ms else None
    ttft_limit, tpot_limit = slo
    if ttft_limit is not None or tpot_limit is not None:
        met = [c for c in done if meets_slo(c, ttft_limit, tpot_limit)]
        figures["goodput_requests_per_s"] = len(met) / duration_s
        figures["slo_attained_fraction"] = len(met) / len(done) if done else 0.0
    return figures


def meets_slo(done: Completion, ttft_ms: float | None, tpot_ms: float | None) -> bool:
    """Within every limit given (a one-token output has no TPOT to miss)."""
    if ttft_ms is not None and 1000 * done.ttft_s > ttft_ms:
        return False
    return tpot_ms is None or done.tpot_s is None or 1000 * done.tpot_s <= tpot_ms


def request_records(done: list[Completion]) -> list[dict]:
    """Every request of a run, its own figures in ms (the ITLs all kept)."""
    return [{"request_id": c.request_id, "slot": c.slot, "prompt_tokens": c.prompt_tokens,
             "output_tokens": len(c.tokens), "finish_reason": c.finish_reason, "ttft_ms": 1000 * c.ttft_s,
             "tpot_ms": None if c.tpot_s is None else 1000 * c.tpot_s, "e2e_ms": 1000 * c.e2e_s,
             "queue_ms": 1000 * c.queue_s, "itl_ms": [1000 * gap for gap in c.itl_s],
             "exit_loops": c.exit_loops, "loops_run": c.loops_run}
            for c in sorted(done, key=lambda c: c.request_id)]


def exit_figures(done: list[Completion], loops: int) -> dict:
    """Early exit in a batch: each decoded token's own exit loop, the loops its step ran (the
    batch runs until its last token exits), what that saved against every loop, and the loops
    computed past a token's own exit that the batch did not save."""
    exits = [e for c in done for e in c.exit_loops[1:]]
    runs = [r for c in done for r in c.loops_run[1:]]
    if not exits:
        return {}
    return {"exit_loop_mean": statistics.fmean(exits), "loops_run_mean": statistics.fmean(runs),
            "loops_saved_fraction": 1 - statistics.fmean(runs) / loops,
            "loops_past_exit_mean": statistics.fmean(r - e for r, e in zip(runs, exits)),
            "exit_source": "per decoded token (the prefill's first token runs every loop)"}


def kv_in_use(series: list[Occupancy], bytes_per_token: int) -> dict:
    """The K/V bytes the running requests held after each admission and step (their tokens times
    the policy's bytes per token), sampled to at most OCCUPANCY_SAMPLES entries."""
    step = max(1, len(series) // OCCUPANCY_SAMPLES)
    kept = series[::step]
    held = [o.tokens_held for o in series] or [0]
    return {"kv_in_use_bytes_max": max(held) * bytes_per_token,
            "kv_in_use_bytes_mean": statistics.fmean(held) * bytes_per_token,
            "requests_running_max": max((o.running for o in series), default=0),
            "requests_running_mean": statistics.fmean(o.running for o in series) if series else 0,
            "kv_in_use_series": [[round(o.time_s, 6), o.running, o.waiting, o.tokens_held * bytes_per_token]
                                 for o in kept],
            "kv_in_use_series_fields": ["time_s", "running", "waiting", "kv_bytes"],
            "kv_in_use_source": "tokens the running requests hold (prompt + decoded) x kv_bytes_per_token, after "
                                "each admission and step"}


def summarise_runs(runs: list[dict]) -> dict:
    """The median over the timed runs (a rate's upper middle, a time's lower), with spread."""
    metrics = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        if any(v is None for v in values):
            metrics[key] = None
            continue
        metrics[key] = statistics.median_high(values) if key.endswith("_per_s") else statistics.median_low(values)
        if key in STABILITY_FIGURES or key.endswith("_per_s") or "_ms_p" in key:
            metrics.update(spread_fields(key, values))
    metrics.update(stability_fields(metrics, STABILITY_FIGURES, len(runs)))
    return metrics


def serve_point(point: ServePoint, timeout_s: float, gpu: str | None = None) -> dict:
    """The row of a serve point: with a budget, capacity's search for the slots first; then the
    serve run in a fresh child (pinned to `gpu`)."""
    from melt_bench.running.executors import run_pinned
    from melt_bench.running.launcher import run_in_child

    search = {}
    if point.batch_size == 0:
        search = search_slots(point, timeout_s, gpu)
        if not search.get("max_batch"):
            return {"status": "ok", "error": None,
                    "metrics": {**search, "completed_requests": 0,
                                "serve_note": "no slot fits the budget: nothing to serve"}}
        point = replace(point, batch_size=search["max_batch"])
    outcome = run_in_child(run_pinned, (gpu, measure_serve_point, point), timeout_s)
    if outcome.status != "ok":
        return {"status": outcome.status, "error": outcome.error, "metrics": search}
    value = outcome.value
    return {**value, "metrics": {**search, **value["metrics"]}}


def search_slots(point: ServePoint, timeout_s: float, gpu: str | None) -> dict:
    """Capacity's search at the point's request length: the largest batch whose decode of
    `new_tokens` after a `seq_len`-token prompt fits the budget (a gsm8k point: its longest prompt)."""
    from melt_bench.scenarios.capacity import CapacityPoint
    from melt_bench.scenarios.measure_capacity import search_capacity

    seq_len = point.seq_len or longest_prompt(point)
    axes = {**point.axes(), "command": "capacity", "batch_size": 0, "seq_len": seq_len}
    capacity_point = CapacityPoint(**axes, memory_budget_bytes=point.memory_budget_bytes, timed_runs=0)
    found = search_capacity(capacity_point, timeout_s, point.max_slots or 256, gpu)
    metrics = found["metrics"]
    limit = f", stopped at --max-slots {point.max_slots}" if metrics["hit_batch_limit"] else ""
    return {"slots_source": f"capacity's search within {point.memory_budget_bytes:,} B at {seq_len} + "
                            f"{point.new_tokens} tokens (memory points, each in a child){limit}",
            "max_batch": metrics["max_batch"], "hit_slot_limit": metrics["hit_batch_limit"],
            "slot_search_probes": metrics["probes"], "budget_bytes": point.memory_budget_bytes}


def longest_prompt(point: ServePoint) -> int:
    from melt_bench.evaluation.byte_tokenizer import load_tokenizer

    return max(len(spec.prompt) for spec in gsm8k_prompts(point, load_tokenizer(point.weights, None)))


def measure_serve_point(point: ServePoint) -> dict:
    """Returns {"status", "error", "metrics"}; failures (an OOM among them) are data, never raised."""
    previous = torch.get_num_threads()
    threads = point.threads or (1 if point.device == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure_serve_point(point)
    finally:
        torch.set_num_threads(previous)


def _measure_serve_point(point: ServePoint) -> dict:
    metrics: dict = {"timer": "time.perf_counter after each step's tokens reached the host",
                     "torch_num_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                     "loadavg_1m_before": load_average(), "slots": point.batch_size}
    try:
        device, dtype = torch.device(point.device), parse_dtype(point.dtype)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        peaks = RunPeakMeter(device, torch.cuda if device.type == "cuda" else None)
        peaks.start()
        model = load_model(point.model, point.weights, dtype=dtype, device=device, kv_policy=point.kv_policy,
                           decode_reads=point.decode_reads, kv_quant=point.kv_quant)
        metrics.update(kv_metrics(model), **weights_origin(point.model, point.weights, model))
        if point.dataset == "gsm8k":
            from melt_bench.evaluation.byte_tokenizer import load_tokenizer

            specs = gsm8k_prompts(point, load_tokenizer(point.weights, None))
            metrics["dataset_source"] = (f"GSM8K test, {len(specs)} questions (seed {point.seed}); outputs as long as "
                                         f"their reference answers, at most {point.new_tokens} tokens, EOS ignored")
        else:
            specs = random_prompts(point, model.config.vocab_size)
            metrics["dataset_source"] = f"random token ids (seed {point.seed}), EOS ignored"
        requests = build_requests(specs, arrivals(point))
        capacity = max(len(s.prompt) + s.output_tokens for s in specs)
        concurrency = point.concurrency if point.load == "concurrency" else None
        with torch.inference_mode():
            batcher = ContinuousBatcher(model, point.loops, point.batch_size, capacity, point.engine,
                                        point.early_exit)
            metrics.update(engine=point.engine, engine_description=batcher.engine.description,
                           prefill_engine="eager: model.forward(), one request at a time into its slot",
                           slot_capacity_tokens=capacity, kv_allocated_bytes=batcher.engine.cache.nbytes())
            warm = requests[:max(1, min(len(requests), point.batch_size))]
            for index in range(point.warmup):  # a compiled engine compiles here
                started = time.perf_counter()
                batcher.run([replace(r, arrival_s=0.0) for r in warm], concurrency=len(warm))
                if index == 0:
                    metrics["first_run_s"] = time.perf_counter() - started
            runs, run_peaks, completions, occupancies = [], [], [], []
            slo = (point.slo_ttft_ms, point.slo_tpot_ms)
            for _ in range(point.timed_runs):
                peaks.begin_run()
                done = batcher.run(requests, concurrency=concurrency)
                run_peaks.append(peaks.end_run())
                # the run lasts from its start to its last token (every request finished)
                runs.append(run_figures(done, max(c.token_times_s[-1] for c in done), slo))
                completions.append(done)
                occupancies.append((batcher.occupancy, batcher.steps))
        metrics.update(summarise_runs(runs), loadavg_1m_after=load_average())
        middle = [r["output_tokens_per_s"] for r in runs].index(metrics["output_tokens_per_s"])
        occupancy, steps = occupancies[middle]
        per_token = kv_bytes_per_token(model.config, point.loops, dtype, point.kv_policy)
        metrics.update(requests=request_records(completions[middle]), decode_steps=steps,
                       median_run_source=f"requests, decode_steps, kv_in_use_* and the exit figures: timed run "
                                         f"{middle + 1} of {len(runs)}, the one whose output tokens/s is the median",
                       kv_bytes_per_token=per_token, **kv_in_use(occupancy, per_token),
                       **exit_figures(completions[middle], point.loops))
        metrics.update(peak_bytes=max(run_peaks), timed_run_peak_bytes=run_peaks, peak_source=peaks.source)
        if point.slo_ttft_ms is not None or point.slo_tpot_ms is not None:
            metrics["slo"] = {"ttft_ms": point.slo_ttft_ms, "tpot_ms": point.slo_tpot_ms}
        return {"status": "ok", "error": None, "metrics": metrics}
    except Exception as exc:
        return {"status": classify_failure(exc), "error": f"{type(exc).__name__}: {exc}"[:2000], "metrics": metrics}
