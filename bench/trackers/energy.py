"""Energy of prefill and decode from NVML, with the safeguards the counter needs.

  - Source 1: `nvmlDeviceGetTotalEnergyConsumption` (mJ since the driver loaded, Volta and
    newer). It updates only every few tens of milliseconds, so its update interval is measured
    first and every window is extended (by repeating the workload) until it spans at least
    `MIN_UPDATES` updates and `MIN_WINDOW_S` seconds.
  - Source 2, where the counter is missing or updates too rarely: `nvmlDeviceGetPowerUsage` (mW)
    read between repetitions and integrated over time (trapezoids). On recent GPUs that reading
    is itself a ~1 s average, so windows are at least as long.
  - Idle power, measured the same way before the model loads, is subtracted, so the figures are
    the energy the work added. Where nothing can be read (no NVIDIA GPU, no permission) every
    figure is None and `energy_source` says why: never 0.

The clock and sleep are injectable so tests can drive a fake NVML through every path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

MIN_WINDOW_S = 1.0
MIN_UPDATES = 10
MAX_COUNTER_INTERVAL_S = 0.5  # a counter slower than this is too coarse: integrate power instead
COUNTER = "nvml total energy counter (nvmlDeviceGetTotalEnergyConsumption)"
POWER = "nvml power readings integrated over time (nvmlDeviceGetPowerUsage)"


@dataclass
class EnergyWindow:
    joules_per_unit: float  # above idle
    window_s: float
    units: int


class EnergyMeter:
    """Reads one GPU's energy through `nvml` (pynvml or a fake); `source` says how, or why not."""

    def __init__(self, nvml, handle, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.nvml, self.handle, self.clock, self.sleep = nvml, handle, clock, sleep
        self.counter_interval_s: float | None = None
        self.idle_power_w: float | None = None
        self.source = self._choose_source()

    def _choose_source(self) -> str:
        why = None
        try:
            self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.counter_interval_s = self._counter_interval()
            if self.counter_interval_s is not None and self.counter_interval_s <= MAX_COUNTER_INTERVAL_S:
                return COUNTER
            why = "counter too coarse" if self.counter_interval_s else "counter never changed"
        except Exception as exc:  # NVMLError_NotSupported, NoPermission, a fake's error
            why = f"counter unavailable: {exc}"
        try:
            self.nvml.nvmlDeviceGetPowerUsage(self.handle)
        except Exception as exc:
            return f"unavailable: {why}; power readings unavailable: {exc}"
        return f"{POWER} ({why})"

    @property
    def available(self) -> bool:
        return not self.source.startswith("unavailable")

    def _counter_interval(self, max_wait_s: float = 2.0) -> float | None:
        """Seconds between two changes of the energy counter (polled every millisecond)."""
        changes: list[float] = []
        last = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        deadline = self.clock() + max_wait_s
        while len(changes) < 3 and self.clock() < deadline:
            self.sleep(0.001)
            value = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            if value != last:
                changes.append(self.clock())
                last = value
        if len(changes) < 2:
            return None
        return (changes[-1] - changes[0]) / (len(changes) - 1)

    def min_window_s(self) -> float:
        if self.source == COUNTER:
            return max(MIN_WINDOW_S, MIN_UPDATES * (self.counter_interval_s or 0.0))
        return max(MIN_WINDOW_S, 5.0)  # power readings are ~1 s averages: keep the blurred edges small

    def measure_idle(self) -> float | None:
        """Idle power (W) over one minimum window; call before the model loads."""
        if not self.available:
            return None
        joules, seconds = self._window(lambda: self.sleep(0.01) or 1, until_s=self.min_window_s())[:2]
        self.idle_power_w = joules / seconds
        return self.idle_power_w

    def measure(self, workload: Callable[[], int]) -> EnergyWindow | None:
        """Energy per unit above idle: `workload()` runs once (and waits for the device) and
        returns how many units it did; it is repeated until the window is long enough."""
        if not self.available:
            return None
        joules, seconds, units = self._window(workload, until_s=self.min_window_s())
        above_idle = joules - (self.idle_power_w or 0.0) * seconds
        return EnergyWindow(above_idle / max(units, 1), seconds, units)

    def _window(self, workload: Callable[[], int], until_s: float) -> tuple[float, float, int]:
        units = 0
        started = self.clock()
        if self.source == COUNTER:
            first = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            while self.clock() - started < until_s or units == 0:
                units += workload()
            last = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            return (last - first) / 1000, self.clock() - started, units
        joules, t_prev, p_prev = 0.0, started, self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000
        while self.clock() - started < until_s or units == 0:
            units += workload()
            now, power = self.clock(), self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000
            joules += (p_prev + power) / 2 * (now - t_prev)
            t_prev, p_prev = now, power
        return joules, t_prev - started, units


def open_meter(device_index: int | str) -> EnergyMeter | str:
    """An EnergyMeter for the NVML device (index or UUID), or the reason there is none."""
    from melt_bench.trackers.nvml import NvmlUnavailable, load_pynvml

    try:
        nvml = load_pynvml()
        handle = (nvml.nvmlDeviceGetHandleByUUID(device_index) if isinstance(device_index, str)
                  else nvml.nvmlDeviceGetHandleByIndex(device_index))
    except NvmlUnavailable as exc:
        return f"unavailable: {exc}"
    except Exception as exc:
        return f"unavailable: NVML has no device {device_index!r} ({exc})"
    return EnergyMeter(nvml, handle)


def energy_metrics(meter: EnergyMeter | str, prefill: EnergyWindow | None, decode: EnergyWindow | None) -> dict:
    """The row's energy fields; None with the reason in `energy_source` where nothing was read."""
    if isinstance(meter, str) or not meter.available:
        return {"energy_source": meter if isinstance(meter, str) else meter.source,
                "energy_prefill_j": None, "energy_decode_j_per_token": None}
    source = meter.source + (", idle power subtracted" if meter.idle_power_w is not None else "")
    metrics = {
        "energy_source": source,
        "energy_idle_power_w": meter.idle_power_w,
        "energy_counter_update_ms": None if meter.counter_interval_s is None else meter.counter_interval_s * 1000,
        "energy_prefill_j": prefill.joules_per_unit if prefill else None,
        "energy_decode_j_per_token": decode.joules_per_unit if decode else None,
    }
    for name, window in (("prefill", prefill), ("decode", decode)):
        if window is not None:
            metrics[f"energy_{name}_window_s"] = window.window_s
            metrics[f"energy_{name}_units"] = window.units
    return metrics
