"""Ouro (LoopLM, arXiv 2510.25741): the looped stack with one KV cache per (loop, layer).

Cache index = loop * num_hidden_layers + layer, so KV memory grows by loops x layers x tokens.
Loads the released checkpoints (config.json + safetensors, official key names) with plain
`OuroForCausalLM.from_pretrained(path_or_hub_id)`; no remote code is ever run.

One deliberate difference from the released remote code: that code applies the config's
`early_exit_threshold` (1.0) to every forward, computing the exit distribution in the model's
dtype, so in bf16 a token whose gate logit exceeds about 6 (sigmoid rounds to 1.0) exits at that
loop; here logits come from the last loop unless the caller asks for an exit mode.
`official_exit=True` reproduces the released rule bit for bit in the model's dtype;
`exit_threshold=1.0` computes in float32 and so does not (in bf16 the two differ).
"""

from __future__ import annotations

from .configs import OuroConfig
from .looped import LoopedForCausalLM, LoopedModel, register_auto_class


class OuroModel(LoopedModel):
    config_class = OuroConfig


class OuroForCausalLM(LoopedForCausalLM):
    config_class = OuroConfig
    base_model_class = OuroModel


register_auto_class(OuroConfig, OuroForCausalLM)
