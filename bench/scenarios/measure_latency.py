"""One latency point, inside its own child process: prefill (= time to first token) and a decode
loop we own, timed with CUDA events on a GPU (one synchronise at the end of a run, not one per
step) and perf_counter_ns on a CPU. The model is loaded once, outside the timed region; warm-up
runs are not counted, and the first of them is reported apart (it holds compile time).

Engines (`point.engine`): `eager` and `compiled` run the same static-shape step function
(`models/decode_engine.py`), uncompiled or through torch.compile; `forward` calls the model's
own HF forward() per token, as generate() does. Prefill is the model's forward in all three.

Every row carries its roofline: the bytes and FLOPs the config implies (models/cost_model.py),
the device's bandwidth and matmul rate measured in this child before the point, and the ratios
(MBU, MFU). On NVIDIA GPUs it also carries energy per prefill and per token (trackers/energy.py).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from melt_bench.models import cost_model, load_model
from melt_bench.models.decode_engine import DecodeEngine, StepOutput
from melt_bench.models.packed_cache import PackedKVCache
from melt_bench.running.stability import load_average, percentile, spread_fields, stability_fields
from melt_bench.scenarios.latency import LatencyPoint
from melt_bench.scenarios.point_setup import classify_failure, kv_metrics, prefill_chunking, weights_origin
from melt_bench.trackers.device_ceilings import DeviceCeilings, measure_ceilings
from melt_bench.trackers.energy import EnergyMeter, energy_metrics, open_meter
from melt_bench.trackers.memory_trackers import RunPeakMeter, nvml_index_for
from melt_bench.units import parse_dtype


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


class ForwardDecoder:
    """Decoding through the model's own forward() per token, as generate() does: a growing cache,
    or with `static_cache` one allocated ahead at full size."""

    description = "model.forward() per token"

    def __init__(self, model, point: LatencyPoint) -> None:
        self.model, self.point = model, point
        self.cache = None

    def prefill(self, input_ids: torch.Tensor, chunk_starts=None) -> StepOutput:
        point = self.point
        self.cache = None  # the previous run's cache goes first: a run's peak holds one cache
        self.cache = (
            self.model.new_cache(point.loops, capacity=point.seq_len + point.new_tokens, batch_size=point.batch_size)
            if point.static_cache else self.model.new_cache(point.loops)
        )
        logits = self.model(input_ids, past_key_values=self.cache, loops=point.loops, logits_to_keep=1,
                            chunk_starts=chunk_starts).logits[:, -1]
        return StepOutput(logits.argmax(-1, keepdim=True), logits, point.loops, None)

    def step(self, token: torch.Tensor) -> StepOutput:
        out = self.model(token, past_key_values=self.cache, loops=self.point.loops,
                         early_stop_threshold=self.point.early_exit)
        logits = out.logits[:, -1]
        return StepOutput(logits.argmax(-1, keepdim=True), logits, out.loops_run, out.exit_steps)

    def rewind(self, position: int) -> None:
        self.cache.crop(position)


# The figures whose spread over the timed runs decides a row's verdict (the rest derive from them).
STABILITY_FIGURES = ("prefill_ms", "decode_ms_per_token_mean")


@dataclass
class RunTiming:
    prefill_ms: float
    step_ms: list[float]
    loops_run: list[int] = field(default_factory=list)  # per decode step (the batch's)
    exit_loops: list[float] = field(default_factory=list)  # per step, mean 1-based exit loop of the sequences
    tokens: torch.Tensor | None = None  # (batch, 1 + new_tokens): the greedy picks, prefill's first


def timed_run(decoder, point: LatencyPoint, input_ids: torch.Tensor, chunk_starts=None) -> RunTiming:
    """Prefill, then exactly `new_tokens` greedy steps (EOS ignored)."""
    # Huginn draws a random initial state from the global RNG at every forward and step: the same
    # draws each run, so that runs (and engines, which draw alike) give the same tokens.
    torch.manual_seed(0)
    marks = Marks(input_ids.device.type == "cuda")
    timing = RunTiming(0.0, [])
    marks.mark()
    out = decoder.prefill(input_ids, chunk_starts)
    marks.mark()
    picks = [out.token]
    for _ in range(point.new_tokens):
        out = decoder.step(out.token)
        marks.mark()
        picks.append(out.token)
        timing.loops_run.append(out.loops_run)
        if out.exit_steps is not None:
            timing.exit_loops.append(float(out.exit_steps.float().mean()) + 1)
    intervals = marks.intervals_ms()
    timing.prefill_ms, timing.step_ms = intervals[0], intervals[1:]
    timing.tokens = torch.cat(picks, dim=1).cpu()
    return timing


def summarise(runs: list[RunTiming], batch: int) -> dict:
    """Per-run figures, then the median over runs (the lower middle of a time, the matching upper
    middle of a rate, for an even count) with their spread beside each (min, p10, p90, max, CV),
    and the verdict on the headline figures (stability.py)."""
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
        # The lower middle of a time, and so the upper middle of a rate (tokens over that time,
        # the same tokens each run): ms/token and tokens/s of a row describe the same run.
        metrics[key] = statistics.median_high(values) if key.endswith("_per_s") else statistics.median_low(values)
        metrics.update(spread_fields(key, values))
    metrics.update(stability_fields(metrics, STABILITY_FIGURES, len(runs)))
    metrics["ttft_ms"] = metrics["prefill_ms"]  # the first token comes out of the prefill
    metrics["tokens_generated_per_run"] = batch * len(runs[0].step_ms)
    loops_run = [n for run in runs for n in run.loops_run]
    metrics["loops_executed_mean"] = sum(loops_run) / len(loops_run)
    exit_loops = [x for run in runs for x in run.exit_loops]
    if exit_loops:
        metrics["exit_loop_mean_per_sequence"] = sum(exit_loops) / len(exit_loops)
    return metrics


def output_fields(runs: list[RunTiming]) -> dict:
    """The greedy tokens of the timed runs: a digest to compare engines by, and the ids of the
    first run (to count identical tokens where digests differ)."""
    tokens = torch.stack([run.tokens for run in runs]).to(torch.int64)
    return {
        "output_digest": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
        "output_token_ids": runs[0].tokens.tolist(),
        "output_runs_identical": all(torch.equal(run.tokens, runs[0].tokens) for run in runs),
    }


def token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions where two runs' greedy tokens agree."""
    flat_a = [t for row in a for t in row]
    flat_b = [t for row in b for t in row]
    if len(flat_a) != len(flat_b) or not flat_a:
        raise ValueError("token lists of different shapes")
    return sum(x == y for x, y in zip(flat_a, flat_b)) / len(flat_a)


