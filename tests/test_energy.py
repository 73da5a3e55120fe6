"""Energy per prefill and per token from a fake NVML: the counter, its absence, a counter too
coarse to use, nothing at all; and what a latency row says when no GPU is there."""

import bisect

import pytest

from melt_bench.scenarios.latency import LatencyPoint
from melt_bench.scenarios.measure_latency import measure_latency_point
from melt_bench.trackers.energy import COUNTER, POWER, EnergyMeter, energy_metrics

IDLE_W, BUSY_W = 60.0, 160.0  # the work adds 100 W


class NotSupported(Exception):
    pass


class FakeGpu:
    """A GPU on a fake clock: power is IDLE_W, plus 100 W while a workload runs. The energy
    counter (mJ) only moves every `update_s`; the power reading (mW) is the mean of the last
    second, as on recent NVIDIA GPUs."""

    def __init__(self, update_s: float | None = 0.02, power: bool = True) -> None:
        self.t, self.energy_j = 0.0, 0.0
        self.update_s, self.power = update_s, power
        self.history = [(0.0, 0.0)]  # (time, cumulative joules)

    # the clock the meter reads, and the work that moves it
    def clock(self) -> float:
        return self.t

    def run(self, seconds: float, watts: float) -> None:
        self.t += seconds
        self.energy_j += seconds * watts
        self.history.append((self.t, self.energy_j))

    def sleep(self, seconds: float) -> None:
        self.run(seconds, IDLE_W)

    def energy_at(self, t: float) -> float:
        times = [h[0] for h in self.history]
        i = max(bisect.bisect_right(times, t) - 1, 0)
        t0, e0 = self.history[i]
        if i + 1 == len(self.history):
            return e0
        t1, e1 = self.history[i + 1]
        return e0 + (e1 - e0) * (t - t0) / (t1 - t0)

    # the pynvml calls EnergyMeter makes
    def nvmlDeviceGetTotalEnergyConsumption(self, handle) -> int:
        if self.update_s is None:
            raise NotSupported("Not Supported")
        last_update = int(self.t / self.update_s) * self.update_s
        return int(self.energy_at(last_update) * 1000)

    def nvmlDeviceGetPowerUsage(self, handle) -> int:
        if not self.power:
            raise NotSupported("Insufficient Permissions")
        window = min(1.0, self.t) or 1e-9
        return int((self.energy_at(self.t) - self.energy_at(self.t - window)) / window * 1000)


def meter_for(gpu: FakeGpu) -> EnergyMeter:
    return EnergyMeter(gpu, handle=None, clock=gpu.clock, sleep=gpu.sleep)


def workload(gpu: FakeGpu, seconds: float, units: int):
    def run() -> int:
        gpu.run(seconds, BUSY_W)
        return units
    return run


def test_counter_measures_energy_above_idle():
    gpu = FakeGpu(update_s=0.02)
    meter = meter_for(gpu)
    assert meter.source == COUNTER and meter.counter_interval_s == pytest.approx(0.02, rel=0.1)
    assert meter.measure_idle() == pytest.approx(IDLE_W, rel=0.03)
    # A 50 ms prefill spans ~2 counter updates: the window is extended to >= 10 updates and 1 s.
    window = meter.measure(workload(gpu, 0.05, 1))
    assert window.window_s >= 1.0 and window.units >= 20
    assert window.joules_per_unit == pytest.approx(100 * 0.05, rel=0.05)
    metrics = energy_metrics(meter, window, meter.measure(workload(gpu, 0.2, 32)))
    assert metrics["energy_decode_j_per_token"] == pytest.approx(100 * 0.2 / 32, rel=0.05)
    assert "idle power subtracted" in metrics["energy_source"]
    assert metrics["energy_counter_update_ms"] == pytest.approx(20, rel=0.1)


@pytest.mark.parametrize("gpu,why", [(FakeGpu(update_s=None), "counter unavailable: Not Supported"),
                                     (FakeGpu(update_s=0.8), "counter too coarse")])
def test_without_a_usable_counter_power_readings_are_integrated(gpu, why):
    meter = meter_for(gpu)
    assert meter.source.startswith(POWER) and why in meter.source
    meter.measure_idle()
    window = meter.measure(workload(gpu, 0.05, 1))
    assert window.window_s >= 5.0
    # The readings are 1 s averages, so the edges of the window blur: within 15 %.
    assert window.joules_per_unit == pytest.approx(100 * 0.05, rel=0.15)


def test_nothing_readable_says_why_and_never_zero():
    meter = meter_for(FakeGpu(update_s=None, power=False))
    assert not meter.available and meter.source.startswith("unavailable")
    assert "Insufficient Permissions" in meter.source
    assert meter.measure_idle() is None and meter.measure(lambda: 1) is None
    metrics = energy_metrics(meter, None, None)
    assert metrics["energy_prefill_j"] is None and metrics["energy_decode_j_per_token"] is None
    assert metrics["energy_source"] == meter.source


def test_latency_point_reads_energy_through_the_meter():
    """The harness's windows around real prefills and decode runs, on a fake GPU clock that each
    run advances (CPU compute, fake energy)."""
    gpu = FakeGpu(update_s=0.02)
    meter = meter_for(gpu)
    point = LatencyPoint("latency", "ouro-tiny", 2, 16, 2, "decode", 4, "float32", "cpu", warmup=0, timed_runs=1)
    calls = []
    real_measure = meter.measure

    def measure(run):
        def timed():
            units = run()
            gpu.run(0.01, BUSY_W)  # each repetition costs 10 ms of busy fake time
            calls.append(units)
            return units
        return real_measure(timed)

    meter.measure = measure
    row = measure_latency_point(point, meter=meter)
    m = row["metrics"]
    assert row["status"] == "ok", row["error"]
    assert m["energy_source"].startswith(COUNTER)
    # 1 prefill per repetition; 4 steps x batch 2 = 8 generated tokens per decode repetition.
    assert set(calls) == {1, 8}
    assert m["energy_prefill_j"] == pytest.approx(100 * 0.01, rel=0.05)
    assert m["energy_decode_j_per_token"] == pytest.approx(100 * 0.01 / 8, rel=0.05)
    assert m["energy_prefill_window_s"] >= 1.0 and m["energy_decode_units"] % 8 == 0
