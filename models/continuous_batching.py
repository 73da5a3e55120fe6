"""Continuous batching over the static-shape decode engine: S serving slots, each a sequence of
one `DecodeEngine` batch with a position of its own. A request waits until it has arrived and
a slot is free, is prefilled alone into that slot (the others pause: prefill first, as vLLM's
default scheduler without chunked prefill), then decodes with every running request, one token
per step, and leaves at an end-of-sequence token, a stop sequence or its token limit; the slot
takes the next request at once.

The step's shape never changes (S sequences, the whole capacity under a per-sequence mask), so
the compiled engine keeps one graph; a free slot decodes a throwaway token parked at position 0
and nothing reads it. Greedy, so that a request's tokens are those of its batch-1 decode
(tests/test_continuous_batching.py). Every time is read after the tokens are on the host (a
device sync), from one clock: the request's latencies (TTFT, TPOT, ITL, E2E, queueing) are
measured, never derived from the step count.

Arrivals: each request's `arrival_s` after the run starts (open loop: Poisson or any schedule
the caller draws), or closed loop (`concurrency`: that many requests in the system, a finished
one replaced by the next at the moment it finishes).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .decode_engine import DecodeEngine
from .looped import LoopedForCausalLM


@dataclass(frozen=True)
class Request:
    """What a client sends: prompt token ids, a token limit, and when to stop before it."""

    request_id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival_s: float = 0.0  # after the run starts (open loop); ignored in closed loop
    stop_token_ids: tuple[int, ...] = ()  # end-of-sequence tokens
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token sequences that end the output
    # or any rule over the output so far (lm-eval's stop strings, on the decoded text)
    stop_check: Callable[[list[int]], bool] | None = field(default=None, compare=False)


@dataclass
class Completion:
    """One finished request: its tokens (a stop token or sequence included) and when each was
    known, in seconds after the run started."""

    request_id: int
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str  # "length", "eos" or "stop"
    slot: int
    arrival_s: float
    admitted_s: float  # its prefill began
    token_times_s: list[float]  # each token on the host; the first at the end of the prefill
    exit_loops: list[int]  # the loop (1-based) each token's exit rule chose; all loops for the first
    loops_run: list[int]  # the loops its step ran (the batch runs until its last token exits)
    requests_in_batch: list[int]  # running requests at each token's step (1 for the first)

    @property
    def queue_s(self) -> float:
        return self.admitted_s - self.arrival_s

    @property
    def ttft_s(self) -> float:
        return self.token_times_s[0] - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.token_times_s[-1] - self.arrival_s

    @property
    def itl_s(self) -> list[float]:
        """Inter-token latencies: the gaps between its consecutive tokens."""
        return [b - a for a, b in zip(self.token_times_s, self.token_times_s[1:])]

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (None for a one-token output)."""
        if len(self.tokens) < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / (len(self.tokens) - 1)


@dataclass
class Occupancy:
    """The batch after one step (or admission): requests running, waiting, and the tokens whose
    K/V rows the running requests hold (prompt + tokens decoded so far)."""

    time_s: float
    running: int
    waiting: int
    tokens_held: int


@dataclass
class _Running:
    request: Request
    slot: int
    admitted_s: float
    arrival_s: float
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    exit_loops: list[int] = field(default_factory=list)
    loops_run: list[int] = field(default_factory=list)
    in_batch: list[int] = field(default_factory=list)

    def add(self, token: int, now: float, exit_loop: int, loops_run: int, in_batch: int) -> str | None:
        """Record a token; the finish reason if the request is done."""
        self.tokens.append(token)
        self.times.append(now)
        self.exit_loops.append(exit_loop)
        self.loops_run.append(loops_run)
        self.in_batch.append(in_batch)
        if token in self.request.stop_token_ids:
            return "eos"
        if any(len(s) and tuple(self.tokens[-len(s):]) == s for s in self.request.stop_sequences):
            return "stop"
        if self.request.stop_check is not None and self.request.stop_check(self.tokens):
            return "stop"
        if len(self.tokens) >= self.request.max_new_tokens:
            return "length"
        return None

    def done(self, reason: str) -> Completion:
        return Completion(self.request.request_id, len(self.request.prompt), self.tokens, reason, self.slot,
                          self.arrival_s, self.admitted_s, self.times, self.exit_loops, self.loops_run, self.in_batch)


