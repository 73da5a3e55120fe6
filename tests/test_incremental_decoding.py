"""Decoding with the cache must give the logits of a full forward without it."""

import pytest
import torch
from conftest import make_melt, make_ouro


def decode_step_by_step(model, ids, prompt_len, loops, capacity=None):
    cache = model.new_cache(loops, capacity)
    logits = [model(ids[:, :prompt_len], past_key_values=cache, loops=loops).logits]
    for i in range(prompt_len, ids.shape[1]):
        logits.append(model(ids[:, i : i + 1], past_key_values=cache, loops=loops).logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("loops", [1, 2, 4, 7])
@pytest.mark.parametrize("capacity", [None, 32])
def test_ouro_incremental_matches_full_forward(ids, loops, capacity):
    model = make_ouro()
    full = model(ids, use_cache=False, loops=loops).logits
    inc, cache = decode_step_by_step(model, ids, 5, loops, capacity)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-5)
    assert cache.seq_len == ids.shape[1]
    assert cache.allocated_slots() == loops * model.config.num_hidden_layers


@pytest.mark.parametrize("loops", [1, 3, 4])
def test_melt_token_chunks_match_step_by_step(ids, loops):
    # With one-token chunks the full forward is exactly what decoding does.
    model = make_melt(chunk_size=1)
    full = model(ids, use_cache=False, loops=loops).logits
    inc, cache = decode_step_by_step(model, ids, 5, loops)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-5)
    assert cache.allocated_slots() == model.config.num_hidden_layers


@pytest.mark.parametrize("loops", [2, 4])
def test_melt_chunked_prefill_matches_full_forward(ids, loops):
    model = make_melt(chunk_size=4)
    full = model(ids, use_cache=False, loops=loops).logits
    cache = model.new_cache(loops)
    first = model(ids[:, :8], past_key_values=cache, loops=loops).logits
    rest = model(ids[:, 8:], past_key_values=cache, loops=loops).logits
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-4, atol=1e-5)


def test_explicit_chunk_starts_replace_the_chunk_size(ids):
    model = make_melt(chunk_size=4)
    by_size = model(ids, use_cache=False).logits
    torch.testing.assert_close(model(ids, use_cache=False, chunk_starts=range(0, ids.shape[1], 4)).logits, by_size)
    prefill_then_tokens = [0, 5, *range(8, ids.shape[1])]
    inc, _ = decode_step_by_step(make_melt(chunk_size=5), ids, 8, 4)  # chunks [0, 5), [5, 8), then tokens
    torch.testing.assert_close(model(ids, use_cache=False, chunk_starts=prefill_then_tokens).logits, inc,
                               rtol=1e-4, atol=1e-5)
    for bad in ([1, 4], [0, 4, 4], [0, ids.shape[1]]):
        with pytest.raises(ValueError, match="chunk_starts"):
            model(ids, use_cache=False, chunk_starts=bad)


def test_melt_chunking_changes_results_when_the_gate_matters(ids):
    # Inside a chunk tokens read each other's loop-t rows, across chunks the final rows: the
    # chunk size is part of the model's semantics, so the two must differ.
    one_chunk = make_melt(chunk_size=None)(ids, use_cache=False).logits
    token_chunks = make_melt(chunk_size=1)(ids, use_cache=False).logits
    assert not torch.allclose(one_chunk[:, 1:], token_chunks[:, 1:], atol=1e-4)
    torch.testing.assert_close(one_chunk[:, 0], token_chunks[:, 0])


def test_left_padded_batch_matches_single_sequences():
    model = make_ouro()
    torch.manual_seed(3)
    a, b = torch.randint(1, 97, (1, 7)), torch.randint(1, 97, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    logits = model(batch, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(logits[0], model(a, use_cache=False).logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[1, 3:], model(b, use_cache=False).logits[0], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(logits).all()


def test_cache_laid_out_for_other_loops_is_refused(ids):
    model = make_ouro()
    cache = model.new_cache(loops=2)
    with pytest.raises(ValueError, match="laid out for 2 loops"):
        model(ids, past_key_values=cache, loops=4)


def test_preallocated_cache_refuses_overflow(ids):
    model = make_ouro()
    with pytest.raises(ValueError, match="capacity 8 tokens exceeded"):
        model(ids, past_key_values=model.new_cache(4, capacity=8))
