import pytest
import torch

from melt_bench.models import MeltConfig, MeltForCausalLM, OuroConfig, OuroForCausalLM

# Small but not degenerate: 2 layers, GQA (4 query / 2 KV heads), fp32 for tight comparisons.
TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rope_theta=10_000.0, total_ut_steps=4,
)


def make_ouro(**overrides) -> OuroForCausalLM:
    torch.manual_seed(0)
    return OuroForCausalLM(OuroConfig(**{**TINY, **overrides})).eval()


def make_huginn(kv_policy: str = "full", fixed_state: bool = False):
    """huginn-tiny (random weights, seeded) under `kv_policy`. `fixed_state`: every forward and
    decode step starts from the zero state (the official init_scale=0) instead of a random draw,
    so a sequence's tokens do not depend on what else drew from the RNG (batching, order)."""
    from melt_bench.models import load_model

    model = load_model("huginn-tiny", dtype=torch.float32).eval()
    model.use_kv_policy(kv_policy)
    # Peaked attention (trained-looking): at the init's scale, scores are ~0 and a query reads
    # every row alike, so a token read from the wrong row or position hardly moves the logits.
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "Wqkv"):
                module.Wqkv.weight[:2 * model.config.n_embd] *= 6
    if fixed_state:
        model.initialize_state = lambda embeds, *args, **kwargs: torch.zeros_like(embeds)
    return model


def make_melt(**overrides) -> MeltForCausalLM:
    torch.manual_seed(0)
    model = MeltForCausalLM(MeltConfig(**{**TINY, **overrides})).eval()
    # A trained-looking gate (the fresh one is ~0): make z matter so the tests see the gate work.
    with torch.no_grad():
        for layer in model.model.layers:
            gate = layer.self_attn.kv_gate
            gate.w_z.weight.normal_(std=0.3)
            gate.u_z.weight.normal_(std=0.3)
            gate.w_z.bias.zero_()
    return model


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(1, TINY["vocab_size"], (2, 12))


def one_line_error(argv: list[str], capsys) -> str:
    """Run the CLI on `argv`: it must exit 2 with exactly one line on stderr, which is returned."""
    from melt_bench.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]
