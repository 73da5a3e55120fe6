"""One decoder layer of the looped stack: an RMSNorm sandwich around attention and around a
SwiGLU MLP (module and parameter names as the official Ouro checkpoints):

    x = x + input_layernorm_2(attn(input_layernorm(x)))
    x = x + post_attention_layernorm_2(mlp(post_attention_layernorm(x)))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .configs import OuroConfig
from .fused_projections import FusedLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As the official code: normalise in fp32, cast back, then scale.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.fused: FusedLinear | None = None  # the eager decode engine's (fused_projections.py)

    def one_input_linears(self) -> list[nn.Linear]:
        return [self.gate_proj, self.up_proj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and not self.fused.current():
            self.fused = None  # stale (the weights have new storage): let its old tensor go
        if self.fused is not None and not torch.is_grad_enabled():
            gate, up = self.fused(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: OuroConfig, gate: nn.Module | None) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(config, gate)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.input_layernorm_2 = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm_2 = RMSNorm(config.hidden_size, eps)
        # set by PreTrainedModel.gradient_checkpointing_enable(); see forward
        self.gradient_checkpointing = False

    def forward(self, x, rope, attn, cache, slot, start, kv_state, loop=0):
        """Returns the new residual stream, the KV state (MELT's h) and the attention output."""
        h, kv_state = self.self_attn(self.input_layernorm(x), rope, attn, cache, slot, start, kv_state, loop)
        return self.after_attention(x, h), kv_state, h

    def after_attention(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The rest of the layer once attention has produced `h`: both residual adds and the MLP."""
        x = x + self.input_layernorm_2(h)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Only the MLP block is recomputed in backward: it holds most of a layer's activations
            # (3 x intermediate_size per token) and has no side effects, while attention writes
            # cache rows that a recomputation would write twice.
            return x + self._gradient_checkpointing_func(self._mlp_block, x)
        return x + self._mlp_block(x)

    def _mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)))
