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
    """Ours: a compress strategy's prefill reads every prompt row as computed (the logits of full),
    its decoded tokens read earlier tokens' last-written rows (not full's)."""
    model = official_model(reference)
    _, full = cache_run(model, reference, "full")
    for strategy in ("compress-s4", "compress-r4"):
        _, decoded = cache_run(model, reference, strategy)
        assert max_diff(decoded[0], full[0]) < TOLERANCE
        assert max(max_diff(a, b) for a, b in zip(decoded[1:], full[1:])) > 1e-3


@torch.no_grad()
def test_a_prompt_in_pieces_equals_one_prefill_under_full(model, reference):
    """chunk_starts (memory and latency --prefill-chunk) over a full cache: the same last
    logits and cache rows as one prefill (a zero initial state, so the pieces' states agree)."""
    model.use_kv_policy("full")
    ids, steps = reference["ids"], 3
    whole, pieces = model.new_cache(steps, 8, 2), model.new_cache(steps, 8, 2)
    one = model(ids, num_steps=steps, init_scale=0.0, past_key_values=whole, logits_to_keep=1).logits
    split = model(ids, num_steps=steps, init_scale=0.0, past_key_values=pieces, logits_to_keep=1,
                  chunk_starts=[0, 3, 5]).logits
    assert split.shape == one.shape == (2, 1, reference["config"]["vocab_size"]) and max_diff(split, one) < 1e-5
    assert pieces.seq_len == whole.seq_len == ids.shape[1]
    assert max(max_diff(a, b) for a, b in zip(pieces.keys, whole.keys)) < 1e-5
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, num_steps=steps, init_scale=0.0, chunk_starts=[0, 3])


def test_positions_past_the_rope_table_and_exit_rules_are_refused(model):
    with pytest.raises(ValueError, match="RoPE table"):
        model(torch.zeros(1, model.config.block_size + 1, dtype=torch.long), num_steps=1)
    with pytest.raises(ValueError, match="adaptive exit"):
        model(torch.zeros(1, 2, dtype=torch.long), num_steps=1, early_stop_threshold=0.5)


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
    from conftest import make_ouro

    with pytest.raises(UnknownKVPolicyError, match="is a Huginn cache lookup strategy"):
        make_ouro().use_kv_policy("compress-s4")


def test_a_cache_laid_out_for_other_steps_is_refused(model):
    with pytest.raises(ValueError, match="laid out for 3 steps"):
        model(torch.zeros(1, 2, dtype=torch.long), num_steps=4, past_key_values=model.new_cache(3))


@pytest.mark.parametrize("strategy,steps,phase", [(None, 1, "decode"), ("compress-s4", 64, "decode"),
                                                 ("per-loop", 8, "decode"), ("compress-r4", 4, "generate")])
def test_memory_points_hold_the_predicted_bytes_exactly(strategy, steps, phase):
    """melt-bench memory on huginn-tiny: the cache it filled (a prompt, then decoded tokens)
    holds exactly the analytic bytes, and the weights the analytic weight bytes; Ouro's
    per-loop runs as Huginn's full; generate() swaps its empty DynamicCache for ours."""
    from melt_bench.models.huginn_kv import parse_huginn_kv_policy
    from melt_bench.scenarios.measure_memory import measure_memory_point
    from melt_bench.scenarios.memory import MemoryPoint

    point = MemoryPoint(command="memory", model="huginn-tiny", loops=steps, seq_len=12, batch_size=2, phase=phase,
                        new_tokens=3, dtype="float32", device="cpu", kv_policy=strategy)
    row = measure_memory_point(point)
    m = row["metrics"]
    assert row["status"] == "ok", row["error"]
    name = {None: "full", "per-loop": "full"}.get(strategy, strategy)
    assert m["kv_policy"] == name
    slots = parse_huginn_kv_policy(name).num_slots(steps)
    tokens = 12 + 3 - (phase == "generate")  # generate() never feeds its last token back
    assert m["kv_cache_tokens"] == tokens
    assert m["kv_cache_bytes"] == m["kv_cache_bytes_predicted"] == slots * 2 * 2 * 4 * 16 * 4 * tokens
    assert m["weights_bytes"] == m["predicted_weights_bytes"]


@pytest.mark.parametrize("args,needle", [
    (["--models", "ouro-tiny", "--kv-policy", "compress-s4"], "applies to Huginn models only"),
    (["--models", "huginn-tiny", "--kv-policy", "mean"], "no Huginn counterpart"),
    (["--models", "huginn-tiny", "--kv-policy", "compress-q4"], "compress-q4"),
    (["--models", "huginn-tiny", "--kv-quant", "int8"], "Ouro-family"),
])
def test_kv_flags_that_do_not_fit_the_family_are_one_line_errors(args, needle, capsys, tmp_path):
    from conftest import one_line_error

    assert needle in one_line_error(["memory", *args, "--loops", "2", "--seq-lens", "8", "--out",
                                     str(tmp_path / "r.jsonl")], capsys)