def attended_rows(decoder, point: LatencyPoint) -> tuple[float, str]:
    """The K/V rows a decode step reads per (loop, layer) and sequence, as the engine reads them:
    the compiled engine (and the eager one under per-sequence positions or for Huginn) attends
    over the whole preallocated capacity (masked) at every step; the eager engine and forward()
    over the rows written so far (the mean over the decode steps)."""
    if isinstance(decoder, DecodeEngine) and not decoder.reads_filled_rows:
        capacity = decoder.cache.keys[0].shape[2]
        return float(capacity), f"the whole preallocated capacity ({capacity} rows, masked) at every step"
    return point.seq_len + (point.new_tokens + 1) / 2, "the rows written so far (mean over the decode steps)"


def roofline_fields(config, point: LatencyPoint, metrics: dict, ceilings: DeviceCeilings, packed: bool,
                    rows: tuple[float, str]) -> dict:
    """Bytes and FLOPs the config implies for this point, with the K/V rows the engine attends
    (`rows`: attended_rows), and how close the measured times are to the device's measured
    ceilings. For a packed KV cache (flashloop, --kv-quant) the byte model, which counts
    full-precision rows, does not apply: the decode-side figures are None and `roofline_source`
    says why (prefill FLOPs do not depend on the cache)."""
    dtype = parse_dtype(point.dtype)
    loops = metrics["loops_executed_mean"]
    context, rows_source = rows
    decode_bytes = cost_model.decode_bytes_per_token(config, loops, point.batch_size, context, dtype)
    decode_flops = cost_model.decode_flops_per_token(config, loops, point.batch_size, context)
    prefill_flops = cost_model.prefill_flops(config, point.loops, point.batch_size, point.seq_len)
    step_s = metrics["decode_ms_per_token_mean"] / 1000
    prefill_mfu = prefill_flops / (metrics["prefill_ms"] / 1000) / ceilings.matmul_flops_per_s
    attended = {"decode_rows_attended_per_step": context, "decode_rows_attended_source": rows_source}
    if packed:
        return {
            "decode_bytes_per_token": None, "decode_flops_per_token": decode_flops, "prefill_flops": prefill_flops,
            "roofline_decode_ms_per_token": None, "decode_bandwidth_achieved_bytes_per_s": None, "decode_mbu": None,
            "prefill_mfu": prefill_mfu, **attended,
            "roofline_source": "decode bytes unavailable for a packed KV cache: the cost model counts full-precision "
                               "rows (prefill FLOPs from models/cost_model.py)",
        }
    return {
        "decode_bytes_per_token": decode_bytes,
        "decode_flops_per_token": decode_flops,
        "prefill_flops": prefill_flops,
        "roofline_decode_ms_per_token": decode_bytes / ceilings.bandwidth_bytes_per_s * 1000,
        "decode_bandwidth_achieved_bytes_per_s": decode_bytes / step_s,
        "decode_mbu": decode_bytes / step_s / ceilings.bandwidth_bytes_per_s,
        "prefill_mfu": prefill_mfu, **attended,
        "roofline_source": "models/cost_model.py formulas over measured device ceilings, K/V rows as the engine "
                           "reads them (decode_rows_attended_source)",
    }


