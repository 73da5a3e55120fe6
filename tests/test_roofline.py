"""Roofline: the byte and FLOP formulas against hand counts, weights against the real model, and
the latency row's ratios against its own fields."""

import pytest
import torch

from melt_bench.models import (
    MeltConfig,
    MeltForCausalLM,
    OuroConfig,
    OuroForCausalLM,
    cost_model,
    get_preset,
    load_model,
)
from melt_bench.models.decode_engine import DecodeEngine
from melt_bench.scenarios.latency import LatencyPoint
from melt_bench.scenarios.measure_latency import attended_rows, measure_latency_point, token_agreement
from melt_bench.scenarios.point_setup import tensor_bytes

# Small enough to count by hand: hidden 4, MLP 6, 2 layers, 2 query heads and 1 KV head of size 2.
HAND = dict(vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=2, max_position_embeddings=64)
# One layer: q 4*2*2=16, k 4*1*2=8, v 8, o 16 (=48), MLP 3*4*6=72, four norms 16 -> 136 elements.
# After each loop: final norm 4 + exit gate 4+1 -> 9. MELT gate per layer: W_z 16 + b_z 4 + U_z 16 -> 36.


def test_decode_bytes_by_hand():
    ouro, melt = OuroConfig(**HAND), MeltConfig(**HAND)
    # fp32, 3 loops, batch 2, 5 rows attended. Weights: 3 * (2*136 + 9) = 843, lm head 40, two
    # embedding rows 8 -> 891 elements = 3,564 bytes. KV: batch 2 * 3 loops * 2 layers * 5 rows *
    # (K+V: 2 * 1 head * 2 * 4 bytes = 16) = 960.
    assert cost_model.decode_bytes_per_token(ouro, 3, 2, 5, torch.float32) == 3564 + 960
    # MELT's gate runs in loops 2 and 3 (h_1 = x_1): 2 loops * 2 layers * 36 * 4 bytes = 576.
    assert cost_model.decode_bytes_per_token(melt, 3, 2, 5, torch.float32) == 3564 + 960 + 576
    # bf16 halves every byte.
    assert cost_model.decode_bytes_per_token(ouro, 3, 2, 5, torch.bfloat16) == (3564 + 960) / 2


def test_flops_by_hand():
    ouro, melt = OuroConfig(**HAND), MeltConfig(**HAND)
    # Per token and layer: 2 * (16 + 8 + 8 + 16 + 72) = 240 matmul FLOPs; attention over 5 rows:
    # 2 * 2 * 2 heads * 2 dims * 5 = 80. A loop: 2 * (240 + 80) + exit gate 2*4 = 648; 3 loops
    # 1,944; lm head 2*4*10 = 80 -> 2,024 per sequence, 4,048 for 2.
    assert cost_model.decode_flops_per_token(ouro, 3, 2, 5) == 4048
    # MELT: gate 2 * (16 + 16) = 64 per token, layer and gated loop: 2 loops * 2 layers -> 256.
    assert cost_model.decode_flops_per_token(melt, 3, 2, 5) == 2 * (2024 + 256)
    # Prefill of 4 tokens: 10 causal pairs. A loop: 2 * (4*240 + 2*2*2*2*10) + 4 * 8 = 2,272;
    # 3 loops 6,816; lm head for the last position 80 -> 6,896; batch 2 -> 13,792.
    assert cost_model.prefill_flops(ouro, 3, 2, 4) == 13792


@pytest.mark.parametrize("cls,config", [(OuroForCausalLM, OuroConfig), (MeltForCausalLM, MeltConfig)])
@pytest.mark.parametrize("tied", [False, True])
def test_weights_formula_equals_the_models_storage(cls, config, tied):
    model = cls(config(**HAND, tie_word_embeddings=tied))
    assert cost_model.weights_bytes(model.config, torch.float32) == tensor_bytes(model)


