"""The one place where Ouro and MELT differ: what happens to keys and values across loops.

A KV policy answers three questions for the shared looped stack (looped.py):
  - which cache slot a (loop, layer) writes: Ouro keeps one per loop and layer, MELT one per layer;
  - what the layer projects keys/values from: Ouro the layer input x, MELT a gated state h;
  - whether the sequence is processed in chunks (MELT: earlier tokens' rows must be final).
Everything else (embeddings, layers, RoPE, norms, the loop, early exit) is shared.
"""

from __future__ import annotations

import torch
from torch import nn

from .configs import OuroConfig


class KVPolicy:
    """Ouro's per-loop KV cache: slot = loop * num_layers + layer, so KV grows linearly in loops."""

    name = "per_loop"

    def __init__(self, config: OuroConfig) -> None:
        self.num_layers = config.num_hidden_layers

    def num_slots(self, loops: int) -> int:
        return loops * self.num_layers

    def slot(self, loop: int, layer: int) -> int:
        return loop * self.num_layers + layer

    def make_gate(self, config: OuroConfig) -> nn.Module | None:
        return None

    @property
    def chunk_size(self) -> int | None:
        return None

    def fill_skipped_loops(self, cache, last_loop: int, loops: int, start: int, end: int) -> None:
        """After early stopping at `last_loop`, tokens [start, end) have no rows in the slots of
        later loops; copy their last computed loop's rows there, so later tokens attending at
        those loops find them (Ouro's 'reuse the last loop's KV' rule)."""
        for layer in range(self.num_layers):
            src = self.slot(last_loop, layer)
            keys = cache.keys[src][:, :, start:end]
            values = cache.values[src][:, :, start:end]
            for loop in range(last_loop + 1, loops):
                cache.update_slot(self.slot(loop, layer), keys, values, start)


class SharedGatedKVPolicy(KVPolicy):
    """MELT's shared cache: one slot per layer, rewritten at every loop from a gated state."""

    name = "shared_gated"

    def __init__(self, config: OuroConfig) -> None:
        super().__init__(config)
        self._chunk_size = getattr(config, "chunk_size", None)

    def num_slots(self, loops: int) -> int:
        return self.num_layers

    def slot(self, loop: int, layer: int) -> int:
        return layer

    def make_gate(self, config: OuroConfig) -> nn.Module | None:
        return KVUpdateGate(config.hidden_size, config.first_loop_state)

    @property
    def chunk_size(self) -> int | None:
        return self._chunk_size

    def fill_skipped_loops(self, cache, last_loop: int, loops: int, start: int, end: int) -> None:
        pass  # one shared row per token: it already holds the last computed loop's keys/values


class GateProjection(nn.Linear):
    """A gate weight (W_z or U_z); its own type so weight init can tell it from other Linears."""


class KVUpdateGate(nn.Module):
    """GRU-style element-wise update gate (no reset gate, no tanh), one per layer:

        z_t = sigmoid(x_t W_z + b_z + h_{t-1} U_z)
        h_t = z_t * h_{t-1} + (1 - z_t) * x_t

    t is the loop. First loop: `first_loop_state="input"` takes h_1 = x_1 (z unused), "zeros"
    takes h_0 = 0, i.e. h_1 = (1 - z_1) * x_1.
    """

    def __init__(self, hidden_size: int, first_loop_state: str = "input") -> None:
        super().__init__()
        self.w_z = GateProjection(hidden_size, hidden_size, bias=True)
        self.u_z = GateProjection(hidden_size, hidden_size, bias=False)
        self.first_loop_state = first_loop_state

    def forward(self, x: torch.Tensor, h_prev: torch.Tensor | None) -> torch.Tensor:
        if h_prev is None:
            if self.first_loop_state == "input":
                return x
            h_prev = torch.zeros_like(x)
        z = torch.sigmoid(self.w_z(x) + self.u_z(h_prev))
        return z * h_prev + (1 - z) * x


POLICIES: dict[str, type[KVPolicy]] = {
    KVPolicy.name: KVPolicy,
    SharedGatedKVPolicy.name: SharedGatedKVPolicy,
}


def kv_policy_for(config: OuroConfig) -> KVPolicy:
    """The KV policy a config asks for (its class attribute `kv_policy`)."""
    return POLICIES[config.kv_policy](config)


def kv_bytes_per_token(config: OuroConfig, loops: int, dtype: torch.dtype) -> int:
    """Analytic KV-cache bytes one token costs at `loops` loops (K and V, all slots)."""
    slots = kv_policy_for(config).num_slots(loops)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return slots * 2 * config.num_key_value_heads * config.head_dim * itemsize


def predict_kv_cache_bytes(
    config: OuroConfig, loops: int, batch: int, tokens: int, dtype: torch.dtype
) -> int:
    """Analytic bytes a cache holding `tokens` tokens for `batch` sequences must hold."""
    return batch * tokens * kv_bytes_per_token(config, loops, dtype)
