"""Memory sources: RSS for real, the CUDA allocator and NVML through fakes of their calls."""

import threading
import time
import types

import pytest
import torch

from melt_bench.running.launcher import run_in_child
from melt_bench.scenarios.measure_memory import Trackers, measure_memory_point
from melt_bench.scenarios.memory import MemoryPoint
from melt_bench.scenarios.point_setup import classify_failure
from melt_bench.trackers.memory_trackers import (
    CudaAllocatorTracker,
    NvmlSampler,
    RssTracker,
    current_rss_bytes,
    nvml_index_for,
)

GiB = 2**30


class FakeNvmlDevice:
    """pynvml stand-in: a device whose used memory follows a script of (seconds, bytes) steps,
    rising to a peak and falling back, with this process listed at a fixed share."""

    def __init__(self, script, pid, per_process=True):
        self.script, self.pid, self.per_process = script, pid, per_process
        self.t0 = time.monotonic()
        self.calls = 0

    def used_now(self):
        elapsed = time.monotonic() - self.t0
        used = self.script[0][1]
        for at, value in self.script:
            if elapsed >= at:
                used = value
        return used

    def module(self):
        mod = types.ModuleType("pynvml")
        mod.nvmlDeviceGetHandleByIndex = lambda i: ("dev", i)
        mod.nvmlDeviceGetHandleByUUID = lambda uuid: ("dev", uuid)

        def memory_info(handle):
            self.calls += 1
            return types.SimpleNamespace(used=self.used_now(), total=80 * GiB)

        def processes(handle):
            if not self.per_process:
                raise RuntimeError("Not Supported")
            return [types.SimpleNamespace(pid=self.pid, usedGpuMemory=self.used_now() - GiB),
                    types.SimpleNamespace(pid=1, usedGpuMemory=GiB)]

        mod.nvmlDeviceGetMemoryInfo = memory_info
        mod.nvmlDeviceGetComputeRunningProcesses = processes
        return mod


def test_nvml_sampler_catches_a_peak_between_rise_and_fall():
    device = FakeNvmlDevice([(0, 1 * GiB), (0.05, 5 * GiB), (0.15, 2 * GiB)], pid=4242)
    sampler = NvmlSampler(device.module(), 0, interval_s=0.005, pid=4242)
    assert sampler.baseline() == 1 * GiB
    sampler.start()
    time.sleep(0.3)
    result = sampler.stop()
    assert not sampler.running
    assert result.device_used_peak_bytes == 5 * GiB
    assert result.device_peak_above_baseline_bytes == 4 * GiB
    assert result.process_used_peak_bytes == 4 * GiB and result.process_source == "nvmlDeviceGetComputeRunningProcesses"
    assert result.interval_ms == 5.0 and result.samples >= 10


def test_nvml_sampler_reports_why_per_process_figures_are_missing():
    device = FakeNvmlDevice([(0, GiB)], pid=1, per_process=False)
    sampler = NvmlSampler(device.module(), "GPU-abc", interval_s=0.01, pid=999)
    sampler.start()
    result = sampler.stop()
    assert result.process_used_peak_bytes is None and "Not Supported" in result.process_source
    assert threading.active_count() >= 1 and not sampler.running


def test_nvml_index_follows_cuda_visible_devices():
    assert nvml_index_for(0, "") == 0
    assert nvml_index_for(1, "3,5") == 5
    assert nvml_index_for(0, "GPU-1234-abcd") == "GPU-1234-abcd"


class FakeCuda:
    """torch.cuda stand-in for the allocator tracker: peaks and a reset that can be checked."""

    def __init__(self, allocated, peak_allocated, peak_reserved):
        self.allocated, self.peak_allocated, self.peak_reserved = allocated, peak_allocated, peak_reserved
        self.resets = self.syncs = 0

    def synchronize(self, device=None):
        self.syncs += 1

    def reset_peak_memory_stats(self, device=None):
        self.resets += 1

    def memory_allocated(self, device=None):
        return self.allocated

    def max_memory_allocated(self, device=None):
        return self.peak_allocated

    def max_memory_reserved(self, device=None):
        return self.peak_reserved


