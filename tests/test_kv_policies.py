"""Training-free KV policies (issue 13): exact memory, prefill-then-decode semantics, the
reference cases (per-loop is Ouro, last-loop's one-chunk prefill is Ouro's), early exit, the
decode engine, the official exit rule, and the CLI axis."""

import pytest
import torch
from conftest import one_line_error

from melt_bench.cli import main
from melt_bench.models import load_model, predict_kv_cache_bytes
from melt_bench.models.decode_engine import DecodeEngine

POLICIES = ["per-loop", "last-loop", "mean", "first-loop", "modulo:2", "modulo:3", "first-then-shared:2",
            "first-then-shared:3"]
PROMPT, NEW = 7, 3


def ouro(policy: str | None = None, dtype=torch.float32):
    model = load_model("ouro-tiny", dtype=dtype, kv_policy=policy)
    torch.manual_seed(1)  # a live exit gate and non-trivial weights everywhere
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def ids(batch: int = 2, length: int = PROMPT + NEW) -> torch.Tensor:
    return torch.randint(1, 250, (batch, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("loops", [1, 3, 4])
def test_measured_cache_bytes_equal_the_policy_formula(policy, loops):
    model = ouro(policy)
    tokens = ids()
    with torch.no_grad():
        growing = model.new_cache(loops)
        model(tokens[:, :PROMPT], past_key_values=growing, loops=loops)
        model(tokens[:, PROMPT:PROMPT + 1], past_key_values=growing, loops=loops)
        ahead = model.new_cache(loops, capacity=PROMPT + NEW, batch_size=2)
    assert growing.nbytes() == predict_kv_cache_bytes(model.config, loops, 2, PROMPT + 1, torch.float32)
    assert ahead.nbytes() == predict_kv_cache_bytes(model.config, loops, 2, PROMPT + NEW, torch.float32)
    slots = {"per-loop": loops, "modulo:2": min(2, loops), "modulo:3": min(3, loops),
             "first-then-shared:2": min(2, loops), "first-then-shared:3": min(3, loops)}.get(policy, 1)
    assert model.kv_bytes_per_token(loops) == slots * model.config.num_hidden_layers * 2 * \
        model.config.num_key_value_heads * model.config.head_dim * 4


@pytest.mark.parametrize("policy", POLICIES)
def test_prefill_then_decode_equals_one_forward_with_the_policys_chunks(policy):
    """Decoding token by token is the policy's semantics: the prompt one chunk, then each token its
    own chunk (earlier tokens hold their kept rows). One forward with those chunks must agree."""
    model, tokens = ouro(policy), ids()
    with torch.no_grad():
        cache = model.new_cache(4)
        steps = [model(tokens[:, :PROMPT], past_key_values=cache, loops=4).logits]
        for position in range(PROMPT, PROMPT + NEW):
            steps.append(model(tokens[:, position:position + 1], past_key_values=cache, loops=4).logits)
        whole = model(tokens, past_key_values=model.new_cache(4), loops=4,
                      chunk_starts=[0, *range(PROMPT, PROMPT + NEW)]).logits
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_policies_differ_where_they_should():
    """Not all the same model: after the prompt, decode logits depend on what tokens keep."""
    tokens, decoded = ids(), {}
    for policy in ("per-loop", "last-loop", "mean", "first-loop"):
        model = ouro(policy)
        with torch.no_grad():
            cache = model.new_cache(4)
            model(tokens[:, :PROMPT], past_key_values=cache, loops=4)
            decoded[policy] = model(tokens[:, PROMPT:PROMPT + 1], past_key_values=cache, loops=4).logits
    values = list(decoded.values())
    assert all(not torch.allclose(a, b) for i, a in enumerate(values) for b in values[i + 1:])


def test_per_loop_and_wide_modulo_equal_ouro_bit_for_bit():
    tokens = ids()
    outputs = {}
    for policy in (None, "per-loop", "modulo:4", "modulo:9", "first-then-shared:4"):
        model = ouro(policy)
        with torch.no_grad():
            cache = model.new_cache(4)
            first = model(tokens[:, :PROMPT], past_key_values=cache, loops=4).logits
            second = model(tokens[:, PROMPT:PROMPT + 1], past_key_values=cache, loops=4).logits
        outputs[policy] = torch.cat([first, second], dim=1)
    for policy, logits in outputs.items():
        assert torch.equal(logits, outputs[None]), policy


@pytest.mark.parametrize("policy", ["last-loop", "mean", "first-loop", "modulo:1"])
def test_a_one_chunk_prefill_attends_as_ouro(policy):
    tokens = ids()[:, :PROMPT]
    with torch.no_grad():
        reference = ouro()(tokens, past_key_values=ouro().new_cache(4), loops=4).logits
        model = ouro(policy)
        logits = model(tokens, past_key_values=model.new_cache(4), loops=4).logits
    assert torch.equal(logits, reference)


@pytest.mark.parametrize("policy", POLICIES)
def test_the_decode_engine_follows_every_policy(policy):
    model, tokens = ouro(policy), ids()
    with torch.no_grad():
        cache = model.new_cache(4)
        model(tokens[:, :PROMPT], past_key_values=cache, loops=4)
        want = model(tokens[:, PROMPT:PROMPT + 2], past_key_values=cache, loops=4, chunk_starts=[0, 1]).logits
        engine = DecodeEngine(model, loops=4, batch_size=2, capacity=PROMPT + NEW)
        engine.prefill(tokens[:, :PROMPT])
        got = [engine.step(tokens[:, PROMPT:PROMPT + 1]).logits, engine.step(tokens[:, PROMPT + 1:PROMPT + 2]).logits]
    torch.testing.assert_close(torch.stack(got, dim=1), want, rtol=1e-5, atol=1e-5)


def test_early_exit_at_the_first_loop_keeps_the_first_loops_rows_under_every_policy():
    """A gate that exits everything after loop 1: per-loop copies loop 1's rows into every later
    slot; last-loop, mean and first-loop then keep the same rows; so do all slot layouts."""
    tokens, kept = ids()[:, :PROMPT], {}
    for policy in POLICIES:
        model = ouro(policy)
        with torch.no_grad():
            model.model.early_exit_gate.bias.fill_(30.0)
            cache = model.new_cache(4)
            out = model(tokens, past_key_values=cache, loops=4, early_stop_threshold=0.5)
        assert out.loops_run == 1
        rows = {model.model.policy.slot(loop, 0) for loop in range(4)}
        kept[policy] = [cache.keys[slot] for slot in sorted(rows)]
        assert all(torch.equal(k, kept[policy][0]) for k in kept[policy]), policy
    reference = kept["per-loop"][0]
    assert all(torch.equal(k[0], reference) for k in kept.values())


def reference_official_logits(model, tokens: torch.Tensor, loops: int) -> torch.Tensor:
    """The released code's default path, written here from its description: every loop's normed
    hidden state and gate, the exit pdf in the model's dtype (no cast), its cumsum against the
    config's early_exit_threshold, argmax of the mask, the last loop where never reached."""
    with torch.no_grad():
        out = model.model(tokens, loops=loops, keep_hidden_per_loop=True)
        gates = [g.unsqueeze(-1) for g in out.gate_logits]
        remaining = torch.ones_like(gates[0].squeeze(-1))
        pdf = []
        for index, gate in enumerate(gates):
            lam = torch.sigmoid(gate.squeeze(-1))
            if index < len(gates) - 1:
                pdf.append(lam * remaining)
                remaining = remaining * (1.0 - lam)
            else:
                pdf.append(remaining)
        stacked = torch.stack(pdf, dim=2)
        mask = torch.cumsum(stacked, dim=2) >= model.config.early_exit_threshold
        steps = torch.argmax(mask.float(), dim=2)
        steps[~mask.any(dim=2)] = stacked.shape[2] - 1
        hidden = torch.stack(out.hidden_per_loop, dim=2)
        index = steps.unsqueeze(-1).unsqueeze(-1).expand(-1, -1, 1, hidden.size(-1))
        return model.lm_head(torch.gather(hidden, 2, index).squeeze(2)), steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_exit_is_the_released_rule_in_the_models_dtype(dtype):
    model = ouro(dtype=dtype)
    with torch.no_grad():
        # gate logit 7: sigmoid is 0.99909 in float32, exactly 1.0 once rounded to bfloat16
        model.model.early_exit_gate.weight.zero_()
        model.model.early_exit_gate.bias.fill_(7.0)
    tokens = ids()
    want, steps = reference_official_logits(model, tokens, 4)
    with torch.no_grad():
        got = model(tokens, loops=4, official_exit=True, use_cache=False)
    assert torch.equal(got.logits, want) and torch.equal(got.exit_steps, steps)
    if dtype == torch.bfloat16:  # every token exits at the first loop, later under the float32 rule
        assert (steps == 0).all()
        with torch.no_grad():
            fp32_rule = model(tokens, loops=4, exit_threshold=1.0, use_cache=False)
        assert (fp32_rule.exit_steps > 0).all()


@pytest.mark.parametrize("args,needle", [
    (["memory", "--kv-policy", "sometimes"], "unknown KV policy 'sometimes'"),
    (["memory", "--kv-policy", "modulo:0"], "unknown KV policy"),
    (["latency", "--models", "melt-tiny", "--kv-policy", "last-loop"], "MELT's own gated policy"),
    (["capacity", "--budget", "1GiB", "--models", "melt-tiny", "--kv-policy", "mean"], "MELT's own gated policy"),
    (["memory", "--models", "ouro-tiny", "--kv-policy", "shared-gated"], "needs its trained gate"),
    (["accuracy", "--models", "melt-tiny", "--kv-policy", "last-loop"], "MELT's own gated policy"),
])
def test_a_bad_policy_or_a_policy_on_melt_is_one_line_and_exit_2(args, needle, capsys, tmp_path):
    err = one_line_error([*args, "--loops", "1", "--device", "cpu", "--out", str(tmp_path / "x.jsonl")], capsys)
    assert needle in err
    assert not (tmp_path / "x.jsonl").exists()


def test_the_sweep_axis_records_each_policy_and_melt_runs_once(tmp_path):
    from melt_bench.running.results import ResultsStore

    out = tmp_path / "m.jsonl"
    assert main(["memory", "--loops", "3", "--models", "ouro-tiny,melt-tiny", "--seq-lens", "16", "--batch-sizes",
                 "1", "--new-tokens", "2", "--device", "cpu", "--repeats", "1", "--no-progress",
                 "--kv-policy", "per-loop,last-loop,modulo:2", "--out", str(out)]) == 0
    rows = ResultsStore(out).read()
    seen = {(row.point["model"], row.point["kv_policy"]): row.metrics for row in rows}
    assert set(seen) == {("ouro-tiny", "per-loop"), ("ouro-tiny", "last-loop"), ("ouro-tiny", "modulo:2"),
                         ("melt-tiny", None)}
    kv = {key: metrics["kv_cache_bytes"] for key, metrics in seen.items()}
    assert kv["ouro-tiny", "per-loop"] == 3 * kv["ouro-tiny", "last-loop"] == 3 * kv["melt-tiny", None]
    assert kv["ouro-tiny", "modulo:2"] == 2 * kv["ouro-tiny", "last-loop"]
    assert all(metrics["kv_cache_bytes"] == metrics["kv_cache_bytes_predicted"] for metrics in seen.values())
    assert seen["melt-tiny", None]["kv_policy"] == "shared-gated"


def test_models_lists_the_policies_with_their_kv_bytes(capsys):
    import json

    assert main(["models", "--json"]) == 0
    cards = {card["name"]: card for card in json.loads(capsys.readouterr().out)}
    by_policy = cards["ouro-1.4b"]["kv_bytes_per_token_by_policy"]
    assert by_policy["per-loop"] == 786_432 and by_policy["last-loop"] == by_policy["mean"] == 196_608
    assert by_policy["modulo:2"] == by_policy["first-then-shared:2"] == 393_216
    melt = cards["melt-1.4b"]["kv_bytes_per_token_by_policy"]
    assert melt["shared-gated"] == 196_608
    assert set(melt) == {"shared-gated", "shared-gated + int8", "shared-gated + int4"}
    # packed caches, over a 4,096-token prompt: what predict_kv_cache_bytes says, per token
    from melt_bench.models import get_preset

    config = get_preset("ouro-1.4b").config()
    flashloop = predict_kv_cache_bytes(config, 4, 1, 4096, torch.bfloat16, kv_policy="flashloop")
    assert by_policy["flashloop"] == flashloop // 4096
    assert (melt["shared-gated + int4"] < by_policy["flashloop"] < by_policy["per-loop + int4"]
            < by_policy["per-loop + int8"])


@pytest.mark.parametrize("policy,shared", [("per-loop", False), ("modulo:4", False), ("last-loop", True),
                                           ("mean", True), ("modulo:2", True)])
def test_a_chunked_prefill_says_when_the_prompt_itself_was_shared(policy, shared):
    """--prefill-chunk is exact only where the policy keeps every loop's rows: under a sharing
    policy later chunks read the earlier chunks' kept rows, the logits move, and the row says so."""
    from melt_bench.scenarios.memory import MemoryPoint
    from melt_bench.scenarios.point_setup import prefill_chunking

    model, tokens = ouro(policy), ids(length=8)
    point = MemoryPoint("memory", "ouro-tiny", 4, 8, 2, "prefill", 1, "float32", "cpu", prefill_chunk=3)
    starts, fields = prefill_chunking(model, point)
    assert starts == [0, 3, 6] and fields == {"prefill_chunk_tokens": 3, "prompt_kv_shared": shared}
    with torch.no_grad():
        whole = model(tokens, past_key_values=model.new_cache(4), loops=4).logits
        chunked = model(tokens, past_key_values=model.new_cache(4), loops=4, chunk_starts=starts).logits
    assert torch.allclose(chunked, whole, atol=1e-5) != shared
    one_chunk = MemoryPoint("memory", "ouro-tiny", 4, 8, 2, "prefill", 1, "float32", "cpu")
    assert prefill_chunking(model, one_chunk)[1]["prompt_kv_shared"] is False
