"""Continuous batching over the decode engine: every request's greedy tokens equal its batch-1
decode (mixed prompt and output lengths, slots refilled several times, Ouro, MELT, MELT's chunk
reads, a sharing policy and Huginn), stop tokens and sequences end a request, closed and open loop let
requests in as they say, and each token's exit depth is recorded under early stopping."""

import functools

import pytest
import torch
from conftest import make_huginn, make_melt, make_ouro

from melt_bench.models.continuous_batching import ContinuousBatcher, Request
from melt_bench.models.decode_engine import DecodeEngine

LOOPS, CAPACITY = 4, 24


def ouro_mean():
    model = make_ouro()
    model.use_kv_policy("mean")
    return model


MODELS = {"ouro": make_ouro, "melt": functools.partial(make_melt, chunk_size=5),
          "melt-chunk-reads": functools.partial(make_melt, chunk_size=5, decode_reads="chunk"),
          "ouro-mean": ouro_mean,
          # Huginn from a fixed initial state: a random one is drawn per step for the whole batch,
          # so a request's tokens would depend on its neighbours' draws
          "huginn": functools.partial(make_huginn, fixed_state=True),
          "huginn-compress-s4": functools.partial(make_huginn, "compress-s4", fixed_state=True)}


def mixed_requests(count: int = 7, **extra) -> list[Request]:
    """Prompts of 3-13 tokens and 2-9 new tokens, in an order that refills the slots unevenly."""
    generator = torch.Generator().manual_seed(3)
    requests = []
    for index in range(count):
        prompt_len = 3 + (index * 5) % 11
        prompt = torch.randint(1, 97, (prompt_len,), generator=generator).tolist()
        requests.append(Request(index, tuple(prompt), 2 + (index * 3) % 8, **extra))
    return requests


def batch_one_tokens(model, request: Request, engine: str = "eager") -> list[int]:
    """The reference: the request decoded alone, at batch 1, for its whole token limit."""
    decoder = DecodeEngine(model, LOOPS, 1, CAPACITY, engine)
    out = decoder.prefill(torch.tensor([request.prompt]))
    tokens = [int(out.token)]
    while len(tokens) < request.max_new_tokens:
        out = decoder.step(out.token)
        tokens.append(int(out.token))
    return tokens


@pytest.mark.parametrize("name", MODELS)
def test_every_request_gets_the_tokens_of_its_batch_one_decode(name):
    model = MODELS[name]()
    requests = mixed_requests()
    with torch.inference_mode():
        batcher = ContinuousBatcher(model, LOOPS, slots=3, capacity=CAPACITY)
        done = batcher.run(requests)
        expected = {r.request_id: batch_one_tokens(model, r) for r in requests}
    assert sorted(c.request_id for c in done) == list(range(len(requests)))
    for completion in done:
        assert completion.tokens == expected[completion.request_id], completion.request_id
        assert completion.finish_reason == "length"
    # 7 requests through 3 slots: every slot was refilled, and requests ran side by side
    assert {c.slot for c in done} == {0, 1, 2}
    assert max(o.running for o in batcher.occupancy) == 3
    assert max(max(c.requests_in_batch) for c in done) == 3


def test_the_compiled_engine_serves_the_same_tokens():
    model = make_ouro()
    requests = mixed_requests(4)
    with torch.inference_mode():
        done = ContinuousBatcher(model, LOOPS, slots=2, capacity=CAPACITY, engine="compiled").run(requests)
        expected = {r.request_id: batch_one_tokens(model, r) for r in requests}
    assert {c.request_id: c.tokens for c in done} == expected


