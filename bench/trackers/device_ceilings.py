"""The device's achievable memory bandwidth and matmul rate, measured where the point runs (the
same child process, just before it), for the roofline columns of latency rows.

  - bandwidth: a large device-to-device copy, counting bytes read plus bytes written;
  - matmul rate: a large square product in the point's dtype.
Both are the median of several timed repetitions after a warm-up, on random data (never zeros).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class DeviceCeilings:
    bandwidth_bytes_per_s: float
    bandwidth_method: str
    matmul_flops_per_s: float
    matmul_method: str

    def to_metrics(self) -> dict:
        return {f"device_{key}": value for key, value in asdict(self).items()}


def device_timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    """Seconds one call of `fn` takes on `device` (CUDA events on a GPU)."""
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
    else:
        def run(fn):
            started = time.perf_counter()
            fn()
            return time.perf_counter() - started
    return run


def median_seconds(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 2) -> float:
    run = device_timer(device)
    for _ in range(warmup):
        run(fn)
    return statistics.median(run(fn) for _ in range(repeats))


def measure_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> tuple[float, str]:
    """Bytes per second of a `nbytes` copy (read + write counted); default 1 GiB on a GPU, 256 MiB
    on a CPU (well past any cache)."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**28)
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats)
    method = f"copy of {nbytes / 2**20:,.0f} MiB, read + write, median of {repeats}"
    return 2 * nbytes / seconds, method


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, size: int | None = None,
                        repeats: int = 10) -> tuple[float, str]:
    """FLOP/s of a size x size x size product (2 size^3 FLOPs); default 8192 on a GPU, 1024 on a
    CPU."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    seconds = median_seconds(lambda: torch.mm(a, b), device, repeats)
    name = str(dtype).removeprefix("torch.")
    return 2 * size**3 / seconds, f"{size}x{size}x{size} {name} torch.mm, median of {repeats}"


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> DeviceCeilings:
    bandwidth, bandwidth_method = measure_bandwidth(device)
    rate, rate_method = measure_matmul_rate(device, dtype)
    return DeviceCeilings(bandwidth, bandwidth_method, rate, rate_method)