def point(**overrides):
    fields = dict(command="memory", model="ouro-tiny", loops=4, seq_len=16, batch_size=2, phase="decode",
                  new_tokens=4, dtype="float32", device="cpu")
    return MemoryPoint(**{**fields, **overrides})


def test_gpu_path_through_fakes_records_every_source():
    fake_cuda = FakeCuda(allocated=10_000, peak_allocated=3 * GiB, peak_reserved=4 * GiB)
    device = FakeNvmlDevice([(0, GiB), (0.01, 6 * GiB)], pid=__import__("os").getpid())
    trackers = Trackers(RssTracker(), CudaAllocatorTracker(fake_cuda, "cuda:0"),
                        NvmlSampler(device.module(), 0, interval_s=0.002))
    row = measure_memory_point(point(), trackers=trackers)
    m = row["metrics"]
    assert row["status"] == "ok" and fake_cuda.resets == 1
    assert m["cuda_max_allocated_bytes"] == 3 * GiB and m["cuda_max_reserved_bytes"] == 4 * GiB
    assert m["activation_peak_bytes"] == 3 * GiB - m["weights_bytes"] - m["kv_cache_bytes"]
    assert m["peak_source"] == "torch.cuda.max_memory_allocated" and m["peak_bytes"] == 3 * GiB
    assert m["nvml_device_used_baseline_bytes"] == GiB and m["nvml_samples"] >= 1
    assert m["nvml_interval_ms"] == 2.0 and not trackers.nvml.running


def test_fake_oom_at_a_chosen_point_is_recorded(monkeypatch):
    import melt_bench.scenarios.measure_memory as mm

    real_run_phase = mm.run_phase

    def run_phase(model, p, input_ids, *args):
        if p.loops == 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return real_run_phase(model, p, input_ids, *args)

    monkeypatch.setattr(mm, "run_phase", run_phase)
    fake_cuda = FakeCuda(allocated=0, peak_allocated=GiB, peak_reserved=GiB)
    trackers = Trackers(RssTracker(), CudaAllocatorTracker(fake_cuda, "cuda:0"))
    oom = measure_memory_point(point(loops=8), trackers=trackers)
    assert oom["status"] == "oom" and "Tried to allocate" in oom["error"]
    assert oom["metrics"]["cuda_max_allocated_bytes"] == GiB  # how far it got is kept
    assert measure_memory_point(point(loops=2))["status"] == "ok"


@pytest.mark.parametrize(
    "exc,status",
    [(torch.cuda.OutOfMemoryError("x"), "oom"), (MemoryError(), "oom"),
     (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB"), "oom"),
     (RuntimeError("CUDA error: out of memory"), "oom"), (ValueError("bad"), "error")],
)
def test_failure_classification(exc, status):
    assert classify_failure(exc) == status


def test_rss_tracker_sees_a_real_allocation():
    tracker = RssTracker()
    tracker.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    result = tracker.result()
    del block
    assert result.peak_above_baseline_bytes >= 60 * 2**20
    assert result.baseline_bytes > 0 and current_rss_bytes() > 0 and result.source in ("VmHWM", "ru_maxrss")


def test_cpu_point_measures_rss_and_exact_kv():
    # In a fresh child, as the sweep runs it: this process's RSS history would hide the peak.
    outcome = run_in_child(measure_memory_point, (point(loops=8, seq_len=512, batch_size=4),), 120)
    row = outcome.value
    m = row["metrics"]
    assert row["status"] == "ok" and m["peak_source"] == "process RSS above baseline"
    assert m["rss_peak_above_baseline_bytes"] > 0 and m["rss_peak_bytes"] > m["rss_baseline_bytes"]
    assert m["kv_cache_bytes"] == m["kv_cache_bytes_predicted"] and m["kv_cache_tokens"] == 516
    assert "cuda_max_allocated_bytes" not in m and "nvml_samples" not in m


@pytest.mark.parametrize("phase,tokens", [("prefill", 16), ("generate", 19)])
def test_other_phases(phase, tokens):
    m = measure_memory_point(point(phase=phase, model="melt-tiny"))["metrics"]
    assert m["kv_cache_tokens"] == tokens and m["kv_cache_bytes"] == m["kv_cache_bytes_predicted"]
