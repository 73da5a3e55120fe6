"""One latency point, inside its own child process: prefill (= time to first token) and a decode
loop we own, timed with CUDA events on a GPU (one synchronise at the end of a run, not one per
step) and perf_counter_ns on a CPU. The model is loaded once, outside the timed region; warm-up
runs are not counted, and the first of them is reported apart (it holds compile time)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from melt_bench.models import load_model

from .measure_memory import classify_failure
from .sweep_plan import SweepPoint
from .units import parse_dtype


class Marks:
    """Timestamps at chosen points of a run; intervals between consecutive marks in ms."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.events: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        else:
            self.events.append(time.perf_counter_ns())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.events, self.events[1:])]
        return [(b - a) / 1e6 for a, b in zip(self.events, self.events[1:])]


@dataclass
class RunTiming:
    prefill_ms: float
    step_ms: list[float]
    loops_run: list[int] = field(default_factory=list)  # per decode step (the batch's)
    exit_loops: list[float] = field(default_factory=list)  # per step, mean 1-based exit loop of the sequences


def timed_run(model, point: SweepPoint, input_ids: torch.Tensor) -> RunTiming:
    """Prefill, then exactly `new_tokens` greedy steps (EOS ignored)."""
    cache = (
        model.new_cache(point.loops, capacity=point.seq_len + point.new_tokens, batch_size=point.batch_size)
        if point.static_cache else model.new_cache(point.loops)
    )
    marks = Marks(input_ids.device.type == "cuda")
    timing = RunTiming(0.0, [])
    marks.mark()
    logits = model(input_ids, past_key_values=cache, loops=point.loops, logits_to_keep=1).logits
    marks.mark()
    for _ in range(point.new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out = model(token, past_key_values=cache, loops=point.loops, early_stop_threshold=point.early_exit)
        logits = out.logits
        marks.mark()
        timing.loops_run.append(out.loops_run)
        if out.exit_steps is not None:
            timing.exit_loops.append(float(out.exit_steps.float().mean()) + 1)
    intervals = marks.intervals_ms()
    timing.prefill_ms, timing.step_ms = intervals[0], intervals[1:]
    return timing


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(runs: list[RunTiming], batch: int) -> dict:
    """Per-run figures, then the median over runs with min and max beside each."""
    per_run: dict[str, list[float]] = {key: [] for key in (
        "prefill_ms", "decode_ms_per_token_mean", "decode_ms_per_token_p50", "decode_ms_per_token_p90",
        "decode_tokens_per_s", "e2e_tokens_per_s")}
    for run in runs:
        decode_ms = sum(run.step_ms)
        tokens = batch * len(run.step_ms)
        per_run["prefill_ms"].append(run.prefill_ms)
        per_run["decode_ms_per_token_mean"].append(decode_ms / len(run.step_ms))
        per_run["decode_ms_per_token_p50"].append(percentile(run.step_ms, 50))
        per_run["decode_ms_per_token_p90"].append(percentile(run.step_ms, 90))
        per_run["decode_tokens_per_s"].append(tokens / (decode_ms / 1000))
        per_run["e2e_tokens_per_s"].append(tokens / ((run.prefill_ms + decode_ms) / 1000))
    metrics = {}
    for key, values in per_run.items():
        metrics[key] = statistics.median(values)
        metrics[f"{key}_min"] = min(values)
        metrics[f"{key}_max"] = max(values)
    metrics["ttft_ms"] = metrics["prefill_ms"]  # the first token comes out of the prefill
    metrics["tokens_generated_per_run"] = batch * len(runs[0].step_ms)
    loops_run = [n for run in runs for n in run.loops_run]
    metrics["loops_executed_mean"] = sum(loops_run) / len(loops_run)
    exit_loops = [x for run in runs for x in run.exit_loops]
    if exit_loops:
        metrics["exit_loop_mean_per_sequence"] = sum(exit_loops) / len(exit_loops)
    return metrics


def measure_latency_point(point: SweepPoint) -> dict:
    """Returns {"status", "error", "metrics"}; failures are data, never raised."""
    metrics: dict = {"timer": "cuda events" if point.device.startswith("cuda") else "perf_counter_ns"}
    try:
        device = torch.device(point.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model = load_model(point.model, point.weights, dtype=parse_dtype(point.dtype), device=device)
        if point.compile:
            # The fusion-friendly parts only: the cache bookkeeping in attention changes shape
            # and slot every call and would recompile without end.
            for layer in model.model.layers:
                for name in ("mlp", "input_layernorm", "input_layernorm_2", "post_attention_layernorm",
                             "post_attention_layernorm_2"):
                    setattr(layer, name, torch.compile(getattr(layer, name), dynamic=True))
            metrics["compile_scope"] = "mlp and norms (torch.compile, dynamic shapes)"
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(1, model.config.vocab_size, (point.batch_size, point.seq_len), generator=generator)
        input_ids = input_ids.to(device)
        runs = []
        with torch.inference_mode():
            for index in range(point.warmup + point.timed_runs):
                started = time.perf_counter()
                run = timed_run(model, point, input_ids)
                if index == 0:
                    metrics["first_run_s"] = time.perf_counter() - started
                if index >= point.warmup:
                    runs.append(run)
        metrics.update(summarise(runs, point.batch_size))
        return {"status": "ok", "error": None, "metrics": metrics}
    except Exception as exc:
        return {"status": classify_failure(exc), "error": f"{type(exc).__name__}: {exc}"[:2000], "metrics": metrics}
