"""Facts about the machine and software a measurement ran on (also run metadata for results)."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from melt_bench import __version__
from melt_bench.trackers.nvml import NvmlUnavailable, read_nvml


@dataclass
class GpuFacts:
    index: int
    name: str
    capability: str
    memory_total_bytes: int


@dataclass
class EnvFacts:
    melt_bench: str
    git_commit: str | None
    python: str
    platform: str
    host: str
    cpu_count: int
    ram_total_bytes: int
    torch: str
    transformers: str
    cuda_available: bool
    torch_cuda: str | None
    cudnn: int | None
    gpus: list[GpuFacts] = field(default_factory=list)
    nvml: dict | None = None
    nvml_error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the melt-bench checkout (None when not run from one)."""
    where = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def collect_env(probe_cuda: bool = True) -> EnvFacts:
    """Facts of this machine. `probe_cuda=False` leaves CUDA uninitialised (GPU facts then come
    from NVML alone), for a parent process whose children do the measuring."""
    import psutil
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    gpus = []
    if cuda and probe_cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(GpuFacts(i, props.name, f"{props.major}.{props.minor}", int(props.total_memory)))
    facts = EnvFacts(
        melt_bench=__version__,
        git_commit=git_commit(),
        python=platform.python_version(),
        platform=platform.platform(),
        host=socket.gethostname(),
        cpu_count=os.cpu_count() or 0,
        ram_total_bytes=int(psutil.virtual_memory().total),
        torch=torch.__version__,
        transformers=transformers.__version__,
        cuda_available=cuda,
        torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if cuda else None,
        gpus=gpus,
    )
    try:
        facts.nvml = asdict(read_nvml())
    except NvmlUnavailable as exc:
        facts.nvml_error = str(exc)
    return facts
