"""Ouro (LoopLM, arXiv 2510.25741): the looped stack with one KV cache per (loop, layer).

Cache index = loop * num_hidden_layers + layer, so KV memory grows by loops x layers x tokens.
Loads the released checkpoints (config.json + safetensors, official key names) with plain
`OuroForCausalLM.from_pretrained(path_or_hub_id)`; no remote code is ever run.

One deliberate difference from the released remote code: that code applies the config's
`early_exit_threshold` (1.0) to every forward, which picks the last loop unless a gate's
cumulative exit probability rounds to exactly 1.0 in floating point; here logits come from the
last loop unless the caller asks for an exit mode (`exit_threshold=...` reproduces the official
rule exactly).
"""

from __future__ import annotations

from .configs import OuroConfig
from .looped import LoopedForCausalLM, LoopedModel


class OuroModel(LoopedModel):
    config_class = OuroConfig


class OuroForCausalLM(LoopedForCausalLM):
    config_class = OuroConfig
    base_model_class = OuroModel