class ContinuousBatcher:
    """Serve requests through one `DecodeEngine` of `slots` sequences and `capacity` tokens each
    (engine "eager" or "compiled", early stopping as the engine does it)."""

    def __init__(
        self, model: LoopedForCausalLM, loops: int, slots: int, capacity: int, engine: str = "eager",
        early_stop_threshold: float | None = None, clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.engine = DecodeEngine(model, loops, slots, capacity, engine, early_stop_threshold,
                                   per_sequence_positions=True)
        self.slots, self.capacity, self.loops, self.clock = slots, capacity, loops, clock
        self.occupancy: list[Occupancy] = []  # one entry per admission and per step of the last run
        self.steps = 0

    def check(self, request: Request) -> None:
        """ValueError unless the request fits a slot: its prompt and every token but the last
        (whose rows are never written) within the capacity."""
        if not request.prompt or request.max_new_tokens < 1:
            raise ValueError(f"request {request.request_id}: needs a prompt and at least one new token")
        need = len(request.prompt) + request.max_new_tokens - 1
        if need > self.capacity:
            raise ValueError(f"request {request.request_id}: {len(request.prompt)} prompt + {request.max_new_tokens} "
                             f"new tokens need {need} cache rows, a slot holds {self.capacity}")

    def run(self, requests: Sequence[Request], concurrency: int | None = None,
            on_finish: Callable[[Completion], None] | None = None) -> list[Completion]:
        """Serve every request; returns their completions in the order they finished.
        `concurrency`: closed loop with that many requests in the system (arrival_s ignored;
        each arrives when it is let in). Otherwise open loop, at each request's arrival_s."""
        for request in requests:
            self.check(request)
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        pending = deque(requests if concurrency else sorted(requests, key=lambda r: r.arrival_s))
        waiting: deque[tuple[Request, float]] = deque()
        running: dict[int, _Running] = {}
        free = list(range(self.slots))
        finished: list[Completion] = []
        self.occupancy, self.steps = [], 0
        tokens = torch.zeros(self.slots, 1, dtype=torch.long, device=self.engine.model.device)
        start = self.clock()

        def now() -> float:
            return self.clock() - start

        def finish(state: _Running, reason: str) -> None:
            completion = state.done(reason)
            finished.append(completion)
            del running[state.slot]
            free.append(state.slot)
            if on_finish is not None:
                on_finish(completion)

        def note() -> None:
            held = sum(len(s.request.prompt) + len(s.tokens) - 1 for s in running.values())
            self.occupancy.append(Occupancy(now(), len(running), len(waiting), held))

        while pending or waiting or running:
            if concurrency:
                while pending and len(waiting) + len(running) < concurrency:
                    waiting.append((pending.popleft(), now()))
            else:
                while pending and pending[0].arrival_s <= now():
                    request = pending.popleft()
                    waiting.append((request, request.arrival_s))
            while waiting and free:
                request, arrived = waiting.popleft()
                slot = min(free)
                free.remove(slot)
                state = _Running(request, slot, now(), arrived)
                running[slot] = state
                prompt = torch.tensor([request.prompt], dtype=torch.long, device=tokens.device)
                first = int(self.engine.prefill_sequence(slot, prompt).token)  # on the host: synced
                tokens[slot, 0] = first
                reason = state.add(first, now(), self.loops, self.loops, 1)
                if reason:
                    finish(state, reason)
                note()
            if not running:
                if pending and not concurrency:  # idle until the next arrival
                    time.sleep(max(0.0, pending[0].arrival_s - now()))
                continue
            if free:  # parked: a free slot's throwaway steps stay in range
                self.engine.set_positions(free, 0)
            out = self.engine.step(tokens)
            self.steps += 1
            picked = out.token[:, 0].tolist()  # on the host: the step is done
            exits = out.exit_steps.view(-1).tolist() if out.exit_steps is not None else None
            at, in_batch = now(), len(running)
            for slot, state in list(running.items()):
                tokens[slot, 0] = picked[slot]
                exit_loop = exits[slot] + 1 if exits is not None else out.loops_run
                reason = state.add(picked[slot], at, exit_loop, out.loops_run, in_batch)
                if reason:
                    finish(state, reason)
            note()
        return finished
