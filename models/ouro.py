"""Ouro (LoopLM, arXiv 2510.25741): the looped stack with one KV cache per (loop, layer).

Cache index = loop * num_hidden_layers + layer, so KV memory grows by loops x layers x tokens.
Loads the released checkpoints (config.json + safetensors, official key names) with plain
`OuroForCausalLM.from_pretrained(path_or_hub_id)`; no remote code is ever run.
"""

from __future__ import annotations

from .configs import OuroConfig
from .looped import LoopedForCausalLM, LoopedModel


class OuroModel(LoopedModel):
    config_class = OuroConfig


class OuroForCausalLM(LoopedForCausalLM):
    config_class = OuroConfig
    base_model_class = OuroModel
