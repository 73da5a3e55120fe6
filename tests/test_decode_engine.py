"""The static-shape decode engine: the same tokens and logits as the model's own forward, eager
and compiled; maskless chunked prefill equal to the masked one; Ouro's optional prefill chunks."""

import functools

import pytest
import torch
from conftest import make_melt, make_ouro
from torch.nn.attention.bias import CausalBias

from melt_bench.models import looped
from melt_bench.models.decode_engine import DecodeEngine

NEW_TOKENS = 6


def forward_decode(model, ids, loops=4, threshold=None, chunk_starts=None):
    """The reference: the model's own forward() per token over a growing cache."""
    cache = model.new_cache(loops)
    logits = model(ids, past_key_values=cache, loops=loops, chunk_starts=chunk_starts).logits[:, -1]
    tokens, steps, loops_run = [logits.argmax(-1, keepdim=True)], [], []
    for _ in range(NEW_TOKENS):
        out = model(tokens[-1], past_key_values=cache, loops=loops, early_stop_threshold=threshold)
        steps.append(out.logits[:, -1])
        loops_run.append(out.loops_run)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, 1), steps, loops_run


def engine_decode(engine: DecodeEngine, ids, chunk_starts=None):
    out = engine.prefill(ids, chunk_starts)
    tokens, steps, loops_run = [out.token], [], []
    for _ in range(NEW_TOKENS):
        out = engine.step(out.token)
        tokens.append(out.token)
        steps.append(out.logits)
        loops_run.append(out.loops_run)
    return torch.cat(tokens, 1), steps, loops_run


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


MODELS = {"ouro": make_ouro, "melt": functools.partial(make_melt, chunk_size=5),
          # decoding continues the prompt's chunk grid: 12 prompt tokens, then chunk [10, 15) fills, [15, 20) opens
          "melt-chunk-reads": functools.partial(make_melt, chunk_size=5, decode_reads="chunk")}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_eager_engine_equals_the_models_forward(name, threshold, ids):
    model = MODELS[name]()
    with torch.inference_mode():
        ref_tokens, ref_logits, ref_loops = forward_decode(model, ids, threshold=threshold)
        engine = DecodeEngine(model, 4, ids.shape[0], ids.shape[1] + NEW_TOKENS, "eager", threshold)
        tokens, logits, loops_run = engine_decode(engine, ids)
    assert torch.equal(tokens, ref_tokens)
    assert max_diff(logits, ref_logits) < 1e-5
    assert loops_run == ref_loops
    if threshold is not None:
        assert min(loops_run) < 4  # the gate really stopped some steps early


def test_engine_rewind_replays_the_same_tokens(ids):
    model = make_melt(chunk_size=5)
    with torch.inference_mode():
        engine = DecodeEngine(model, 3, ids.shape[0], ids.shape[1] + NEW_TOKENS)
        first, _, _ = engine_decode(engine, ids)
        engine.rewind(ids.shape[1])
        token, again = first[:, :1], [first[:, :1]]
        for _ in range(NEW_TOKENS):
            token = engine.step(token).token
            again.append(token)
    assert torch.equal(torch.cat(again, 1), first)


def test_engine_refuses_an_unknown_engine():
    with pytest.raises(ValueError, match="engine"):
        DecodeEngine(make_ouro(), 2, 1, 8, "turbo")


# Compiling costs seconds per graph on a CPU: four cases, tiny shapes. At batch 1 every matmul of
# the step is inductor's multiply-reduce; at batch 2 only attention is written out.
@pytest.mark.parametrize("name,threshold,batch", [("ouro", None, 1), ("melt", None, 2), ("ouro", 0.5, 2),
                                                  ("melt-chunk-reads", None, 1)])
