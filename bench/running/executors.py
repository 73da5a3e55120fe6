"""Where a sweep's points run at the same time: one after another (the default), one per GPU of
this machine (`--gpus`, a thread pool of the standard library, one thread per GPU), or as Ray
tasks anywhere in a Ray cluster (`--executor ray`). Either way every point still runs in a fresh
child process pinned to its GPU, and the driver, which consumes `run()`, is the only writer of
rows: executors only say which point finished, how, and where."""

from __future__ import annotations

import os
import queue
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from melt_bench.running.launcher import ChildOutcome, kill_children, run_in_child, stop_fork_server
from melt_bench.running.sweep_plan import SweepPoint


class ExecutorError(ValueError):
    """A user error in --gpus / --executor (one line, exit 2)."""


# The slot a CpuPoolExecutor hands its points: one intra-op thread, so points share the cores.
ONE_CPU_THREAD = "one-cpu-thread"


def run_pinned(gpu: str | None, target: Callable, *args):
    """In the child, before anything touches CUDA: see only `gpu` (its physical index or UUID),
    so cuda:0 is that GPU, and NVML figures map to it through CUDA_VISIBLE_DEVICES
    (memory_trackers.nvml_index_for). ONE_CPU_THREAD: a CPU point run beside others."""
    if gpu == ONE_CPU_THREAD:
        import torch

        torch.set_num_threads(1)
    elif gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    return target(*args)


@dataclass
class PointRunner:
    """`measure(point, *args)` in a fresh child within `timeout_s`, pinned to `gpu` if given."""

    measure: Callable[..., dict]
    args: tuple = ()
    timeout_s: float | None = 600.0

    def __call__(self, point: SweepPoint, gpu: str | None = None) -> ChildOutcome:
        return run_in_child(run_pinned, (gpu, self.measure, point, *self.args), self.timeout_s)


@dataclass
class Finished:
    """One point's outcome and where it ran."""

    point: SweepPoint
    outcome: ChildOutcome
    placement: dict = field(default_factory=dict)  # gpu, executor, ray_node_ip: recorded in the row


class SerialExecutor:
    """One point at a time, in this machine's default device (today's behaviour)."""

    name, workers = "serial", 1

    def run(self, points: list[SweepPoint], run_point) -> Iterator[Finished]:
        for point in points:
            yield Finished(point, run_point(point), {})


