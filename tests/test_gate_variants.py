"""The paper's gate ablation as MeltConfig.gate: each variant's parameter count and equation,
`elementwise` unchanged, `last` equal to Ouro under the last-loop policy, all convertible."""

import pytest
import torch
from conftest import TINY, make_melt, make_ouro

from melt_bench.models import MeltConfig, MeltForCausalLM, OuroForCausalLM
from melt_bench.models.configs import GATES

H, LAYERS = TINY["hidden_size"], TINY["num_hidden_layers"]


def gate_parameters(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if ".kv_gate." in name)


@pytest.mark.parametrize("gate,per_layer", [("elementwise", 2 * H * H + H), ("scalar", 2 * H + 1), ("ema", 1),
                                            ("mean", 0), ("last", 0)])
def test_each_gate_has_the_parameters_its_equation_implies(gate, per_layer):
    model = MeltForCausalLM(MeltConfig(**TINY, gate=gate))
    assert gate_parameters(model) == LAYERS * per_layer
    base = sum(p.numel() for p in OuroForCausalLM(make_ouro().config).parameters())
    assert sum(p.numel() for p in model.parameters()) == base + LAYERS * per_layer


def test_elementwise_is_todays_model_bit_for_bit(ids):
    today = make_melt(chunk_size=4)
    named = make_melt(chunk_size=4, gate="elementwise")
    assert today.config.gate == "elementwise" and today.state_dict().keys() == named.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(today.state_dict().values(), named.state_dict().values()))
    assert torch.equal(today(ids, use_cache=False).logits, named(ids, use_cache=False).logits)


def states(gate_module, xs):
    h, out = None, []
    for loop, x in enumerate(xs):
        h = gate_module(x, h, loop)
        out.append(h)
    return out


def test_each_gate_follows_its_equation():
    torch.manual_seed(0)
    xs = [torch.randn(2, 3, H) for _ in range(4)]
    layer = lambda gate: MeltForCausalLM(MeltConfig(**TINY, gate=gate)).model.layers[0].self_attn.kv_gate  # noqa: E731
    for t, h in enumerate(states(layer("mean"), xs)):
        torch.testing.assert_close(h, torch.stack(xs[:t + 1]).mean(0))
    assert all(h is x for h, x in zip(states(layer("last"), xs), xs))
    ema = layer("ema")
    beta = torch.sigmoid(torch.tensor(-6.0))  # the fresh decay: gate_bias_init
    expected = xs[0]
    for x, h in zip(xs[1:], states(ema, xs)[1:]):
        expected = beta * expected + (1 - beta) * x
        torch.testing.assert_close(h, expected)
    scalar = layer("scalar")
    with torch.no_grad():
        scalar.w_z.weight.normal_()
        scalar.u_z.weight.normal_()
    h1, h2 = states(scalar, xs[:2])
    z = torch.sigmoid(xs[1] @ scalar.w_z.weight.T + scalar.w_z.bias + h1 @ scalar.u_z.weight.T)
    assert z.shape[-1] == 1  # one value per token, shared by every dimension
    torch.testing.assert_close(h2, z * h1 + (1 - z) * xs[1])


def test_the_last_gate_is_ouro_under_the_last_loop_policy(ids):
    ouro = make_ouro()
    melt = MeltForCausalLM.from_ouro(ouro, gate="last", chunk_size=None).eval()
    ouro.use_kv_policy("last-loop")
    outputs = []
    for model in (ouro, melt):
        cache = model.new_cache(3)
        logits = [model(ids[:, :7], past_key_values=cache, loops=3).logits]
        logits += [model(ids[:, i:i + 1], past_key_values=cache, loops=3).logits for i in range(7, 12)]
        outputs.append(torch.cat(logits, dim=1))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate", GATES)
def test_every_gate_survives_save_and_load(gate, tmp_path):
    model = MeltForCausalLM(MeltConfig(**TINY, gate=gate)).eval()
    model.save_pretrained(tmp_path)
    loaded = MeltForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.gate == gate
    ids = torch.randint(1, 97, (1, 9))
    assert torch.equal(model(ids, use_cache=False).logits, loaded(ids, use_cache=False).logits)


def test_an_unknown_gate_is_refused():
    with pytest.raises(ValueError, match="gate must be one of elementwise, scalar, mean, ema, last"):
        MeltConfig(**TINY, gate="gru")
