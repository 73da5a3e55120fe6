"""Huginn's analytic figures for the memory rows: parameter bytes, the cache's bytes under a
lookup strategy, and a first-order activation peak (the counterparts of cost_model.py's and
kv_policy.py's for Ouro-family configs). Predictions to set beside what a point measures."""

from __future__ import annotations

import torch

from .huginn_config import HuginnConfig
from .huginn_kv import parse_huginn_kv_policy


def block_elements(config: HuginnConfig) -> int:
    """One sandwich block: Wqkv, proj, the MLP's fc (gate | up) and proj, four norms, qk_bias."""
    e, i = config.n_embd, config.intermediate_size
    return 4 * e * e + 3 * e * i + 4 * e + (2 * e if config.qk_bias else 0)


def weights_bytes(config: HuginnConfig, dtype: torch.dtype) -> int:
    """Parameters in `dtype` (a tied lm head counted once) plus the RoPE table buffer (freqs_cis),
    built in float32."""
    e = config.n_embd
    blocks = config.n_layers_in_prelude + config.n_layers_in_recurrent_block + config.n_layers_in_coda
    elements = blocks * block_elements(config) + 2 * e * e + (e if config.bias else 0) + e  # adapter, ln_f
    elements += config.vocab_size * e * (1 if config.tie_word_embeddings else 2)
    rope = config.block_size * config.head_dim * 4  # (positions, head_dim / 2, cos and sin), float32
    return elements * dtype.itemsize + rope


def kv_cache_bytes(config: HuginnConfig, steps: int, batch: int, tokens: int, dtype: torch.dtype,
                   kv_policy: str | None = None) -> int:
    """Bytes a cache holding `tokens` tokens of `batch` sequences holds at `steps` recurrence
    steps: one K and one V row per slot the lookup strategy keeps (huginn_kv.py)."""
    policy = parse_huginn_kv_policy(kv_policy or config.kv_policy, config.n_layers_in_prelude,
                                    config.n_layers_in_recurrent_block, config.n_layers_in_coda)
    return batch * tokens * policy.kv_bytes_per_token(steps, config.n_heads, config.head_dim, dtype.itemsize)


def activation_peak_bytes(config: HuginnConfig, batch: int, chunk_tokens: int, dtype: torch.dtype) -> int:
    """A first-order model of the largest transient of a forward over `chunk_tokens` tokens per
    sequence: the prelude's output (kept for every step's injection), the state, the adapter's
    input [state, e] and output, the normed input, q/k/v, the attention output, the MLP's fc
    output and product, the float32 copies of q and k RoPE rotates, and the last position's
    logits (in `dtype`, then float32). Fused attention keeps no score matrix."""
    e, i, item = config.n_embd, config.intermediate_size, dtype.itemsize
    per_token = (9 * e + 3 * i) * item + 2 * e * 4
    return batch * (chunk_tokens * per_token + config.vocab_size * (item + 4))


def _layer_calls(config: HuginnConfig, steps: float) -> float:
    """Sandwich blocks one token passes through: prelude, the core at every step, coda."""
    return config.n_layers_in_prelude + config.n_layers_in_coda + config.n_layers_in_recurrent_block * steps


def decode_bytes_per_token(config: HuginnConfig, steps: float, batch: int, context: float,
                           dtype: torch.dtype) -> float:
    """Bytes one decode step (a token per sequence, each attending `context` rows) must read:
    prelude and coda weights once, the core's and the adapter's once per step, the lm head, the
    embeddings, and `context` K/V rows at every block call."""
    e, item = config.n_embd, dtype.itemsize
    fixed = (config.n_layers_in_prelude + config.n_layers_in_coda) * block_elements(config) + e  # ln_f
    per_step = config.n_layers_in_recurrent_block * block_elements(config) + 2 * e * e
    weights = fixed + steps * per_step + config.vocab_size * e + batch * e
    kv = batch * _layer_calls(config, steps) * context * 2 * config.n_heads * config.head_dim * item
    return weights * item + kv


def _token_flops(config: HuginnConfig, steps: float, pairs: float, tokens: float) -> float:
    e, i = config.n_embd, config.intermediate_size
    block = tokens * 2 * (4 * e * e + 3 * e * i) + 2 * 2 * e * pairs  # matmuls; QK^T and PV
    return _layer_calls(config, steps) * block + steps * tokens * 2 * 2 * e * e  # + the adapter


def prefill_flops(config: HuginnConfig, steps: int, batch: int, seq_len: int) -> float:
    """FLOPs of a prefill of `seq_len` tokens per sequence (lm head for the last position only)."""
    pairs = seq_len * (seq_len + 1) / 2
    return batch * (_token_flops(config, steps, pairs, seq_len) + 2 * config.n_embd * config.vocab_size)


def decode_flops_per_token(config: HuginnConfig, steps: float, batch: int, context: float) -> float:
    """FLOPs of one decode step: a token per sequence, each attending `context` rows."""
    return batch * (_token_flops(config, steps, context, 1) + 2 * config.n_embd * config.vocab_size)
