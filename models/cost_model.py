"""Analytic costs of the looped models, from the config alone: the bytes a decode step must read
and the FLOPs of prefill and decode. They are floors for a roofline, not measurements.

Counting rules (what the code in looped.py and decode_engine.py executes):
  - every loop runs every layer once and re-reads its weights (the loop reuses the same layers;
    no cache holds a 1.4B model's layers between loops);
  - a layer's weights: q, k, v, o projections, the SwiGLU MLP's three matrices, four RMSNorms;
    MELT adds its gate, whose size depends on `config.gate` (elementwise: W_z with bias and U_z,
    2h^2 + h; scalar: 2h + 1; ema: 1; mean and last: none), and which is skipped at the first
    loop when `first_loop_state="input"` (h_1 = x_1);
  - after every loop the final norm and the early-exit gate (hidden + 1 weights) run;
  - per decode step the lm head is read once, and one embedding row per sequence;
  - KV: every loop and layer reads the `context` rows the token attends to (its own included)
    from its slot: Ouro's per-loop slot and MELT's shared slot hold one row per token each, so
    the bytes read are the same; MELT saves memory, not reads;
  - FLOPs count matrix products and attention (2 per multiply-add), not norms or element-wise
    work; prefill attends the causal pairs S(S+1)/2 per sequence whatever the chunking, and its
    lm head runs for the last position only (logits_to_keep=1).
"""

from __future__ import annotations

import torch

from . import huginn_cost
from .configs import OuroConfig
from .huginn_config import HuginnConfig
from .kv_policy import parse_kv_policy


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _is_melt(config: OuroConfig) -> bool:
    return parse_kv_policy(getattr(config, "kv_policy", "per-loop")) == "shared-gated"


def gate_loops(config: OuroConfig, loops: float) -> float:
    """Loops in which MELT's gate runs (0 for Ouro)."""
    if not _is_melt(config):
        return 0.0
    return max(loops - 1, 0.0) if getattr(config, "first_loop_state", "input") == "input" else loops


def layer_weight_elements(config: OuroConfig) -> int:
    """Elements of one decoder layer's own weights (attention, MLP, four norms), MELT gate excluded."""
    h, d = config.hidden_size, config.head_dim
    attention = h * config.num_attention_heads * d * 2 + h * config.num_key_value_heads * d * 2
    return attention + 3 * h * config.intermediate_size + 4 * h


def gate_weight_elements(config: OuroConfig) -> int:
    """Elements of one layer's MELT gate, by `config.gate` (melt_gates.py's GATE_CLASSES):
    elementwise W_z (with bias) and U_z, hidden x hidden each; scalar the same with one output;
    ema one decay logit; mean and last none. 0 for Ouro."""
    if not _is_melt(config):
        return 0
    h = config.hidden_size
    return {"elementwise": 2 * h * h + h, "scalar": 2 * h + 1, "ema": 1, "mean": 0, "last": 0}[_gate(config)]


def gate_matmul_flops_per_token(config: OuroConfig) -> int:
    """Matmul FLOPs of one layer's MELT gate for one token at one loop: x W_z and h U_z (2 per
    multiply-add); the ema, mean and last gates are element-wise only (not counted)."""
    if not _is_melt(config):
        return 0
    h = config.hidden_size
    return {"elementwise": 2 * 2 * h * h, "scalar": 2 * 2 * h}.get(_gate(config), 0)


def _gate(config: OuroConfig) -> str:
    return getattr(config, "gate", "elementwise")


def loop_tail_elements(config: OuroConfig) -> int:
    """The final norm and the early-exit gate, run after every loop."""
    return 2 * config.hidden_size + 1


def kv_row_bytes(config: OuroConfig, dtype: torch.dtype) -> int:
    """One token's K and V row in one slot."""
    return 2 * config.num_key_value_heads * config.head_dim * _itemsize(dtype)