def test_latency_row_carries_a_consistent_roofline():
    point = LatencyPoint("latency", "ouro-tiny", 2, 16, 1, "decode", 4, "float32", "cpu", warmup=1, timed_runs=2)
    row = measure_latency_point(point)
    m = row["metrics"]
    assert row["status"] == "ok", row["error"]
    assert m["device_bandwidth_bytes_per_s"] > 0 and "copy" in m["device_bandwidth_method"]
    assert m["device_matmul_flops_per_s"] > 0 and "torch.mm" in m["device_matmul_method"]
    step_s = m["decode_ms_per_token_mean"] / 1000
    assert m["decode_mbu"] == pytest.approx(m["decode_bytes_per_token"] / step_s / m["device_bandwidth_bytes_per_s"])
    prefill_s = m["prefill_ms"] / 1000
    assert m["prefill_mfu"] == pytest.approx(m["prefill_flops"] / prefill_s / m["device_matmul_flops_per_s"])
    assert m["roofline_decode_ms_per_token"] < m["decode_ms_per_token_mean"]  # nothing beats the roofline
    # #31 item 5: the compiled engine attends over its whole capacity (16 + 4 rows) at every step,
    # so its roofline counts 20 rows; the eager engine (#33) and forward() read the rows written,
    # 16 + 2.5 on average.
    config = get_preset("ouro-tiny").config()
    assert m["decode_rows_attended_per_step"] == 18.5 and "written so far" in m["decode_rows_attended_source"]
    assert m["decode_bytes_per_token"] == cost_model.decode_bytes_per_token(config, 2, 1, 18.5, torch.float32)
    compiled = DecodeEngine(load_model("ouro-tiny"), 2, 1, 20, "compiled")  # (compiles on its first step)
    assert attended_rows(compiled, point)[0] == 20 and "capacity" in attended_rows(compiled, point)[1]
    forward = measure_latency_point(LatencyPoint("latency", "ouro-tiny", 2, 16, 1, "decode", 4, "float32", "cpu",
                                                 warmup=0, timed_runs=1, engine="forward"))["metrics"]
    assert forward["decode_rows_attended_per_step"] == 18.5
    assert forward["decode_bytes_per_token"] == cost_model.decode_bytes_per_token(config, 2, 1, 18.5, torch.float32)
    assert m["energy_prefill_j"] is None and m["energy_decode_j_per_token"] is None
    assert m["energy_source"].startswith("unavailable: no NVIDIA GPU")


def test_token_agreement():
    assert token_agreement([[1, 2], [3, 4]], [[1, 2], [3, 5]]) == 0.75
    with pytest.raises(ValueError):
        token_agreement([[1]], [[1, 2]])


@pytest.mark.parametrize("preset", ["melt-1.4b", "melt-2.6b"])
@pytest.mark.parametrize("gate", ["elementwise", "scalar", "mean", "ema", "last"])
def test_weights_formula_counts_each_gates_own_parameters(preset, gate):
    """The cost model charges a gate what it holds (the element-wise gate's 2h^2 + h per layer
    only for the element-wise gate): a bf16 model built on the meta device, byte for byte."""
    config = MeltConfig(**{**get_preset(preset).fields, "gate": gate})
    with torch.device("meta"):
        model = MeltForCausalLM(config)
    held = sum(p.numel() for p in model.parameters()) * 2  # bf16; the presets' embeddings are untied
    assert cost_model.weights_bytes(config, torch.bfloat16) == held
    # a decode step reads the gate it runs: (loops - 1) gated loops x layers x its parameters
    ouro = OuroConfig(**get_preset(preset).fields)
    gate_held = sum(p.numel() for name, p in model.named_parameters() if ".kv_gate." in name) * 2
    extra = cost_model.decode_bytes_per_token(config, 4, 1, 100, torch.bfloat16) \
        - cost_model.decode_bytes_per_token(ouro, 4, 1, 100, torch.bfloat16)
    assert extra == 3 * gate_held


def test_gate_flops_follow_the_gate():
    # HAND: hidden 4. elementwise: 2 * (16 + 16) = 64 per token, layer and gated loop; scalar: 2 * (4 + 4) = 16.
    base = cost_model.decode_flops_per_token(OuroConfig(**HAND), 3, 1, 5)
    for gate, per in (("elementwise", 64), ("scalar", 16), ("ema", 0), ("mean", 0), ("last", 0)):
        assert cost_model.decode_flops_per_token(MeltConfig(**HAND, gate=gate), 3, 1, 5) == base + 2 * 2 * per
