"""Every cache reports the bytes it holds; the analytic prediction must agree exactly."""

import pytest
import torch
from conftest import make_melt, make_ouro

from melt_bench.models import get_preset, kv_bytes_per_token, predict_kv_cache_bytes
from melt_bench.models.presets import model_class


@pytest.mark.parametrize("make", [make_ouro, make_melt])
@pytest.mark.parametrize(
    "loops,batch,tokens,dtype",
    [(1, 1, 5, torch.float32), (4, 2, 9, torch.float32), (8, 3, 17, torch.bfloat16), (3, 1, 2, torch.float16)],
)
def test_cache_bytes_equal_prediction(make, loops, batch, tokens, dtype):
    model = make().to(dtype)
    ids = torch.randint(1, 97, (batch, tokens))
    cache = model.new_cache(loops)
    model(ids[:, :-1], past_key_values=cache, loops=loops)
    model(ids[:, -1:], past_key_values=cache, loops=loops)  # one decode step grows the cache
    assert cache.nbytes() == predict_kv_cache_bytes(model.config, loops, batch, tokens, dtype)


@pytest.mark.parametrize("make", [make_ouro, make_melt])
def test_cache_allocated_ahead_holds_every_slot_before_the_first_forward(make, ids):
    model = make()
    cache = model.new_cache(3, capacity=20, batch_size=2)
    expected = predict_kv_cache_bytes(model.config, 3, 2, 20, torch.float32)
    assert cache.nbytes() == expected
    full = model(ids, use_cache=False, loops=3).logits
    torch.testing.assert_close(model(ids, past_key_values=cache, loops=3).logits, full, rtol=1e-4, atol=1e-5)
    assert cache.nbytes() == expected
    with pytest.raises(ValueError, match="batch 2"):
        model(ids[:1], past_key_values=model.new_cache(3, capacity=20, batch_size=2), loops=3)


@pytest.mark.parametrize("make", [make_ouro, make_melt])
def test_preallocated_cache_holds_its_capacity(make):
    model = make()
    cache = model.new_cache(4, capacity=40)
    model(torch.randint(1, 97, (2, 6)), past_key_values=cache)
    assert cache.nbytes() == predict_kv_cache_bytes(model.config, 4, 2, 40, torch.float32)


def measured_kv_bytes(make, loops, tokens=6):
    model = make()
    cache = model.new_cache(loops)
    model(torch.randint(1, 97, (1, tokens)), past_key_values=cache, loops=loops)
    return cache.nbytes()


def test_ouro_kv_is_linear_in_loops_and_melt_constant():
    ouro = {t: measured_kv_bytes(make_ouro, t) for t in (1, 2, 8, 16)}
    melt = {t: measured_kv_bytes(make_melt, t) for t in (1, 2, 8, 16)}
    assert ouro[8] == 8 * ouro[1] and ouro[16] == 16 * ouro[1] and ouro[2] == 2 * ouro[1]
    assert len(set(melt.values())) == 1
    assert melt[1] == ouro[1]  # one loop: both hold one cache per layer
    assert make_ouro().kv_bytes_per_token(loops=8) * 6 == ouro[8]
    assert make_melt().kv_bytes_per_token(loops=8) * 6 == melt[8]


@pytest.mark.parametrize("preset,expected", [("ouro-1.4b", 786_432), ("melt-1.4b", 196_608)])
def test_1_4b_bf16_kv_bytes_per_token_at_4_loops(preset, expected):
    # The MELT paper's figures. Measured on the real config's cache objects, on the meta device.
    config = get_preset(preset).config()
    assert kv_bytes_per_token(config, 4, torch.bfloat16) == expected
    with torch.device("meta"):
        model = model_class(get_preset(preset).family)(config).to(torch.bfloat16)
        cache = model.new_cache(4)
        model(torch.zeros(1, 3, dtype=torch.long), past_key_values=cache, logits_to_keep=1)
    assert cache.nbytes() == 3 * expected


def test_the_mid_presets_are_the_cpu_decode_limit_shape():
    """ouro-mid / melt-mid: the shape issue #33 compares with llama.cpp's Ouro (hidden 512, 8
    layers, 8 heads x 64, intermediate 1408, vocab 32,000, untied, 4 loops; ~58 M parameters)."""
    from melt_bench.models.presets import count_parameters, get_preset

    ouro, melt = get_preset("ouro-mid"), get_preset("melt-mid")
    config = ouro.config()
    shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.head_dim,
             config.intermediate_size, config.vocab_size, config.tie_word_embeddings, config.total_ut_steps)
    assert shape == (512, 8, 8, 64, 1408, 32000, False, 4) and melt.fields == ouro.fields
    gates = 8 * (2 * 512 * 512 + 512)  # MELT's element-wise gate per layer
    assert count_parameters(ouro) == 58_475_521 and count_parameters(melt) == count_parameters(ouro) + gates
