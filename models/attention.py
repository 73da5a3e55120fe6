"""Attention of the looped stack: RoPE, the causal masks of a chunk over its cached prefix, and
the attention block (projections, SDPA, output projection). Module and parameter names are those
of the official Ouro checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import CausalBias, causal_lower_right

from .configs import OuroConfig
from .fused_projections import FusedLinear
from .kv_cache import LoopedKVCache, TransitionKVCache


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Default RoPE tables for (batch, seq) positions; computed per call, so there is no buffer
    for meta-device loading to lose."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_table(
    capacity: int, head_dim: int, theta: float, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_cos_sin` of every position below `capacity`, (capacity, head_dim) each: a decode
    step looks its positions up (`table[positions]`, the same values). Computed inside a compiled
    step instead, inductor folds the sin/cos/pow into every consumer of the rotated queries and
    recomputes them once per cached key (docs/cpu-decode-profile.md)."""
    cos, sin = rope_cos_sin(torch.arange(capacity, device=device)[None], head_dim, theta, dtype)
    return cos[0], sin[0]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return x * cos + rotate_half(x) * sin


@dataclass
class AttentionMask:
    """How one chunk's queries may attend: a mask (a boolean tensor, True = attend, or SDPA's
    bottom-right causal bias) or SDPA's is_causal."""

    mask: torch.Tensor | CausalBias | None
    is_causal: bool


def chunk_attention_mask(
    start: int, q_len: int, key_padding: torch.Tensor | None, device: torch.device, fused: bool = True
) -> AttentionMask:
    """Causal mask for queries at cache positions [start, start+q_len) over keys [0, start+q_len).

    Without padding no boolean mask is built: a first chunk is SDPA's `is_causal`, a later chunk
    (cached prefix + its own causal block) the bottom-right-aligned `causal_lower_right` bias, so
    SDPA keeps its fused kernels (`fused=False` materialises the same mask; tests compare them).
    `key_padding` (batch, start+q_len) is True for real tokens. A query may always see itself, so
    padded rows never attend to nothing (SDPA would return NaN that then leaks through V)."""
    kv_len = start + q_len
    if key_padding is None and fused:
        if q_len == 1:
            return AttentionMask(None, False)
        if start == 0:
            return AttentionMask(None, True)
        return AttentionMask(causal_lower_right(q_len, kv_len), False)
    q_pos = torch.arange(start, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if key_padding is not None:
        mask = (mask & key_padding[:, None, None, :kv_len]) | (k_pos == q_pos)[None, None]
    return AttentionMask(mask, False)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per sequence, q (batch, heads, 1, head_dim), over every cached row
    k, v (batch, kv heads, capacity, head_dim) where the boolean `mask` (broadcast to (batch, 1,
    1, capacity)) is True; returns (batch, 1, heads * head_dim). Written out (scores and softmax
    in float32, as SDPA's CPU kernel keeps them) so that inductor fuses the casts, mask and
    softmax around two batched matmuls: SDPA's CPU kernel reads a bf16 cache at 2 GB/s, this at
    11 (float32: 10 either way; docs/cpu-decode-profile.md)."""
    bsz, heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(bsz, kv_heads, heads // kv_heads, head_dim).float()  # a kv head's queries together
    scores = (q @ k.float().transpose(-1, -2)) * head_dim**-0.5  # (batch, kv heads, groups, keys)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    out = (weights @ v.float()).to(v.dtype)  # (batch, kv heads, groups, head_dim)
    return out.reshape(bsz, q_len, -1)


class Attention(nn.Module):
    def __init__(self, config: OuroConfig, gate: nn.Module | None) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.kv_gate = gate  # None for Ouro; MELT's KVUpdateGate
        self.fused: FusedLinear | None = None  # the eager decode engine's (fused_projections.py)

    def one_input_linears(self) -> list[nn.Linear]:
        """The projections that read one input: q, k, v (Ouro); k, v (MELT: its gated state)."""
        kv = [self.k_proj, self.v_proj]
        return kv if self.kv_gate is not None else [self.q_proj, *kv]

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_state: torch.Tensor | None, loop: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values (batch, heads, tokens, head_dim) with RoPE applied, and what
        the keys/values were projected from (x for Ouro, MELT's gated state h at loop `loop`)."""
        bsz, q_len, _ = x.shape
        kv_in = x if self.kv_gate is None else self.kv_gate(x, kv_state, loop)
        # The fused weight is not the parameters: with gradients, each projection on its own.
        if self.fused is not None and not self.fused.current():
            self.fused = None  # stale (the weights have new storage): let its old tensor go
        cos, sin = rope
        if self.fused is not None and not torch.is_grad_enabled() and self.kv_gate is None:
            # q, k, v in one matmul, and q and k rotated together: the same values in half the calls
            q, k, v = self._fused_qkv(x, cos, sin)
            return q, k, v, kv_in
        if self.fused is not None and not torch.is_grad_enabled():
            q, k, v = self.q_proj(x), *self.fused(kv_in)
        else:
            q, k, v = self.q_proj(x), self.k_proj(kv_in), self.v_proj(kv_in)
        q = q.view(bsz, q_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(bsz, q_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(bsz, q_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, kv_in

    def _fused_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bsz, q_len, _ = x.shape
        qkv = F.linear(x, self.fused.weight).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        qk, v = qkv.split([self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=1)
        q, k = apply_rope(qk, cos, sin).split([self.n_heads, self.n_kv_heads], dim=1)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionMask) -> torch.Tensor:
        """SDPA over the given keys/values, then the output projection."""
        bsz, _, q_len, _ = q.shape
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn.mask, is_causal=attn.is_causal,
            scale=self.head_dim**-0.5, enable_gqa=self.n_heads != self.n_kv_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(bsz, q_len, -1))

    def attend_one_query(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionMask) -> torch.Tensor:
        """`attend` for one query per sequence, written out (`one_query_attention`), then the
        output projection. For the compiled CPU step."""
        return self.o_proj(one_query_attention(q, k, v, attn.mask))

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMask,
        cache: LoopedKVCache | TransitionKVCache | None,
        slot: int | tuple[int, int],
        start: int,
        kv_state: torch.Tensor | None,
        loop: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v, kv_in = self.project(x, rope, kv_state, loop)
        if isinstance(cache, TransitionKVCache):  # MELT phase-1 training: mix with Ouro's rows
            bsz, q_len, _ = x.shape
            cos, sin = rope
            k_o = apply_rope(self.k_proj(x).view(bsz, q_len, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            v_o = self.v_proj(x).view(bsz, q_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
            k, v = cache.update_mixed(slot, (k_o, v_o), (k, v), start)
        elif cache is not None:
            k, v = cache.update_slot(slot, k, v, start)
            out = cache.attend(self, slot, q, k, v)
            if out is not None:
                return out, (kv_in if self.kv_gate is not None else None)
        return self.attend(q, k, v, attn), (kv_in if self.kv_gate is not None else None)