def test_a_stop_token_or_stop_sequence_ends_a_request_where_it_appears():
    model = make_ouro()
    plain = mixed_requests(4)
    with torch.inference_mode():
        full = {r.request_id: batch_one_tokens(model, r) for r in plain}
    # Stop on a token each output has at its second position, or on its tokens 2-3 as a sequence.
    requests = [Request(r.request_id, r.prompt, r.max_new_tokens,
                        stop_token_ids=(full[r.request_id][1],) if r.request_id % 2 else (),
                        stop_sequences=() if r.request_id % 2 or r.max_new_tokens < 3
                        else (tuple(full[r.request_id][1:3]),))
                for r in plain]
    with torch.inference_mode():
        done = {c.request_id: c for c in ContinuousBatcher(model, LOOPS, 2, CAPACITY).run(requests)}
    for request in requests:
        tokens, completion = full[request.request_id], done[request.request_id]
        if request.stop_token_ids:
            cut = tokens.index(request.stop_token_ids[0]) + 1
            assert (completion.tokens, completion.finish_reason) == (tokens[:cut], "eos")
        elif request.stop_sequences:
            sequence = request.stop_sequences[0]
            cut = next(i + len(sequence) for i in range(len(tokens)) if tuple(tokens[i:i + len(sequence)]) == sequence)
            assert (completion.tokens, completion.finish_reason) == (tokens[:cut], "stop")
        else:  # no stop asked of a two-token request
            assert (completion.tokens, completion.finish_reason) == (tokens, "length")


def test_closed_loop_keeps_that_many_requests_in_the_system_and_replaces_each_at_once():
    model = make_ouro()
    requests = mixed_requests(6)
    with torch.inference_mode():
        batcher = ContinuousBatcher(model, LOOPS, slots=3, capacity=CAPACITY)
        batcher.clock = lambda: float(batcher.steps)  # time counted in decode steps: exact
        done = batcher.run(requests, concurrency=2)
    assert len(done) == 6
    assert max(o.running + o.waiting for o in batcher.occupancy) == 2  # a free third slot stays free
    finished_at = sorted(c.token_times_s[-1] for c in done)
    arrived_at = sorted(c.arrival_s for c in done)
    assert arrived_at[:2] == [0.0, 0.0] and arrived_at[2:] == finished_at[:4]  # each replaced when one finished
    for completion in done:
        assert completion.queue_s == 0 and completion.ttft_s == 0  # a slot was free: prefilled at once
        assert completion.itl_s == [1.0] * (len(completion.tokens) - 1)  # one token a step, every step
        assert completion.tpot_s == 1.0 and completion.e2e_s == len(completion.tokens) - 1


def test_open_loop_admits_no_request_before_it_arrives_and_queues_when_slots_are_full():
    model = make_ouro()
    base = mixed_requests(5)
    # four arrive at once into two slots (two must queue), one much later, when all is idle
    arrivals = [0.0, 0.0, 0.0, 0.0, 0.3]
    requests = [Request(r.request_id, r.prompt, r.max_new_tokens, arrival_s=a) for r, a in zip(base, arrivals)]
    with torch.inference_mode():
        done = {c.request_id: c for c in ContinuousBatcher(model, LOOPS, slots=2, capacity=CAPACITY).run(requests)}
    assert all(c.admitted_s >= c.arrival_s for c in done.values())
    assert sum(c.queue_s > 0 and c.admitted_s >= min(x.token_times_s[-1] for x in done.values())
               for c in done.values()) >= 2  # the queued two waited for a slot to free
    assert done[4].arrival_s == 0.3 and done[4].admitted_s >= 0.3


def test_early_stopping_records_each_tokens_exit_depth_and_the_loops_its_batch_ran():
    model = make_ouro()
    with torch.no_grad():  # an exit gate that lets some tokens leave early
        model.model.early_exit_gate.bias.fill_(0.5)
    requests = mixed_requests(5)
    with torch.inference_mode():
        done = ContinuousBatcher(model, LOOPS, 2, CAPACITY, early_stop_threshold=0.5).run(requests)
    exits = [e for c in done for e in c.exit_loops[1:]]
    runs = [r for c in done for r in c.loops_run[1:]]
    assert all(1 <= e <= r <= LOOPS for e, r in zip(exits, runs))
    assert min(exits) < LOOPS  # some token exited before the last loop
    assert all(c.exit_loops[0] == c.loops_run[0] == LOOPS for c in done)  # the prefill runs every loop


def test_a_request_that_does_not_fit_a_slot_is_refused_before_anything_runs():
    model = make_ouro()
    batcher = ContinuousBatcher(model, LOOPS, 2, capacity=8)
    with pytest.raises(ValueError, match="need 9 cache rows, a slot holds 8"):
        batcher.run([Request(0, (1, 2, 3), 2), Request(1, (1, 2, 3, 4, 5), 5)])
    assert batcher.steps == 0
