"""`--kv-policy flashloop` computes what FlashLoop 0.1.0's own pure-torch reference computes, on the
same weights: tests/fixtures/flashloop_reference.pt holds that reference's outputs on two tiny
random Ouro models (2 KV heads and 1), written by scripts/flashloop_reference.py in a venv of its
own with flashloop 0.1.0 and the official Ouro code (#31 item 1)."""

from pathlib import Path

import pytest
import torch

from melt_bench.models import OuroConfig, OuroForCausalLM, predict_kv_cache_bytes
from melt_bench.models.flashloop import flashloop_audit_bytes, unpack_bits

FIXTURE = torch.load(Path(__file__).parent / "fixtures" / "flashloop_reference.pt", weights_only=True)
CASES = FIXTURE["cases"]


def run_case(case: dict, loops: int = 4, steps: int | None = None):
    """Our flashloop on the case's weights: prefill, then the case's greedy steps. Returns the
    model, the prefill logits, the cache, the greedy tokens, the decode logits, the bytes held and
    the rows with a late-loop residual per packed group after each forward, and each step's
    loop-2 key sets and masses per layer."""
    config = OuroConfig(**{k: v for k, v in case["config"].items() if k != "early_exit_threshold"},
                        kv_policy="flashloop")
    model = OuroForCausalLM(config).eval()
    model.load_state_dict({name: tensor.float() for name, tensor in case["state_dict"].items()})
    ids = torch.tensor(case["prompt"])[None]
    cache = model.new_cache(loops)
    with torch.no_grad():
        prefill = model(ids, past_key_values=cache, loops=loops).logits[0]
        token = prefill[-1].argmax()[None, None]
        tokens, decode, held, late, sources = [int(token)], [], [cache.nbytes()], [cache.selected_per_group()], []
        for _ in range(len(case["tokens"]) - 1 if steps is None else steps):
            logits = model(token, past_key_values=cache, loops=loops).logits[0, -1]
            token = logits.argmax()[None, None]
            tokens.append(int(token))
            decode.append(logits)
            held.append(cache.nbytes())
            late.append(cache.selected_per_group())
            sources.append([cache._sources[layer][:2] for layer in range(config.num_hidden_layers)])
    return model, prefill, cache, tokens, decode and torch.stack(decode), held, late, sources


@pytest.fixture(scope="module", params=sorted(CASES))
def ran(request):
    case = CASES[request.param]
    return case, run_case(case)


def test_prefill_logits_and_the_late_loops_token_masks_are_the_references(ran):
    case, (_, prefill, cache, *_) = ran
    prompt = len(case["prompt"])
    assert prompt > 128
    torch.testing.assert_close(prefill, case["prefill_logits"], rtol=0, atol=1e-4)
    masks = unpack_bits(cache.masks, 2 * prompt).view(2, prompt)
    assert torch.equal(masks[0], case["mask_loop3"]) and torch.equal(masks[1], case["mask_loop4"])
    # loop 4's scores are real in the reference; FlashLoop's engine scores zeros (it overwrites loop
    # 2's hidden state in place), so its loop-4 set is another: we follow the reference
    if "engine_mask_loop4" in case:
        assert not case["engine_score_loop4"].any() and not torch.equal(case["engine_mask_loop4"], masks[1])


def test_greedy_tokens_decode_logits_and_packing_are_the_references(ran):
    case, (_, _, _, tokens, decode, *_) = ran
    assert case["pack_steps"] == [12]  # the decode crosses a packing boundary
    assert tokens == case["tokens"]
    torch.testing.assert_close(decode, case["decode_logits"], rtol=0, atol=1e-4)
    assert tokens != case["dense_tokens"]  # what FlashLoop computes is not plain Ouro


def test_bytes_equal_flashloops_count_and_our_formula_at_every_step(ran):
    """FlashLoop counts minima and scales at fp16 and its tail at bf16; we hold fp32 minima and
    scales (the reference computes with them) and an fp32 tail here: both counts, every step."""
    case, (model, _, _, _, _, held, late, _) = ran
    config, prompt = model.config, len(case["prompt"])
    shape = (4, config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
    for step, (ours, rows, theirs) in enumerate(zip(held, late, case["bytes"])):
        tokens = prompt + step
        assert flashloop_audit_bytes(tokens, prompt, *shape, rows) == theirs, step
        assert ours == predict_kv_cache_bytes(config, 4, 1, tokens, torch.float32, prompt_tokens=prompt,
                                              flashloop_late_rows=rows), step


def test_decode_re_reads_loop_2s_chosen_keys_at_loops_3_and_4(ran):
    """The same key sets (the loop-2 top 10% per layer and query head) and masses as the
    reference's, at every decode step."""
    case, (*_, sources) = ran
    assert len(sources) == len(case["decode_selections"])
    for ours, theirs in zip(sources, case["decode_selections"]):
        for (chosen, mass), source in zip(ours, theirs):
            keys = [torch.nonzero(chosen[0, head, 0]).flatten().tolist() for head in range(chosen.shape[1])]
            assert keys == [sorted(indices) for indices in source["indices"]]
            torch.testing.assert_close(mass[0, :, 0, 0], source["source_mass"].float(), rtol=0, atol=1e-5)


def test_a_forward_without_a_cache_computes_flashloop_too():
    """Its token-sparse loops live in the cache, so a forward without one (lm-eval scoring a
    one-token continuation) makes one: never plain Ouro under the flashloop name."""
    case = CASES["mha"]
    model = run_case(case, steps=0)[0]
    ids = torch.tensor(case["prompt"])[None]
    with torch.no_grad():
        logits = model(ids, use_cache=False, loops=4).logits[0]
    torch.testing.assert_close(logits, case["prefill_logits"], rtol=0, atol=1e-4)
