"""Save/load round trips, official Ouro checkpoints, MELT built from Ouro, generate()."""

import json

import pytest
import torch
from conftest import TINY, make_melt, make_ouro
from safetensors.torch import save_file

from melt_bench.models import MeltForCausalLM, OuroForCausalLM, load_model


def official_keys(layers: int) -> list[str]:
    """The key names of the released Ouro safetensors, written out from the model card's layout."""
    keys = ["model.embed_tokens.weight", "model.norm.weight", "model.early_exit_gate.weight",
            "model.early_exit_gate.bias", "lm_head.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        keys += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
        keys += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        keys += [p + f"{n}.weight" for n in ("input_layernorm", "input_layernorm_2",
                                            "post_attention_layernorm", "post_attention_layernorm_2")]
    return keys


def write_official_checkpoint(path, seed=0):
    """A checkpoint shaped like ByteDance/Ouro-1.4B's: its config.json fields (remote-code auto_map,
    Qwen2-style extras) and bf16 safetensors with the official key names."""
    cfg = {
        "architectures": ["OuroForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig",
                     "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"},
        "model_type": "ouro", "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0,
        "pad_token_id": 0, "hidden_act": "silu", "initializer_range": 0.02,
        "layer_types": ["full_attention"] * TINY["num_hidden_layers"], "max_window_layers": 28,
        "rms_norm_eps": 1e-6, "rope_scaling": None, "sliding_window": None, "use_sliding_window": False,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.55.0",
        "use_cache": True, "early_exit_threshold": 1.0, **TINY,
    }
    (path / "config.json").write_text(json.dumps(cfg))
    h, kv, hd, inter = TINY["hidden_size"], TINY["num_key_value_heads"], TINY["head_dim"], TINY["intermediate_size"]
    shapes = {"embed_tokens": (TINY["vocab_size"], h), "lm_head": (TINY["vocab_size"], h),
              "q_proj": (TINY["num_attention_heads"] * hd, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h),
              "o_proj": (h, TINY["num_attention_heads"] * hd), "gate_proj": (inter, h), "up_proj": (inter, h),
              "down_proj": (h, inter), "early_exit_gate.weight": (1, h), "early_exit_gate.bias": (1,)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in official_keys(TINY["num_hidden_layers"]):
        shape = next((s for part, s in shapes.items() if part in key), (h,))  # norms: (hidden,)
        tensors[key] = (torch.randn(shape, generator=g) * 0.1).to(torch.bfloat16)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return tensors


def test_our_state_dict_keys_are_the_official_ones():
    assert sorted(make_ouro().state_dict()) == sorted(official_keys(TINY["num_hidden_layers"]))


def test_official_checkpoint_loads_without_missing_or_unexpected_keys(tmp_path):
    tensors = write_official_checkpoint(tmp_path)
    model, info = OuroForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True, dtype=torch.bfloat16)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"]
    state = model.state_dict()
    for key, value in tensors.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert model.config.total_ut_steps == 4 and model.config.model_type == "ouro"
    ids = torch.randint(1, TINY["vocab_size"], (1, 6))
    assert model(ids).logits.isfinite().all()


def test_auto_classes_open_an_official_checkpoint_without_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    write_official_checkpoint(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))  # trust_remote_code left off
    assert isinstance(model, OuroForCausalLM)


@pytest.mark.parametrize("make", [make_ouro, make_melt])
def test_save_and_reload_give_same_logits(tmp_path, ids, make):
    model = make()
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert reloaded.config.to_dict()["model_type"] == model.config.model_type


def test_melt_from_ouro_copies_weights_and_starts_from_a_fresh_gate(ids):
    ouro = make_ouro()
    melt = MeltForCausalLM.from_ouro(ouro, chunk_size=4)
    for key, value in ouro.state_dict().items():
        torch.testing.assert_close(melt.state_dict()[key], value, rtol=0, atol=0)
    gate = melt.model.layers[0].self_attn.kv_gate
    assert gate.w_z.weight.abs().sum() == 0 and gate.u_z.weight.abs().sum() == 0
    assert torch.all(gate.w_z.bias == melt.config.gate_bias_init)
    assert melt.config.chunk_size == 4 and melt.config.model_type == "melt"
    # One loop: the shared cache is Ouro's cache (h_1 = x_1), whatever the chunking.
    torch.testing.assert_close(melt(ids, loops=1).logits, ouro(ids, loops=1).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(melt(ids, loops=4).logits, ouro(ids, loops=4).logits, atol=1e-4)


def test_load_model_builds_melt_from_ouro_weights(tmp_path):
    write_official_checkpoint(tmp_path)
    melt = load_model("melt-tiny", weights=tmp_path)
    assert isinstance(melt, MeltForCausalLM)
    assert melt.config.hidden_size == TINY["hidden_size"]
    make_melt().save_pretrained(tmp_path / "melt")
    with pytest.raises(ValueError, match="holds a 'melt' model, not 'ouro'"):
        load_model("ouro-tiny", weights=tmp_path / "melt")  # MELT weights cannot become Ouro


@pytest.mark.parametrize("make", [make_ouro, make_melt])
def test_generate_runs_and_matches_manual_greedy_decoding(make, ids):
    model = make(chunk_size=1) if make is make_melt else make()
    prompt = ids[:1, :5]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                               do_sample=False, loops=3, pad_token_id=0, eos_token_id=None)
    assert generated.shape == (1, 11)
    manual, cache = prompt, model.new_cache(loops=3)
    step = prompt
    for _ in range(6):
        nxt = model(step, past_key_values=cache, loops=3).logits[:, -1].argmax(-1, keepdim=True)
        manual, step = torch.cat([manual, nxt], dim=1), nxt
    assert generated.tolist() == manual.tolist()


def test_batched_generate_with_left_padding_matches_batch_of_one():
    model = make_ouro()
    torch.manual_seed(5)
    a, b = torch.randint(1, 97, (1, 6)), torch.randint(1, 97, (1, 3))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    together = model.generate(batch, attention_mask=mask, **kwargs)
    alone_a = model.generate(a, attention_mask=torch.ones_like(a), **kwargs)
    alone_b = model.generate(b, attention_mask=torch.ones_like(b), **kwargs)
    assert together[0].tolist() == alone_a[0].tolist()
    assert together[1, 3:].tolist() == alone_b[0].tolist()