def decode_bytes_per_token(
    config: OuroConfig, loops: float, batch: int, context: float, dtype: torch.dtype
) -> float:
    """Bytes one decode step (a new token for each of `batch` sequences, each attending `context`
    rows) must read: weights once per loop, the lm head once, the KV rows attended. `loops` may
    be a mean (early stopping)."""
    if isinstance(config, HuginnConfig):
        return huginn_cost.decode_bytes_per_token(config, loops, batch, context, dtype)
    size = _itemsize(dtype)
    layers = config.num_hidden_layers
    weights = loops * (layers * layer_weight_elements(config) + loop_tail_elements(config))
    weights += gate_loops(config, loops) * layers * gate_weight_elements(config)
    weights += config.vocab_size * config.hidden_size + batch * config.hidden_size  # lm head, embeddings
    kv = batch * loops * layers * context * kv_row_bytes(config, dtype)
    return weights * size + kv


def _token_matmul_flops(config: OuroConfig) -> int:
    """Matmul FLOPs of one token through one layer, attention scores excluded, gate excluded."""
    h, d = config.hidden_size, config.head_dim
    attention = 2 * h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    return attention + 2 * 3 * h * config.intermediate_size


def _attention_flops(config: OuroConfig, pairs: float) -> float:
    """QK^T and PV for `pairs` (query, key) pairs in one layer."""
    return 2 * 2 * config.num_attention_heads * config.head_dim * pairs


def _loop_flops(config: OuroConfig, loops: float, tokens: float, pairs: float) -> float:
    layers = config.num_hidden_layers
    per_loop = layers * (tokens * _token_matmul_flops(config) + _attention_flops(config, pairs))
    per_loop += tokens * 2 * config.hidden_size  # early-exit gate
    gate = gate_loops(config, loops) * layers * tokens * gate_matmul_flops_per_token(config)
    return loops * per_loop + gate


def prefill_flops(config: OuroConfig, loops: int, batch: int, seq_len: int) -> float:
    """FLOPs of a prefill of `seq_len` tokens per sequence (lm head for the last position only)."""
    if isinstance(config, HuginnConfig):
        return huginn_cost.prefill_flops(config, loops, batch, seq_len)
    pairs = seq_len * (seq_len + 1) / 2
    return batch * (_loop_flops(config, loops, seq_len, pairs) + 2 * config.hidden_size * config.vocab_size)


def decode_flops_per_token(config: OuroConfig, loops: float, batch: int, context: float) -> float:
    """FLOPs of one decode step: a token per sequence, each attending `context` rows."""
    if isinstance(config, HuginnConfig):
        return huginn_cost.decode_flops_per_token(config, loops, batch, context)
    return batch * (_loop_flops(config, loops, 1, context) + 2 * config.hidden_size * config.vocab_size)


def weights_bytes(config: OuroConfig, dtype: torch.dtype) -> int:
    """Bytes of all parameters (embedding and lm head counted apart, as the checkpoints store them)."""
    if isinstance(config, HuginnConfig):
        return huginn_cost.weights_bytes(config, dtype)
    layers = config.num_hidden_layers
    elements = layers * (layer_weight_elements(config) + gate_weight_elements(config)) + loop_tail_elements(config)
    elements += config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return elements * _itemsize(dtype)


def activation_peak_bytes(config: OuroConfig, batch: int, chunk_tokens: int, dtype: torch.dtype) -> int:
    """A first-order model of the largest transient during a forward over `chunk_tokens` tokens
    per sequence: the residual stream, the normed input, q/k/v, the attention output and the
    MLP's gate, up and product (the widest point of a layer), MELT's gate (z, h, and the product)
    on top, plus the last position's logits. Fused attention keeps no score matrix. A
    prediction to set beside the measured peak, not a substitute for it."""
    if isinstance(config, HuginnConfig):
        return huginn_cost.activation_peak_bytes(config, batch, chunk_tokens, dtype)
    h, inter, d = config.hidden_size, config.intermediate_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    per_token = 4 * h + qkv + 3 * inter + (3 * h if _is_melt(config) else 0)
    return batch * (chunk_tokens * per_token * _itemsize(dtype) + config.vocab_size * _itemsize(dtype))
