"""NVML facts through nvidia-ml-py (imported as `pynvml`): driver, and per-device memory.

Device-level figures come from NVML itself, not from torch; where NVML is missing (no driver,
no package, inside some containers) callers get `NvmlUnavailable` with the reason."""

from __future__ import annotations

from dataclasses import dataclass, field


class NvmlUnavailable(RuntimeError):
    pass


@dataclass
class NvmlDevice:
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int


@dataclass
class NvmlInfo:
    driver_version: str
    nvml_version: str
    cuda_driver_version: str
    devices: list[NvmlDevice] = field(default_factory=list)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def load_pynvml():
    """The pynvml module, initialised. Raises NvmlUnavailable with the reason if it cannot be."""
    try:
        import pynvml
    except ImportError as exc:
        raise NvmlUnavailable(f"nvidia-ml-py not installed ({exc})") from exc
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError and friends: no driver, no device
        raise NvmlUnavailable(f"nvmlInit failed: {exc}") from exc
    return pynvml


def read_nvml() -> NvmlInfo:
    """Driver/NVML/CUDA-driver versions and every device's memory, as NVML reports them."""
    nvml = load_pynvml()
    try:
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        info = NvmlInfo(
            driver_version=_text(nvml.nvmlSystemGetDriverVersion()),
            nvml_version=_text(nvml.nvmlSystemGetNVMLVersion()),
            cuda_driver_version=f"{cuda // 1000}.{cuda % 1000 // 10}",
        )
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            info.devices.append(
                NvmlDevice(
                    index=index,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    memory_total_bytes=int(memory.total),
                    memory_used_bytes=int(memory.used),
                )
            )
        return info
    finally:
        nvml.nvmlShutdown()