def test_compiled_engine_gives_the_eager_tokens_and_logits(name, threshold, batch, ids):
    from torch._dynamo.utils import counters

    model, ids = MODELS[name](), ids[:batch]
    capacity = ids.shape[1] + NEW_TOKENS
    with torch.inference_mode():
        eager = engine_decode(DecodeEngine(model, 4, ids.shape[0], capacity, "eager", threshold), ids)
        decomposed = counters["inductor"]["decompose_mm"]
        compiled_engine = DecodeEngine(model, 4, ids.shape[0], capacity, "compiled", threshold)
        compiled = engine_decode(compiled_engine, ids)
        graphs = counters["stats"]["unique_graphs"]
        again = engine_decode(compiled_engine, ids)  # a second run reuses the graphs over the same cache
    # nothing that changes per step (the position, the cache's length) is baked into a graph
    assert counters["stats"]["unique_graphs"] == graphs
    assert "torch.compile" in compiled_engine.description and "attention written out" in compiled_engine.description
    assert ("multiply-reduce" in compiled_engine.description) == (batch == 1)
    # the eager engine laid the weights out for MKL; the compiled one gave them back their contiguous layout
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and min(m.weight.shape) > 1]
    assert compiled_engine.weights_laid_out == len(linears) and all(m.weight.is_contiguous() for m in linears)
    assert (counters["inductor"]["decompose_mm"] > decomposed) == (batch == 1)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(again[0], eager[0])
    assert max_diff(compiled[1], eager[1]) < 1e-5
    assert compiled[2] == eager[2]


def test_later_chunks_use_no_materialised_mask():
    assert isinstance(looped.chunk_attention_mask(5, 3, None, torch.device("cpu")).mask, CausalBias)
    assert looped.chunk_attention_mask(0, 3, None, torch.device("cpu")).is_causal
    masked = looped.chunk_attention_mask(5, 3, None, torch.device("cpu"), fused=False)
    assert masked.mask.dtype == torch.bool and masked.mask.shape[-2:] == (3, 8)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 7, 12])
def test_maskless_chunked_prefill_equals_the_masked_one(chunk_size, ids, monkeypatch):
    """MELT chunks of 3, 5 and 7 over a 12-token prompt (two do not divide it), then decoding."""
    model = make_melt(chunk_size=chunk_size)
    with torch.inference_mode():
        fused = forward_decode(model, ids)
        monkeypatch.setattr(looped, "chunk_attention_mask",
                            functools.partial(looped.chunk_attention_mask, fused=False))
        masked = forward_decode(model, ids)
    assert torch.equal(fused[0], masked[0])
    assert max_diff(fused[1], masked[1]) < 1e-5


@pytest.mark.parametrize("chunk", [1, 5, 12])
def test_ouro_prefill_in_chunks_is_exact(chunk, ids):
    model = make_ouro()
    with torch.inference_mode():
        whole = forward_decode(model, ids)
        chunked = forward_decode(model, ids, chunk_starts=list(range(0, ids.shape[1], chunk)))
    assert torch.equal(whole[0], chunked[0])
    assert max_diff(whole[1], chunked[1]) < 1e-5


def test_cpu_float32_engine_lays_weights_out_for_the_gemv_without_changing_them(ids):
    """Every Linear weight keeps its shape, values and key, now (in, out)-contiguous; the engine's
    tokens and logits still equal the forward of an untouched copy, and a second engine changes nothing."""
    model = make_ouro()
    untouched = make_ouro()
    untouched.load_state_dict(model.state_dict())
    with torch.inference_mode():
        ref_tokens, ref_logits, _ = forward_decode(untouched, ids)
        engine = DecodeEngine(model, 4, ids.shape[0], ids.shape[1] + NEW_TOKENS, "eager")
        tokens, logits, _ = engine_decode(engine, ids)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and min(m.weight.shape) > 1]
    assert engine.weights_laid_out == len(linears) > 0 and "(in, out)-contiguous" in engine.description
    assert all(m.weight.stride() == (1, m.weight.shape[0]) and m.weight.requires_grad for m in linears)
    reference = untouched.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())
    assert torch.equal(tokens, ref_tokens) and max_diff(logits, ref_logits) < 1e-5
    assert DecodeEngine(model, 4, 1, 8, "eager").weights_laid_out == 0
    assert DecodeEngine(make_ouro().to(torch.bfloat16), 4, 1, 8, "eager").weights_laid_out == 0  # bf16: 4x slower