def make_decoder(model, point: LatencyPoint):
    if point.engine == "forward":
        return ForwardDecoder(model, point)
    return DecodeEngine(model, point.loops, point.batch_size, point.seq_len + point.new_tokens, point.engine,
                        early_stop_threshold=point.early_exit)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_energy(meter: EnergyMeter, decoder, point: LatencyPoint, input_ids: torch.Tensor, chunk_starts):
    """Energy per prefill and per generated token, in windows of repeated runs after the timed ones."""
    device = input_ids.device

    def prefill_once() -> int:
        decoder.prefill(input_ids, chunk_starts)
        _sync(device)
        return 1

    prefill = meter.measure(prefill_once)
    first = decoder.prefill(input_ids, chunk_starts)  # the prompt's rows, which each decode run rewinds to

    def decode_once() -> int:
        decoder.rewind(point.seq_len)
        token = first.token
        for _ in range(point.new_tokens):
            token = decoder.step(token).token
        _sync(device)
        return point.new_tokens * point.batch_size

    return prefill, meter.measure(decode_once)


def measure_latency_point(point: LatencyPoint, meter: EnergyMeter | str | None = None) -> dict:
    """Returns {"status", "error", "metrics"}; failures are data, never raised. `meter` replaces
    the NVML energy meter (tests pass fakes). Runs on `point.threads` intra-op threads (a CPU
    point: 1 unless told, so a run does not fight its own threads and the machine's other work
    for the cores), and gives the caller's count back after."""
    previous = torch.get_num_threads()
    threads = point.threads or (1 if point.device == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure_latency_point(point, meter)
    finally:
        torch.set_num_threads(previous)


def _measure_latency_point(point: LatencyPoint, meter: EnergyMeter | str | None) -> dict:
    metrics: dict = {"timer": "cuda events" if point.device.startswith("cuda") else "perf_counter_ns",
                     "torch_num_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                     "loadavg_1m_before": load_average()}
    try:
        device = torch.device(point.device)
        dtype = parse_dtype(point.dtype)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if meter is None:
            meter = (open_meter(nvml_index_for(device.index or 0)) if device.type == "cuda"
                     else "unavailable: no NVIDIA GPU (the point ran on the CPU)")
        if isinstance(meter, EnergyMeter):
            meter.measure_idle()  # before the model loads: the device as it idles
        ceilings = measure_ceilings(device, dtype)
        metrics.update(ceilings.to_metrics())
        peaks = RunPeakMeter(device, torch.cuda if device.type == "cuda" else None)
        peaks.start()
        model = load_model(point.model, point.weights, dtype=dtype, device=device, kv_policy=point.kv_policy,
                           decode_reads=point.decode_reads,
                           kv_quant=point.kv_quant)
        metrics.update(kv_metrics(model))  # the policy (and MELT's decode reads) the point ran under
        metrics.update(weights_origin(point.model, point.weights, model))
        chunk_starts, prefill_fields = prefill_chunking(model, point)
        metrics.update(prefill_fields)
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(1, model.config.vocab_size, (point.batch_size, point.seq_len), generator=generator)
        input_ids = input_ids.to(device)
        runs = []
        with torch.inference_mode():
            decoder = make_decoder(model, point)
            metrics["engine"] = point.engine
            metrics["engine_description"] = decoder.description
            metrics["prefill_engine"] = "eager: model.forward()"
            run_peaks = []
            for index in range(point.warmup + point.timed_runs):
                started = time.perf_counter()
                peaks.begin_run()
                run = timed_run(decoder, point, input_ids, chunk_starts)
                peak = peaks.end_run()
                if index == 0:
                    metrics["first_run_s"] = time.perf_counter() - started
                if index >= point.warmup:
                    runs.append(run)
                    run_peaks.append(peak)
            metrics.update(summarise(runs, point.batch_size), loadavg_1m_after=load_average())
            metrics.update(timed_run_peak_bytes=run_peaks, timed_run_peak_source=peaks.source)
            metrics.update(output_fields(runs))
            packed = isinstance(getattr(decoder, "cache", None), PackedKVCache)
            metrics.update(roofline_fields(model.config, point, metrics, ceilings, packed,
                                           attended_rows(decoder, point)))
            windows = (None, None)
            if packed:  # the energy windows rewind the cache to the prompt, which packed rows cannot
                meter = "unavailable: a packed KV cache cannot rewind to the prompt between energy windows"
            if isinstance(meter, EnergyMeter) and meter.available:
                windows = measure_energy(meter, decoder, point, input_ids, chunk_starts)
            metrics.update(energy_metrics(meter, *windows))
        return {"status": "ok", "error": None, "metrics": metrics}
    except Exception as exc:
        return {"status": classify_failure(exc), "error": f"{type(exc).__name__}: {exc}"[:2000], "metrics": metrics}
