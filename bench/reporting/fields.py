"""What every metric field of a results row is called for people: a label with its unit, and why
a cell can be empty. Tables show the label and keep the field name in a tooltip."""

from __future__ import annotations

LABELS = {
    # the point
    "model": "model", "loops": "loops", "seq_len": "prompt tokens", "batch_size": "batch", "phase": "phase",
    "status": "status", "engine": "engine", "new_tokens": "new tokens", "task": "task", "metric": "metric",
    "filter": "filter", "exit_mode": "exit mode", "repeats": "repeats",
    # memory
    "peak": "peak", "peak_bytes": "peak", "kv_cache": "KV cache", "kv_cache_bytes": "KV cache",
    "kv_cache_bytes_flashloop_count": "KV cache as FlashLoop counts it",
    "weights": "weights", "weights_bytes": "weights", "activation_peak": "activations (peak)",
    "activation_peak_bytes": "activations (peak)", "nvml_device_peak_above_baseline": "NVML device peak",
    "nvml_device_peak_above_baseline_bytes": "NVML device peak", "rss_peak_above_baseline": "process RSS peak",
    "rss_peak_above_baseline_bytes": "process RSS peak", "peak range": "peak range (repeats)",
    # latency
    "prefill_ms": "prefill ms (median)", "decode_ms_per_token_mean": "decode ms/token (median)",
    "roofline_decode_ms_per_token": "roofline ms/token", "decode_mbu": "decode MBU", "prefill_mfu": "prefill MFU",
    "decode_ms_per_token_p50": "decode ms/token p50", "decode_ms_per_token_p90": "decode ms/token p90",
    "decode_tokens_per_s": "decode tokens/s", "e2e_tokens_per_s": "end-to-end tokens/s",
    "loops_executed_mean": "loops run per step", "energy_decode_j_per_token": "energy J/token",
    "output_digest": "output digest",
    # capacity
    "max_batch": "largest batch", "budget": "budget", "probes": "probes",
    "decode_tokens_per_s_at_max_batch": "decode tokens/s at largest batch",
    "decode_ms_per_step_at_max_batch": "decode ms/step at largest batch",
    "decode_tokens_per_s_at_batch_1": "decode tokens/s at batch 1", "decode_ms_per_step_at_batch_1":
    "decode ms/step at batch 1", "throughput_engine": "engine (throughput)",
    # serve
    "kv_policy": "KV policy", "load": "load", "slots": "slots", "output_tokens_per_s": "output tokens/s (median)",
    "output_tokens_per_s_cv": "tokens/s CV", "requests_per_s": "requests/s", "ttft_ms_p50": "TTFT p50 ms",
    "ttft_ms_p90": "TTFT p90 ms", "ttft_ms_p99": "TTFT p99 ms", "tpot_ms_p50": "TPOT p50 ms",
    "tpot_ms_p90": "TPOT p90 ms", "tpot_ms_p99": "TPOT p99 ms", "itl_ms_p90": "ITL p90 ms", "e2e_ms_p90": "E2E p90 ms",
    "queue_ms_p90": "queueing p90 ms", "goodput_requests_per_s": "goodput requests/s", "timing_stability": "timing",
    "torch_num_threads": "threads", "loadavg_1m_before": "load before", "loadavg_1m_after": "load after",
    "kv_in_use_max": "KV in use (max)", "kv_allocated": "KV allocated", "memory_budget": "budget",
    # accuracy
    "value": "score", "stderr": "± stderr", "n_samples": "documents",
}

# Why a field can be empty, by prefix: shown on hover over the em dash.
MISSING = {
    "energy_": "energy: NVML's energy counter, NVIDIA GPUs only (energy_source in the row says why)",
    "nvml_": "NVML: NVIDIA GPUs only",
    "cuda_": "the CUDA allocator: GPU runs only",
    "prefill_mfu": "MFU: measured with the latency engine's prefill only",
    "decode_mbu": "MBU: no roofline for this point",
}


def label(field: str) -> str:
    """The column name people read: words and a unit (the field name where none is set)."""
    return LABELS.get(field, field.replace("_", " "))


def missing_reason(field: str, status: str | None = None) -> str:
    """Why `field` is empty in a row: the point's failure, or what measures the field."""
    if status not in (None, "ok"):
        return f"not measured: the point ended {status}"
    for prefix, reason in MISSING.items():
        if field.startswith(prefix):
            return reason
    return "not recorded for this point"