class GpuPoolExecutor:
    """Up to one point per GPU at a time on this machine. A point takes a free GPU from a queue
    and gives it back when its child ends; the pool has as many threads as GPUs, so a point
    never waits for a GPU once it has a thread."""

    name = "gpus"

    def __init__(self, gpus: list[str | None]) -> None:
        self.gpus = gpus
        self.workers = len(gpus)

    def placement(self, gpu: str | None) -> dict:
        return {"gpu": gpu, "executor": self.name}

    def run(self, points: list[SweepPoint], run_point) -> Iterator[Finished]:
        free: queue.Queue[str | None] = queue.Queue()
        for gpu in self.gpus:
            free.put(gpu)

        def one(point: SweepPoint) -> Finished:
            gpu = free.get()
            try:
                return Finished(point, run_point(point, gpu), self.placement(gpu))
            finally:
                free.put(gpu)

        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="melt-bench-gpu")
        try:
            for future in as_completed([pool.submit(one, point) for point in points]):
                yield future.result()
        except BaseException:  # Ctrl-C, or the driver closed this run: workers waiting for a child the
            stop_fork_server()  # server has not forked yet (it may still import torch) return at once
            raise
        finally:  # also on Ctrl-C: drop what has not started, end the children that have
            pool.shutdown(wait=False, cancel_futures=True)
            kill_children()
            pool.shutdown(wait=True)


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """ExecutorError unless something answers at a HOST:PORT --ray-address (ray:// too): Ray
    itself retries a dead address for minutes, printing its connection logs all the while."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" and the like: Ray's own resolution
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ExecutorError(f"--ray-address {address}: nothing answers there ({exc.strerror or exc})") from None


class CpuPoolExecutor(GpuPoolExecutor):
    """Up to `workers` CPU points at a time, each in its own child (memory sweeps on a CPU: a
    child's peak is its own process's resident set, so concurrent points do not mix; each child
    runs one intra-op thread, recorded in the row as torch_num_threads)."""

    name = "cpu-pool"

    def __init__(self, workers: int) -> None:
        super().__init__([ONE_CPU_THREAD] * workers)

    def placement(self, gpu: str | None) -> dict:
        return {"executor": self.name, "cpu_workers": self.workers}


class RayExecutor:
    """Each point a Ray task asking for one GPU (CUDA sweeps) or one CPU; the task runs the point
    in a fresh child on its node, pinned to the GPU Ray gave it. A task whose worker or node dies
    comes back as a crashed outcome (the row says `error` and why) and the sweep goes on."""

    name = "ray"

    def __init__(self, address: str | None, gpu: bool) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ExecutorError('--executor ray needs Ray: pip install "melt-bench[ray]"') from exc
        self.ray, self.gpu = ray, gpu
        self.started_here = not ray.is_initialized()
        if self.started_here and address:
            check_reachable(address)
        if self.started_here:
            try:
                ray.init(address=address, log_to_driver=False)
            except Exception as exc:  # no cluster at that address, and the like
                raise ExecutorError(f"--ray-address {address}: cannot connect ({str(exc).splitlines()[0][:160]})")
        resources = ray.cluster_resources()
        self.workers = int(resources.get("GPU" if gpu else "CPU", 0))
        if self.workers < 1:
            raise ExecutorError(f"--executor ray: the cluster offers no {'GPU' if gpu else 'CPU'}")

    def run(self, points: list[SweepPoint], run_point) -> Iterator[Finished]:
        ray = self.ray
        task = ray.remote(num_gpus=1 if self.gpu else 0, num_cpus=0 if self.gpu else 1, max_retries=0)(_ray_point)
        pending = {task.remote(run_point, point): point for point in points}
        try:
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                point = pending.pop(ref)
                try:
                    outcome, placement = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker or its node died, or Ray failed
                    reason = str(exc).strip().splitlines()[0][:300]
                    outcome, placement = ChildOutcome("crashed", error=f"Ray {type(exc).__name__}: {reason}"), {}
                yield Finished(point, outcome, {"executor": self.name, **placement})
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if self.started_here:
                ray.shutdown()


def _ray_point(run_point, point: SweepPoint) -> tuple[ChildOutcome, dict]:
    """Inside a Ray task: run the point pinned to the GPU(s) Ray assigned (none on CPU)."""
    import ray

    gpus = [str(gpu) for gpu in ray.get_gpu_ids()]
    gpu = ",".join(gpus) or None
    placement = {"ray_node_ip": ray.util.get_node_ip_address()}
    if gpu:
        placement["gpu"] = gpu
    return run_point(point, gpu), placement


_GPU_ENTRY = re.compile(r"^(\d+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-fA-F-]+)$")


def parse_gpus(text: str, nvml) -> list[str]:
    """--gpus: 'all' (every GPU NVML sees) or a comma list of indices / UUIDs, each once and
    present on this machine."""
    try:
        count = nvml.nvmlDeviceGetCount()
    except Exception as exc:
        raise ExecutorError(f"--gpus: NVML cannot count this machine's GPUs ({exc})") from exc
    if text.strip() == "all":
        if count < 1:
            raise ExecutorError("--gpus all: this machine has no GPU")
        return [str(index) for index in range(count)]
    entries = [entry.strip() for entry in text.split(",")]
    for entry in entries:
        if not _GPU_ENTRY.match(entry):
            raise ExecutorError(f"--gpus: {entry!r} is not a GPU index or UUID (e.g. 0,1,2 or all)")
        if entry.isdigit() and int(entry) >= count:
            raise ExecutorError(f"--gpus: GPU {entry} does not exist (this machine has {count}: 0..{count - 1})")
    if len(set(entries)) != len(entries):
        raise ExecutorError(f"--gpus: {text!r} names a GPU twice")
    return entries


def busy_gpus(gpus: list[str], nvml) -> dict[str, list[int]]:
    """GPUs on which another process already runs compute or graphics work, with their pids
    (what optimum-benchmark's device-isolation check looks at): its memory and time would mix
    with the points'."""
    busy = {}
    for gpu in gpus:
        handle = nvml.nvmlDeviceGetHandleByIndex(int(gpu)) if gpu.isdigit() else nvml.nvmlDeviceGetHandleByUUID(gpu)
        processes = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        processes += list(nvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
        pids = sorted({p.pid for p in processes if p.pid != os.getpid()})
        if pids:
            busy[gpu] = pids
    return busy


def make_executor(gpus: str | None, executor: str, ray_address: str | None, allow_busy_gpus: bool,
                  device: str, warn: Callable[[str], None], cpu_workers: int = 1):
    """The executor the sweep flags ask for; ExecutorError (one line) for a bad combination.
    `cpu_workers` > 1 runs that many CPU points at a time (memory sweeps on a CPU)."""
    if executor not in ("local", "ray"):
        raise ExecutorError(f"--executor: {executor!r} is not one of local, ray")
    if executor == "ray":
        if gpus is not None:
            raise ExecutorError("--gpus applies to --executor local (Ray places points on the cluster's GPUs)")
        return RayExecutor(ray_address, gpu=device.startswith("cuda"))
    if ray_address is not None:
        raise ExecutorError("--ray-address applies to --executor ray")
    if gpus is None:
        return CpuPoolExecutor(cpu_workers) if cpu_workers > 1 and device == "cpu" else SerialExecutor()
    if not device.startswith("cuda"):
        raise ExecutorError(f"--gpus runs CUDA points; this sweep runs on {device}")
    from melt_bench.trackers.nvml import NvmlUnavailable, load_pynvml

    try:
        nvml = load_pynvml()
    except NvmlUnavailable as exc:
        raise ExecutorError(f"--gpus: {exc}") from exc
    chosen = parse_gpus(gpus, nvml)
    busy = busy_gpus(chosen, nvml)
    if busy:
        listed = "; ".join(f"GPU {gpu}: pids {', '.join(map(str, pids))}" for gpu, pids in busy.items())
        if not allow_busy_gpus:
            raise ExecutorError(f"--gpus: busy with other processes ({listed}); their memory and time would mix "
                                "with the points': free them, choose others, or pass --allow-busy-gpus")
        warn(f"running on busy GPUs ({listed}): memory and time figures include their work")
    return GpuPoolExecutor(chosen)
