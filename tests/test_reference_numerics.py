"""Ouro with one loop is an ordinary (sandwich-norm, RoPE, GQA) transformer."""

import math

import torch
from conftest import TINY, make_ouro


def rms(x, w, eps=1e-6):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def rope(x, positions, theta):
    # Pairs (i, i + d/2) rotated by angle pos * theta^(-2i/d): written out independently.
    d = x.shape[-1]
    half = d // 2
    angles = positions[:, None].double() * theta ** (-torch.arange(half).double() * 2 / d)
    cos, sin = angles.cos().float(), angles.sin().float()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_logits(sd, ids, cfg):
    """A direct computation of a one-pass transformer from the state dict (one sequence)."""
    n_h, n_kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    seq = ids.shape[0]
    pos = torch.arange(seq)
    x = sd["model.embed_tokens.weight"][ids]
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(seq, n_h, hd).transpose(0, 1)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(seq, n_kv, hd).transpose(0, 1)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(seq, n_kv, hd).transpose(0, 1)
        q, k = rope(q, pos, cfg["rope_theta"]), rope(k, pos, cfg["rope_theta"])
        group = n_h // n_kv
        heads = []
        for head in range(n_h):
            scores = q[head] @ k[head // group].T / math.sqrt(hd)
            weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            heads.append(weights @ v[head // group])
        attn = torch.cat(heads, dim=-1) @ sd[p + "self_attn.o_proj.weight"].T
        x = x + rms(attn, sd[p + "input_layernorm_2.weight"])
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        mlp = (gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
        x = x + rms(mlp, sd[p + "post_attention_layernorm_2.weight"])
    x = rms(x, sd["model.norm.weight"])
    return x @ sd["lm_head.weight"].T


def test_one_loop_ouro_is_an_ordinary_transformer(ids):
    model = make_ouro()
    with torch.no_grad():  # non-trivial norm weights so a swapped norm would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    ours = model(ids, loops=1, use_cache=False).logits
    for b in range(ids.shape[0]):
        torch.testing.assert_close(ours[b], reference_logits(sd, ids[b], TINY), rtol=1e-4, atol=1e-4)


def test_loops_feed_the_normed_output_into_the_next_loop(ids):
    # Two loops equal two passes of the one-loop stack where the second starts from the first's
    # normed output instead of the embeddings.
    model = make_ouro()
    two = model(ids, loops=2, use_cache=False).logits
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    first_hidden = model.model(ids, loops=1).last_hidden_state
    original = model.model.embed_tokens
    model.model.embed_tokens = _Const(first_hidden)
    try:
        chained = model(ids, loops=1, use_cache=False).logits
    finally:
        model.model.embed_tokens = original
    torch.testing.assert_close(two, chained, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(two, model(ids, loops=1, use_cache=False).logits, atol=1e-3)
    del sd


class _Const(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, ids):
        return self.value
