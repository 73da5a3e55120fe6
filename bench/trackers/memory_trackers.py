"""Memory trackers, one per source, each labelled with where its figure comes from:

  - `RssTracker`: the process's peak resident set (Linux VmHWM, reset at start) above a baseline;
    process-level, so it counts everything the process holds, not only tensors.
  - `CudaAllocatorTracker`: torch's caching allocator, `max_memory_allocated/reserved` after
    `reset_peak_memory_stats`.
  - `RunPeakMeter`: the peak of each timed run of a latency point (allocator or VmHWM, reset per run);
  - `NvmlSampler`: device memory used as the driver sees it, sampled by a background thread at a
    fixed interval, and this process's own usage where NVML reports it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
import threading
from dataclasses import asdict, dataclass

# --- process RSS ------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 64 * 1024
TRIM_THRESHOLD_BYTES = 128 * 1024


def return_freed_memory_to_os() -> str:
    """Make the resident set follow what the process holds: glibc serves every block of 64 KiB or
    more (every tensor that matters) with its own mmap and unmaps it on free, and trims the heap
    top above 128 KiB. By default glibc raises its mmap threshold as large blocks are freed and
    keeps them in its heap, so the peak RSS of the same run moved by 10-20% between processes.
    Returns how the allocator is set, for the results row."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return "default (no glibc mallopt here)"
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        return "default (mallopt refused)"
    return (f"glibc mallopt: mmap threshold {MMAP_THRESHOLD_BYTES // 1024} KiB, "
            f"trim threshold {TRIM_THRESHOLD_BYTES // 1024} KiB")


@dataclass
class RssResult:
    baseline_bytes: int
    peak_bytes: int
    peak_above_baseline_bytes: int
    source: str  # "VmHWM" (reset at start) or "ru_maxrss" (peak since the process started)
    malloc: str  # how the C allocator was set (return_freed_memory_to_os)


class RssTracker:
    """Peak resident set of this process from `start()` on, above the RSS at `start()`. Meant for
    a child that measures one point: `start()` sets the process's C allocator to hand freed
    memory back at once (return_freed_memory_to_os), which costs speed, not accuracy."""

    def start(self, return_freed: bool = True) -> None:
        """`return_freed` False leaves the C allocator as it is (for timed code, which its setting
        slows): the peak may then also count freed blocks glibc kept resident."""
        self.malloc = return_freed_memory_to_os() if return_freed else "default (left as it is)"
        self.baseline = current_rss_bytes()
        self.reset_peak()

    def reset_peak(self) -> None:
        """From here on `peak_bytes` is the peak since now (where the kernel lets us reset it)."""
        try:  # "5" resets the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
            self.source = "VmHWM"
        except OSError:
            self.source = "ru_maxrss"

    def peak_bytes(self) -> int:
        if self.source == "VmHWM":
            kib = _proc_status_kib("VmHWM")
            if kib is not None:
                return kib * 1024
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux

    def result(self) -> RssResult:
        peak = max(self.peak_bytes(), self.baseline)
        return RssResult(self.baseline, peak, peak - self.baseline, self.source, self.malloc)


# --- torch CUDA allocator ---------------------------------------------------------------------


@dataclass
class AllocatorResult:
    max_allocated_bytes: int
    max_reserved_bytes: int
    allocated_at_start_bytes: int


class CudaAllocatorTracker:
    """Allocator peaks on one device. `cuda` is `torch.cuda` (a fake in tests)."""

    def __init__(self, cuda, device) -> None:
        self.cuda = cuda
        self.device = device

    def start(self) -> None:
        self.cuda.synchronize(self.device)
        self.cuda.reset_peak_memory_stats(self.device)
        self.allocated_at_start = self.cuda.memory_allocated(self.device)

    def result(self) -> AllocatorResult:
        self.cuda.synchronize(self.device)
        return AllocatorResult(
            max_allocated_bytes=int(self.cuda.max_memory_allocated(self.device)),
            max_reserved_bytes=int(self.cuda.max_memory_reserved(self.device)),
            allocated_at_start_bytes=int(self.allocated_at_start),
        )


