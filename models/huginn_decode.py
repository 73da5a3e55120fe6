"""Huginn's static-shape decode step, the counterpart of decode_engine.decode_one_token: the
prelude, every recurrence step and the coda for one token per sequence at a tensor position,
over a preallocated, zeroed cache whose rows are written in place (`write_at`) and read over the
whole capacity under a mask. The same code runs eager or through torch.compile (DecodeEngine
picks it for a Huginn model), and its logits equal the model's own forward given the same
initial state (tests/test_huginn_decode.py).

The random initial state is drawn outside the step (`HuginnForCausalLM.initialize_state`, from
the global RNG as forward draws it): a compiled graph takes it as an input, so a seed gives the
same tokens through either engine."""

from __future__ import annotations

import torch

from .huginn import HuginnForCausalLM
from .kv_cache import LoopedKVCache


def huginn_rope_table(model: HuginnForCausalLM, capacity: int) -> torch.Tensor:
    """The rows of the model's persistent `freqs_cis` for positions below `capacity`: (capacity,
    1, head_dim / 2, 2), looked up per step (a view: no byte added)."""
    if capacity > model.config.block_size:
        raise ValueError(f"a capacity of {capacity} tokens is past the {model.config.block_size}-position RoPE "
                         "table (block_size)")
    return model.freqs_cis[0, :capacity]


def huginn_decode_one_token(
    model: HuginnForCausalLM, token: torch.Tensor, input_pos: torch.Tensor, cache: LoopedKVCache, steps: int,
    rope: torch.Tensor, state: torch.Tensor, one_query_attention: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole decode step for `token` (batch, 1) at `input_pos` (one position, or one per
    sequence) from the initial recurrent state `state` (batch, 1, n_embd): (next token, logits in
    float32, as forward returns them). `rope`: huginn_rope_table."""
    capacity = cache.keys[0].shape[2]
    positions = input_pos[:, None]
    mask = (torch.arange(capacity, device=token.device)[None] <= positions)[:, None, None]  # (1 or batch, 1, 1, cap)
    freqs = rope[input_pos][:, None]  # (1 or batch, 1, 1, head_dim / 2, 2)

    def layer(block, x, slot):
        return block.decode(x, freqs, cache, slot, input_pos, mask, one_query_attention)

    _, x = model.run_stack(token, steps, lambda e: state, layer)
    logits = model.lm_head(x[:, -1]).float()
    return logits.argmax(-1, keepdim=True), logits
