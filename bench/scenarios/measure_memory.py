"""One memory point, run inside its own child process: load the model, run the phase, and read
every memory source this machine has. Returns the row's status and metrics."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from melt_bench.models import cost_model, load_model, predict_kv_cache_bytes
from melt_bench.models.kv_policy import kv_side_buffer_bytes
from melt_bench.scenarios.memory import MemoryPoint
from melt_bench.scenarios.point_setup import (
    classify_failure,
    kv_metrics,
    prefill_chunking,
    tensor_bytes,
    weights_origin,
)
from melt_bench.trackers.memory_trackers import CudaAllocatorTracker, NvmlSampler, RssTracker, nvml_index_for
from melt_bench.trackers.nvml import load_pynvml
from melt_bench.units import parse_dtype


def predicted_peak(model, point: MemoryPoint, chunk_tokens: int, tokens: int, dtype: torch.dtype) -> dict:
    """The analytic peak: weights + KV + the activation model of models/cost_model.py."""
    config = model.config
    weights = cost_model.weights_bytes(config, dtype)
    kv = predict_kv_cache_bytes(config, point.loops, point.batch_size, tokens, dtype, prompt_tokens=point.seq_len)
    activation = cost_model.activation_peak_bytes(config, point.batch_size, chunk_tokens, dtype)
    return {"predicted_weights_bytes": weights, "predicted_activation_peak_bytes": activation,
            "predicted_peak_bytes": weights + kv + activation,
            "predicted_source": "models/cost_model.py: weights + analytic KV + activation model"}


def run_phase(model, point: MemoryPoint, input_ids: torch.Tensor, chunk_starts: list[int] | None = None):
    """Run the point's phase; return the KV cache it filled and how many tokens it holds.
    prefill and decode allocate the whole cache before the first forward (as serving engines
    do); generate uses the growing cache generate() gets by default."""
    loops = point.loops
    if point.phase == "prefill":
        cache = model.new_cache(loops, capacity=point.seq_len, batch_size=point.batch_size)
        model(input_ids, past_key_values=cache, loops=loops, logits_to_keep=1, chunk_starts=chunk_starts)
        return cache, point.seq_len
    if point.phase == "decode":
        # Our own greedy loop over a preallocated cache: a fixed number of tokens, EOS ignored.
        cache = model.new_cache(loops, capacity=point.seq_len + point.new_tokens, batch_size=point.batch_size)
        logits = model(input_ids, past_key_values=cache, loops=loops, logits_to_keep=1,
                       chunk_starts=chunk_starts).logits
        for _ in range(point.new_tokens):
            token = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(token, past_key_values=cache, loops=loops).logits
        return cache, point.seq_len + point.new_tokens
    if point.phase == "generate":
        # The model's own generate(), with the growing cache it creates by default.
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), loops=loops, do_sample=False,
            max_new_tokens=point.new_tokens, min_new_tokens=point.new_tokens,
            return_dict_in_generate=True, pad_token_id=model.config.pad_token_id,
        )
        # transformers >= 5.24 names the field `cache` (`past_key_values` before)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return cache, cache.seq_len
    raise ValueError(f"unknown phase {point.phase!r}")


@dataclass
class Trackers:
    """The memory sources of one point. On a GPU: RSS, the torch allocator and NVML."""

    rss: RssTracker
    allocator: CudaAllocatorTracker | None = None
    nvml: NvmlSampler | None = None


def default_trackers(device: torch.device, nvml_interval_ms: float, metrics: dict) -> Trackers:
    trackers = Trackers(RssTracker())
    if device.type == "cuda":
        trackers.allocator = CudaAllocatorTracker(torch.cuda, device)
        try:
            trackers.nvml = NvmlSampler(load_pynvml(), nvml_index_for(device.index or 0), nvml_interval_ms / 1000)
        except Exception as exc:  # NvmlUnavailable, or a driver that refuses the device
            metrics["nvml_error"] = str(exc)
    return trackers


def measure_memory_point(
    point: MemoryPoint, nvml_interval_ms: float = 10.0, trackers: Trackers | None = None,
    budget_bytes: int | None = None,
) -> dict:
    """Measure one point in this process (a fresh child). `trackers` replaces the default
    sources (tests pass fakes of torch.cuda and pynvml). With `budget_bytes` on CUDA the torch
    allocator is capped there, so going over is a real OOM. Returns {"status", "error",
    "metrics"}; failures are data, never raised."""
    metrics: dict = {}
    device = torch.device(point.device)
    metrics["torch_num_threads"] = torch.get_num_threads()  # one when run beside other CPU points (executors.py)
    trackers = trackers or default_trackers(device, nvml_interval_ms, metrics)
    status, error = "ok", None
    started = time.perf_counter()
    trackers.rss.start()  # baseline before the model loads
    try:
        if trackers.nvml is not None:
            trackers.nvml.baseline()  # the idle device, before this process touches CUDA
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.cuda.init()
            if budget_bytes is not None:
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)
        if trackers.nvml is not None:
            metrics["nvml_after_cuda_init_bytes"] = trackers.nvml.used_bytes()
        dtype = parse_dtype(point.dtype)
        model = load_model(point.model, point.weights, dtype=dtype, device=device, kv_policy=point.kv_policy,
                           decode_reads=point.decode_reads,
                           kv_quant=point.kv_quant)
        metrics.update(kv_metrics(model))  # the policy (and MELT's decode reads) the point ran under
        metrics.update(weights_origin(point.model, point.weights, model))
        metrics["weights_bytes"] = tensor_bytes(model)
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(1, model.config.vocab_size, (point.batch_size, point.seq_len), generator=generator)
        input_ids = input_ids.to(device)
        if trackers.allocator is not None:
            trackers.allocator.start()
        if trackers.nvml is not None:
            trackers.nvml.start()
        chunk_starts, prefill_fields = prefill_chunking(model, point)
        metrics.update(prefill_fields)
        if point.phase == "generate" and chunk_starts is not None:
            raise ValueError("--prefill-chunk applies to the prefill and decode phases, not generate()")
        with torch.inference_mode():
            cache, tokens = run_phase(model, point, input_ids, chunk_starts)
        metrics["kv_cache_bytes"] = cache.nbytes()
        metrics["kv_cache_tokens"] = tokens
        metrics["kv_cache_bytes_predicted"] = predict_kv_cache_bytes(
            model.config, point.loops, point.batch_size, tokens, dtype, prompt_tokens=point.seq_len,
            flashloop_late_rows=getattr(cache, "selected_per_group", lambda: None)(),
        )
        if hasattr(cache, "flashloop_count"):  # FlashLoop counts its metadata at fp16, its tail at bf16
            metrics["kv_cache_bytes_flashloop_count"] = cache.flashloop_count()
        # MELT's open-chunk side buffer (decode_reads="chunk"), inside kv_cache_bytes and apart
        metrics["kv_side_buffer_bytes"] = cache.side_nbytes()
        metrics["kv_side_buffer_bytes_predicted"] = point.batch_size * kv_side_buffer_bytes(
            model.config, point.loops, dtype, tokens)
        metrics.update(predicted_peak(model, point, metrics["prefill_chunk_tokens"], tokens, dtype))
    except Exception as exc:  # an OOM at one point is a data point
        status, error = classify_failure(exc), f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        _collect_peaks(metrics, trackers)
    metrics["measure_s"] = time.perf_counter() - started
    return {"status": status, "error": error, "metrics": metrics}


def _collect_peaks(metrics: dict, trackers: Trackers) -> None:
    """Read every tracker, also after a failure (how far an OOM point got is worth keeping)."""
    sampler, allocator = trackers.nvml, trackers.allocator
    if sampler is not None and sampler.baseline_used is not None:
        nvml = sampler.stop()
        metrics.update({f"nvml_{k}": v for k, v in asdict(nvml).items()})
        if sampler.error:
            metrics["nvml_error"] = sampler.error
    if allocator is not None and hasattr(allocator, "allocated_at_start"):
        try:
            peaks = allocator.result()
            metrics["cuda_max_allocated_bytes"] = peaks.max_allocated_bytes
            metrics["cuda_max_reserved_bytes"] = peaks.max_reserved_bytes
        except Exception as exc:
            metrics["cuda_error"] = str(exc)
    rss_result = trackers.rss.result()
    metrics["rss_baseline_bytes"] = rss_result.baseline_bytes
    metrics["rss_peak_bytes"] = rss_result.peak_bytes
    metrics["rss_peak_above_baseline_bytes"] = rss_result.peak_above_baseline_bytes
    metrics["rss_source"] = rss_result.source
    metrics["rss_malloc"] = rss_result.malloc
    if "cuda_max_allocated_bytes" in metrics and "kv_cache_bytes" in metrics:
        metrics["activation_peak_bytes"] = (
            metrics["cuda_max_allocated_bytes"] - metrics["weights_bytes"] - metrics["kv_cache_bytes"]
        )
    # The headline figure of a point: the allocator peak on a GPU, the RSS peak on a CPU.
    if "cuda_max_allocated_bytes" in metrics:
        metrics["peak_bytes"] = metrics["cuda_max_allocated_bytes"]
        metrics["peak_source"] = "torch.cuda.max_memory_allocated"
    else:
        metrics["peak_bytes"] = metrics["rss_peak_above_baseline_bytes"]
        metrics["peak_source"] = "process RSS above baseline"