class RunPeakMeter:
    """The peak of each timed run, comparable with a memory point's `peak_bytes`: on a GPU the
    torch allocator's `max_memory_allocated` since the run began (CudaAllocatorTracker: weights
    and cache included); on a CPU the process's peak RSS, reset when the run begins, above the RSS
    before the model loaded (RssTracker, the C allocator left as it is: its setting slows the
    timed code, so a CPU figure may also count freed blocks glibc kept resident, an upper bound of
    what the run held). `cuda` is `torch.cuda` (a fake in tests)."""

    def __init__(self, device, cuda=None) -> None:
        self.allocator = CudaAllocatorTracker(cuda, device) if cuda is not None else None
        self.rss = RssTracker()

    def start(self) -> None:
        """Before the model loads."""
        if self.allocator is None:
            self.rss.start(return_freed=False)

    def begin_run(self) -> None:
        if self.allocator is not None:
            self.allocator.start()
        else:
            self.rss.reset_peak()

    def end_run(self) -> int:
        if self.allocator is not None:
            return self.allocator.result().max_allocated_bytes
        return max(0, self.rss.peak_bytes() - self.rss.baseline)

    @property
    def source(self) -> str:
        if self.allocator is not None:
            return "torch.cuda.max_memory_allocated during the run"
        return (f"process {self.rss.source} during the run above the RSS before the model loaded (glibc's default "
                "allocator: an upper bound)")


# --- NVML -------------------------------------------------------------------------------------


def nvml_index_for(torch_index: int, visible: str | None = None) -> int | str:
    """The NVML index (or UUID) of torch's device `torch_index`, read through CUDA_VISIBLE_DEVICES
    without initialising CUDA. Indices agree because the CLI sets CUDA_DEVICE_ORDER=PCI_BUS_ID."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if not visible:
        return torch_index
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    entry = entries[torch_index]
    return int(entry) if entry.isdigit() else entry


@dataclass
class NvmlResult:
    interval_ms: float
    samples: int
    device_used_baseline_bytes: int
    device_used_peak_bytes: int
    device_peak_above_baseline_bytes: int
    process_used_peak_bytes: int | None
    process_source: str  # how the per-process figure was found, or why it is missing

    def to_dict(self) -> dict:
        return asdict(self)


class NvmlSampler:
    """Samples device memory used (and this process's usage) every `interval_s` on a thread.

    `baseline()` reads the idle figure (call it before the model loads); `start()`/`stop()` run
    the sampler; `stop()` always joins the thread and takes one last sample."""

    def __init__(self, nvml, device: int | str, interval_s: float = 0.01, pid: int | None = None) -> None:
        self.nvml = nvml
        self.handle = (
            nvml.nvmlDeviceGetHandleByUUID(device) if isinstance(device, str)
            else nvml.nvmlDeviceGetHandleByIndex(device)
        )
        self.interval_s = interval_s
        self.pid = os.getpid() if pid is None else pid
        self.samples = 0
        self.peak_used = 0
        self.peak_process: int | None = None
        self.process_source = "not sampled"
        self.baseline_used: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def used_bytes(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def baseline(self) -> int:
        self.baseline_used = self.used_bytes()
        return self.baseline_used

    def _process_used(self) -> int | None:
        try:
            processes = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except Exception as exc:  # not supported in this driver/container
            self.process_source = f"unavailable: {exc}"
            return None
        for proc in processes:
            if proc.pid == self.pid:
                used = getattr(proc, "usedGpuMemory", None)
                if used is None or used >= 2**63 - 1:  # NVML_VALUE_NOT_AVAILABLE
                    self.process_source = "unavailable: NVML reports no per-process value"
                    return None
                self.process_source = "nvmlDeviceGetComputeRunningProcesses"
                return int(used)
        self.process_source = "unavailable: this pid is not in NVML's process list (container pid namespace?)"
        return None

    def sample(self) -> None:
        self.peak_used = max(self.peak_used, self.used_bytes())
        process = self._process_used()
        if process is not None:
            self.peak_process = max(self.peak_process or 0, process)
        self.samples += 1

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.sample()
                self._stop.wait(self.interval_s)
        except Exception as exc:  # keep the measurement alive; report why sampling stopped
            self.error = f"NVML sampling stopped: {exc}"

    def start(self) -> None:
        if self.baseline_used is None:
            self.baseline()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> NvmlResult:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.sample()
        baseline = self.baseline_used or 0
        return NvmlResult(
            interval_ms=self.interval_s * 1000,
            samples=self.samples,
            device_used_baseline_bytes=baseline,
            device_used_peak_bytes=self.peak_used,
            device_peak_above_baseline_bytes=self.peak_used - baseline,
            process_used_peak_bytes=self.peak_process,
            process_source=self.process_source,
        )

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

