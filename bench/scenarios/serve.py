"""`melt-bench serve`: requests that arrive, join a running batch when a slot frees and leave at
their own length (continuous batching, models/continuous_batching.py), measured as serving
benchmarks measure them (vLLM's `bench serve`, SGLang's `bench_serving`): per request TTFT,
TPOT, every ITL, E2E and queueing delay; per point output tokens/s, requests/s, their p50/p90/p99
and goodput under an SLO. Its options, its point, its end-of-sweep table and its measurement
(`measure`: the serve run in a fresh child, after capacity's search for the slots when the point
has a budget). Torch-free: the command line builds these before torch loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from melt_bench.models.names import Engine
from melt_bench.reporting.summary_tables import Column, TableSpec, ms_cell, rate_cell
from melt_bench.running.sweep_plan import SweepPoint, variant_label

Load = Literal["concurrency", "rate"]
DATASETS = ("random", "gsm8k")


@dataclass(frozen=True)
class ServePoint(SweepPoint):
    """One serving run: `batch_size` is the slots (0: the largest count that fits
    `memory_budget_bytes`, capacity's search), `seq_len` the prompt tokens and `new_tokens` the
    output tokens of every request (dataset gsm8k: each question's own prompt, its reference
    answer's length as output, at most `new_tokens`; `seq_len` 0). Closed loop (`concurrency`
    requests in the system) or open loop (Poisson arrivals at `request_rate` per second, seeded)."""

    load: Load = "concurrency"
    concurrency: int | None = None
    request_rate: float | None = None
    num_requests: int = 16
    dataset: str = "random"
    data_dir: str | None = None  # a local GSM8K copy (DIR/gsm8k/test.jsonl or DIR/test.jsonl); None: the hub
    seed: int = 0
    warmup: int = 1  # untimed serve runs first (a compiled engine compiles in the first)
    timed_runs: int = 2
    early_exit: float | None = None
    engine: Engine = "eager"
    threads: int | None = None
    memory_budget_bytes: int | None = None
    max_slots: int | None = None  # a budget's search goes no higher (vLLM's max_num_seqs)
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None

    @property
    def timed(self) -> bool:
        return True

    def load_label(self) -> str:
        return f"c={self.concurrency}" if self.load == "concurrency" else f"rate={self.request_rate:g}/s"

    def label(self) -> str:
        slots = self.batch_size or "searched"
        prompt = "gsm8k" if self.dataset == "gsm8k" else self.seq_len
        return (f"{variant_label(self)} loops={self.loops} prompt={prompt} out={self.new_tokens} slots={slots} "
                f"{self.load_label()}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ServeOptions:
    """serve's own flags, checked by the command. `slots` None: each closed-loop point gets as
    many slots as its concurrency (an open-loop point needs --slots or --budget)."""

    concurrency: tuple[int, ...] = ()
    request_rates: tuple[float, ...] = ()
    output_lens: tuple[int, ...] = ()  # () until the command sets the machine's default
    num_requests: int = 16
    slots: tuple[int, ...] | None = None
    budget_bytes: int | None = None
    max_slots: int = 256
    dataset: str = "random"
    data_dir: str | None = None
    seed: int = 0
    warmup: int = 1
    timed_runs: int = 2
    early_exit: float | None = None
    engine: Engine = "eager"
    threads: int | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None

    def loads(self) -> list[tuple[str, int | None, float | None]]:
        return ([("concurrency", c, None) for c in self.concurrency]
                + [("rate", None, r) for r in self.request_rates])

    def points(self, axes: SweepPoint) -> list[ServePoint]:
        """The serve points of one sweep point: every (output length, load, slot count)."""
        points = []
        for output_len in self.output_lens:
            for load, concurrency, rate in self.loads():
                if self.budget_bytes is not None:
                    slot_counts = [0]
                elif self.slots is not None:
                    slot_counts = list(self.slots)
                else:
                    slot_counts = [concurrency]
                for slots in slot_counts:
                    points.append(ServePoint(
                        **{**axes.axes(), "batch_size": slots, "new_tokens": output_len,
                           "seq_len": 0 if self.dataset == "gsm8k" else axes.seq_len},
                        load=load, concurrency=concurrency, request_rate=rate, num_requests=self.num_requests,
                        dataset=self.dataset, data_dir=self.data_dir, seed=self.seed, warmup=self.warmup,
                        timed_runs=self.timed_runs, early_exit=self.early_exit, engine=self.engine,
                        threads=self.threads, memory_budget_bytes=self.budget_bytes,
                        max_slots=self.max_slots if self.budget_bytes is not None else None,
                        slo_ttft_ms=self.slo_ttft_ms, slo_tpot_ms=self.slo_tpot_ms))
        return points


def parse_slo(text: str | None) -> tuple[float | None, float | None]:
    """--slo ttft=MS,tpot=MS (either or both) -> (ttft_ms, tpot_ms); ValueError naming the problem."""
    if text is None:
        return None, None
    limits: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if name not in ("ttft", "tpot") or not sep or name in limits:
            raise ValueError(f"{text!r} is not ttft=MS,tpot=MS (either or both, each once)")
        try:
            limits[name] = float(value)
        except ValueError:
            raise ValueError(f"{text!r}: {value!r} is not a number of milliseconds") from None
        if not limits[name] > 0:
            raise ValueError(f"{text!r}: {name} must be a positive number of milliseconds")
    return limits.get("ttft"), limits.get("tpot")


def _goodput(metrics: dict) -> str:
    if metrics.get("goodput_requests_per_s") is None:
        return "-"
    return f"{metrics['goodput_requests_per_s']:.2f} ({metrics['slo_attained_fraction']:.0%})"


SUMMARY = TableSpec(
    "serve", "serving (median over timed runs; latencies are each run's percentiles over its requests)",
    [Column(" tok/s", rate_cell("output_tokens_per_s")), Column(" p90 TTFT", ms_cell("ttft_ms_p90")),
     Column(" p90 TPOT", ms_cell("tpot_ms_p90")), Column(" slots", lambda m: str(m.get("slots", "-"))),
     Column(" goodput req/s", _goodput)],
    "output_tokens_per_s", "output tok/s",
    ("seq_len", "new_tokens", "load", "concurrency", "request_rate", "batch_size", "dtype", "device", "engine"),
    measured=lambda metrics: (metrics.get("completed_requests") or 0) > 0,
    nothing_measured="no request completed at any point (see each row's error)",
)


def measure(point: ServePoint, timeout_s: float, gpu: str | None = None) -> dict:
    """The point (in this process: capacity's probes, then the serve run, each a child of its own)."""
    from melt_bench.scenarios.measure_serve import serve_point

    return serve_point(point, timeout_s, gpu)
