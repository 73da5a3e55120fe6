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
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and min(m.weight.shape) > 1]
        fused = {id(linear) for m in model.modules() if getattr(m, "fused", None) for linear in m.fused.linears}
        assert len(fused) == 5 * model.config.num_hidden_layers - (name != "ouro") * model.config.num_hidden_layers
        moved = [m for m in linears if id(m) in fused or not m.weight.is_contiguous()]
        compiled_engine = DecodeEngine(model, 4, ids.shape[0], capacity, "compiled", threshold)
        compiled = engine_decode(compiled_engine, ids)
        graphs = counters["stats"]["unique_graphs"]
        again = engine_decode(compiled_engine, ids)  # a second run reuses the graphs over the same cache
    # nothing that changes per step (the position, the cache's length) is baked into a graph
    assert counters["stats"]["unique_graphs"] == graphs
    assert "torch.compile" in compiled_engine.description and "attention written out" in compiled_engine.description
    assert ("multiply-reduce" in compiled_engine.description) == (batch == 1)
    # the eager engine fused projections and laid the weights out for MKL; the compiled one gave
    # each its own contiguous storage back
    storages = {m.weight.untyped_storage().data_ptr() for m in linears}
    assert compiled_engine.weights_laid_out == len(moved) and all(m.weight.is_contiguous() for m in linears)
    assert len(storages) == len(linears) and all(getattr(m, "fused", None) is None for m in model.modules())
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


@pytest.mark.parametrize("name", ["ouro", "melt"])
def test_cpu_float32_engine_fuses_and_lays_weights_out_without_changing_them(name, ids):
    """Every Linear weight keeps its shape, values, key and requires_grad. The projections of
    one input (q, k, v for Ouro; k, v for MELT; gate, up) become column blocks of one
    (in, outputs)-contiguous tensor, the other tall weights (in, out)-contiguous, the wide ones
    (down_proj) contiguous; no byte is added. The engine's tokens and logits still equal the
    forward of an untouched copy, and a second engine changes nothing."""
    model = MODELS[name]()
    untouched = MODELS[name]()
    untouched.load_state_dict(model.state_dict())
    weight_bytes = sum(p.untyped_storage().nbytes() for p in model.parameters())
    with torch.inference_mode():
        ref_tokens, ref_logits, _ = forward_decode(untouched, ids)
        engine = DecodeEngine(model, 4, ids.shape[0], ids.shape[1] + NEW_TOKENS, "eager")
        tokens, logits, _ = engine_decode(engine, ids)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and min(m.weight.shape) > 1]
    fusions = [m.fused for m in model.modules() if getattr(m, "fused", None) is not None]
    fused = {id(linear): f for f in fusions for linear in f.linears}
    assert len(fusions) == 2 * model.config.num_hidden_layers and all(f.current() for f in fusions)
    assert len({id(linear) for linear in model.model.layers[0].self_attn.one_input_linears()} & fused.keys()) == (
        3 if name == "ouro" else 2)
    for m in linears:
        out, inp = m.weight.shape
        if id(m) in fused:
            assert m.weight.stride() == (1, fused[id(m)].weight.shape[0])
        else:
            assert m.weight.stride() == ((1, out) if out >= inp else (inp, 1)), m
    assert engine.weights_laid_out == len(linears) - sum(m.weight.shape[0] < m.weight.shape[1] and id(m) not in fused
                                                         for m in linears) > 0
    assert "(in, out)-contiguous" in engine.description and "fused" in engine.description
    assert all(p.requires_grad for p in model.parameters())
    shared = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(shared.values()) == weight_bytes  # the fused tensors replaced the weights they hold
    reference = untouched.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())
    assert torch.equal(tokens, ref_tokens) and max_diff(logits, ref_logits) < 1e-5
    assert DecodeEngine(model, 4, 1, 8, "eager").weights_laid_out == 0
    # bf16: the transposed layout is 4x slower, so contiguous, but fused (row blocks)
    bf16 = make_ouro().to(torch.bfloat16)
    assert DecodeEngine(bf16, 4, 1, 8, "eager").weights_laid_out == 5 * bf16.config.num_hidden_layers
    assert all(m.weight.is_contiguous() for m in bf16.modules() if isinstance(m, torch.nn.Linear))


def test_fused_weights_save_train_and_go_stale_safely(ids, tmp_path):
    """After an eager engine fused its projections: a deepcopy or `.to()` gives the weights new
    storage and the model runs them one by one (the same logits); with gradients the parameters
    themselves are used (they get gradients); save_pretrained writes what loads back."""
    import copy

    model = make_ouro()
    with torch.inference_mode():
        reference = model(ids).logits
        DecodeEngine(model, 4, ids.shape[0], ids.shape[1] + NEW_TOKENS, "eager")
        twin = copy.deepcopy(model)
        assert not twin.model.layers[0].self_attn.fused.current() and model.model.layers[0].self_attn.fused.current()
        assert max_diff([twin(ids).logits], [reference]) < 1e-5 and max_diff([model(ids).logits], [reference]) < 1e-5
        doubled = make_ouro()
        doubled.load_state_dict(model.state_dict())
        DecodeEngine(doubled, 4, 1, 8, "eager")
        doubled.to(torch.float64)
        assert not doubled.model.layers[0].mlp.fused.current()
        assert max_diff([doubled(ids.clone()).logits.float()], [reference]) < 1e-5
        assert doubled.model.layers[0].mlp.fused is None  # the stale fusion let its tensor go
    model(ids).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.layers[0].self_attn.parameters())
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in model.state_dict().items())
    assert all(getattr(m, "fused", None) is None for m in model.modules())
    # load_state_dict copies into the views: the fusion stays current and computes the new weights
    other, fused_again = make_ouro(), make_ouro()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
        DecodeEngine(fused_again, 4, 1, 8, "eager")
        fused_again.load_state_dict(other.state_dict())
        assert fused_again.model.layers[0].self_attn.fused.current()
        assert max_diff([fused_again(ids).logits], [other(ids).logits]) < 1e-5