def test_models_lists_the_huginn_presets_with_their_cache_bytes(capsys):
    import json

    from melt_bench.cli import main

    assert main(["models", "--json"]) == 0
    cards = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    big = cards["huginn-3.5b"]
    # 2 + 4 x 32 + 2 rows of 55 heads x 96, K and V, bf16 (the spec's 2.79 MB per token)
    assert big["kv_bytes_per_token_at_loops"] == 132 * 2 * 55 * 96 * 2 and big["loops"] == 32
    assert big["kv_bytes_per_token_per_loop"] == 4 * 2 * 55 * 96 * 2
    assert big["kv_bytes_per_token_by_policy"]["compress-s4"] == 8 * 2 * 55 * 96 * 2
    assert 3.56e9 < big["parameters"] < 3.57e9  # 3,564,976,800: the official shapes, tied embeddings


def test_latency_forward_engine_times_huginn_with_its_roofline():
    """melt-bench latency --engine forward on huginn-tiny (static cache): timed prefill and decode,
    the bytes per token from Huginn's own formulas, which grow with the recurrence steps."""
    from melt_bench.models import cost_model, load_model
    from melt_bench.scenarios.latency import LatencyPoint
    from melt_bench.scenarios.measure_latency import measure_latency_point

    rows = {}
    for steps in (1, 4):
        point = LatencyPoint(command="latency", model="huginn-tiny", loops=steps, seq_len=8, batch_size=1,
                             phase="decode", new_tokens=3, dtype="float32", device="cpu", engine="forward",
                             static_cache=True, timed_runs=1)
        row = measure_latency_point(point)
        assert row["status"] == "ok", row["error"]
        rows[steps] = row["metrics"]
    assert all(m["decode_ms_per_token_mean"] > 0 and m["prefill_ms"] > 0 for m in rows.values())
    config = load_model("huginn-tiny").config
    # three more core steps read the core's weights and the adapter three more times
    step_bytes = 4 * (4 * 64 * 64 + 3 * 64 * 176 + 4 * 64 + 2 * 64) + 2 * 64 * 64
    assert cost_model.decode_bytes_per_token(config, 4, 1, 0, torch.float32) - \
        cost_model.decode_bytes_per_token(config, 1, 1, 0, torch.float32) == 3 * step_bytes * 4
    assert rows[4]["decode_bytes_per_token"] > rows[1]["decode_bytes_per_token"]


@pytest.mark.parametrize("argv,needle", [
    (["latency", "--engine", "compiled", "--early-exit", "threshold:0.9"], "--early-exit on huginn-tiny"),
    (["serve", "--concurrency", "2", "--num-requests", "2", "--early-exit", "threshold:0.9"],
     "--early-exit on huginn-tiny"),
    (["accuracy", "--tasks", "addition", "--exit-mode", "step:1"], "--exit-mode step:1 on huginn-tiny"),
    (["accuracy", "--tasks", "addition", "--kv-quant", "int8"], "--kv-quant int8"),
    (["capacity", "--budget", "10MiB", "--seq-lens", "8000", "--new-tokens", "200"], "RoPE table"),
    (["memory", "--seq-lens", "9000"], "RoPE table"),
])
def test_what_huginn_cannot_run_is_a_one_line_error(argv, needle, capsys, tmp_path):
    from conftest import one_line_error

    args = [*argv, "--models", "huginn-tiny", "--loops", "2", "--out", str(tmp_path / "r.jsonl")]
    if "--seq-lens" not in argv and argv[0] != "accuracy" and argv[0] != "serve":
        args += ["--seq-lens", "8"]
    assert needle in one_line_error(args, capsys)


def test_the_huginn_suite_sweeps_steps_1_to_64_under_every_strategy(capsys, tmp_path):
    """suites/huginn.yaml passes the command line's checks (--dry-run: nothing runs): 7 step
    counts under 4 lookup strategies, 2 repeats."""
    from melt_bench.cli import main
    from melt_bench.running.suite_loader import load_suite

    suite = load_suite("huginn")
    assert suite["models"] == ["huginn-tiny"] and suite["loops"] == "1,2,4,8,16,32,64"
    assert main(["memory", "--suite", "huginn", "--dry-run", "--out", str(tmp_path / "r.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "56 points" in out and all(name in out for name in ("full", "compress-s4", "compress-r4", "compress-anchor"))


@torch.no_grad()
def test_a_checkpoint_in_the_released_layout_loads_and_gives_the_official_logits(reference, tmp_path):
    """A directory laid out as tomg-group-umd/huginn-0125 is (its config.json fields, derived
    ones included; safetensors with both the embedding and the tied lm head, and freqs_cis)
    loads through load_model(weights=DIR) and gives the official logits; save_pretrained then
    writes what loads back."""
    import json

    from safetensors.torch import save_file

    from melt_bench.models import load_model

    config = {**reference["config"], "model_type": "huginn_raven", "architectures": ["RavenForCausalLM"],
              "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig"}, "effective_expected_depth": 20,
              "init_values": {"std": 0.1}, "head_dim": 8, "num_key_value_heads": 2, "padded_vocab_size": 32,
              "torch_dtype": "float32", "transformers_version": "4.44.2", "state_init": "like-init",
              "block_class_name": "SandwichBlock", "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in reference["state_dict"].items()}, str(tmp_path / "model.safetensors"))
    model = load_model("huginn-tiny", weights=tmp_path)
    assert max_diff(model(reference["ids"], num_steps=4, init_scale=0.0).logits, reference["steps"][4]) < TOLERANCE
    model.save_pretrained(tmp_path / "again")
    again = load_model("huginn-tiny", weights=tmp_path / "again")
    assert max_diff(again(reference["ids"], num_steps=4, init_scale=0.0).logits, reference["steps"][4]) < TOLERANCE
