"""Huginn-0125: melt-bench's reference model against the official code's outputs on the same
random weights (tests/fixtures/huginn_reference.pt, written by scripts/huginn_reference_fixture.py
running seal-rg/recurrent-pretraining's raven_modeling_minimal.py), and its caches, every lookup
strategy, byte-exact against the official HuginnDynamicCache / HuginnStaticCache."""

from pathlib import Path

import pytest
import torch

from melt_bench.models.huginn import HuginnForCausalLM
from melt_bench.models.huginn_config import HuginnConfig
from melt_bench.models.huginn_kv import HUGINN_KV_POLICIES, parse_huginn_kv_policy
from melt_bench.models.names import UnknownKVPolicyError

FIXTURE = Path(__file__).parent / "fixtures" / "huginn_reference.pt"
TOLERANCE = 1e-4  # fp32 logits (issue #35)


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(FIXTURE, weights_only=False)


def official_model(reference: dict) -> HuginnForCausalLM:
    config = HuginnConfig(**reference["config"], bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = HuginnForCausalLM(config).eval()
    model.load_state_dict(reference["state_dict"])
    return model


@pytest.fixture(scope="module")
def model(reference) -> HuginnForCausalLM:
    return official_model(reference)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


def test_state_dict_keys_are_the_official_ones(model, reference):
    assert set(model.state_dict()) == set(reference["state_dict"])
    assert all(model.state_dict()[k].shape == v.shape for k, v in reference["state_dict"].items())


@torch.no_grad()
def test_logits_equal_the_official_code_at_several_step_counts(model, reference):
    for steps, logits in reference["steps"].items():
        assert max_diff(model(reference["ids"], num_steps=steps, init_scale=0.0).logits, logits) < TOLERANCE, steps
    # the step count matters: the logits at 1 and 12 steps are not the same
    assert max_diff(reference["steps"][1], reference["steps"][12]) > 1e-2


@torch.no_grad()
def test_a_given_initial_state_gives_the_official_logits_and_latents(model, reference):
    given = reference["given_state"]
    out = model(reference["ids"], num_steps=given["steps"], input_states=reference["initial_state"])
    assert max_diff(out.logits, given["logits"]) < TOLERANCE
    assert max_diff(out.latent_states, given["latent_states"]) < TOLERANCE


@torch.no_grad()
def test_the_random_state_draws_as_the_official_code_from_a_seed(model, reference):
    seeded = reference["seeded"]
    torch.manual_seed(reference["seed"])
    assert max_diff(model(reference["ids"], num_steps=seeded["steps"]).logits, seeded["logits"]) < TOLERANCE
    generator = torch.Generator().manual_seed(reference["seed"])  # a generator of its own: the same draws
    ours = model(reference["ids"], num_steps=seeded["steps"], generator=generator).logits
    assert max_diff(ours, seeded["logits"]) < TOLERANCE
    other = model(reference["ids"], num_steps=seeded["steps"], generator=torch.Generator().manual_seed(7)).logits
    assert max_diff(other, seeded["logits"]) > 1e-3  # the state is really random


def cache_run(model: HuginnForCausalLM, reference: dict, strategy: str):
    """Prefill then single-token decodes through a preallocated cache, as the fixture did."""
    ids, prompt, steps = reference["ids"], reference["prompt"], reference["cache_steps"]
    model.use_kv_policy(strategy)
    cache = model.new_cache(steps, capacity=ids.shape[1], batch_size=ids.shape[0])
    logits = [model(ids[:, :prompt], num_steps=steps, init_scale=0.0, past_key_values=cache).logits]
    for pos in range(prompt, ids.shape[1]):
        logits.append(model(ids[:, pos:pos + 1], num_steps=steps, init_scale=0.0, past_key_values=cache).logits)
    return cache, logits


@pytest.mark.parametrize("strategy", ["full", "compress-s4", "compress-s3", "compress-r4", "compress-r3",
                                      "compress-anchor", "latest-m4"])
@torch.no_grad()
def test_each_lookup_strategy_equals_the_official_dynamic_cache_to_the_byte(strategy, reference):
    model = official_model(reference)
    official = reference["dynamic"][strategy]
    cache, logits = cache_run(model, reference, strategy)
    for call, (ours, theirs) in enumerate(zip(logits, official["logits"], strict=True)):
        assert max_diff(ours, theirs) < TOLERANCE, (strategy, call)
    batch, tokens = reference["ids"].shape
    # the official cache holds one row per token at each index it used; ours one slot per index
    assert sorted(official["rows"].values()) == [tokens] * len(official["rows"]) and \
        cache.num_slots == len(official["rows"])
    config = model.config
    per_token = model.policy.kv_bytes_per_token(reference["cache_steps"], config.n_heads, config.head_dim, 4)
    predicted = batch * tokens * per_token
    assert predicted == cache.nbytes() == official["bytes"]
    assert cache.nbytes() == sum(t.untyped_storage().nbytes() for t in cache.keys + cache.values)


@torch.no_grad()
def test_compressed_caches_change_what_decoding_reads_and_full_does_not(reference):
    full = reference["dynamic"]["full"]["logits"]
    for strategy in ("compress-s4", "compress-r4"):
        decoded = reference["dynamic"][strategy]["logits"]
        assert max_diff(decoded[0], full[0]) < TOLERANCE  # a prefill reads every prompt row as it was computed
        assert max(max_diff(a, b) for a, b in zip(decoded[1:], full[1:])) > 1e-3


@torch.no_grad()
def test_the_static_caches_the_official_code_accepts_give_its_logits_and_bytes(reference):
    ran = {k: v for k, v in reference["static"].items() if "error" not in v}
    assert "full" in ran
    model = official_model(reference)
    for strategy, official in ran.items():
        cache, logits = cache_run(model, reference, strategy)
        for ours, theirs in zip(logits, official["logits"], strict=True):
            assert max_diff(ours, theirs) < TOLERANCE, strategy
        assert cache.nbytes() == official["bytes"], strategy


def test_huginn_policies_count_their_slots_as_the_official_formulas():
    # 2 prelude, 4 core, 2 coda layers; 32 steps (the released default)
    rows = {name: parse_huginn_kv_policy(name).num_slots(32) for name in
            ("full", "latest-m4", "compress-s4", "compress-s8", "compress-r4", "compress-r2", "compress-anchor")}
    assert rows == {"full": 132, "latest-m4": 132, "compress-s4": 8, "compress-s8": 12, "compress-r4": 36,
                    "compress-r2": 68, "compress-anchor": 40}
    assert parse_huginn_kv_policy("compress-s4").slot(2 + 4 * 31 + 3, 32) == 5  # the last step's layer 3
    assert parse_huginn_kv_policy("compress-anchor").slot(2 + 4 * 9 + 1, 32) == 35
    assert set(HUGINN_KV_POLICIES) >= {"full", "compress-anchor", "latest-m4"}
    with pytest.raises(UnknownKVPolicyError, match="compress-x2"):
        parse_huginn_kv_policy("compress-x2")


def test_a_cache_laid_out_for_other_steps_is_refused(model):
    with pytest.raises(ValueError, match="laid out for 3 steps"):
        model(torch.zeros(1, 2, dtype=torch.long), num_steps=4, past_key_values=model.new_cache(3))
