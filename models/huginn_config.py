"""`HuginnConfig`: the config of Huginn-0125 (tomg-group-umd/huginn-0125), a recurrent-depth LM,
with the field names and defaults of its released `raven_config_minimal.py` (model_type
"huginn_raven"), so its config.json loads as it is.

A prelude of 2 layers embeds the tokens, a core of 4 layers runs `num_steps` times (32 by
default) from a random state with the prelude's output injected at every step, and a coda of 2
layers reads the last state out. Fields the official modeling file never reads (the class names,
the init strategy, the training sampler) are kept as given; those naming something other than
what it builds are refused, so a config this code cannot compute fails loudly."""

from __future__ import annotations

from math import sqrt
from typing import Any

from transformers import PreTrainedConfig

from .names import MAX_LOOPS

# Fields the official code hard-codes: another value would silently mean something else.
_FIXED = {"block_class_name": "SandwichBlock", "norm_class_name": "RMSNorm_llama", "mlp_class_name": "GatedMLP",
          "nonlin_name": "SiLU", "injection_type": "linear"}


class HuginnConfig(PreTrainedConfig):
    model_type = "huginn_raven"
    # the official names, and block_size under transformers' name (lm-eval's max_length reads it)
    attribute_map = {"num_attention_heads": "n_heads", "hidden_size": "n_embd", "num_hidden_layers": "n_layers",
                     "max_position_embeddings": "block_size"}
    kv_policy = "full"  # Huginn's cache lookup strategy (huginn_kv.py); set per model
    kv_quant = None  # (packed caches are for Ouro-family models)

    def __init__(
        self,
        n_embd: int = 5280,
        n_heads: int = 55,
        n_layers: int = 8,
        block_size: int = 4096,
        vocab_size: int = 65536,
        padding_multiple: int = 4096,
        tie_embeddings: bool = True,
        intermediate_size: int = 17920,
        bias: bool = False,
        norm_eps: float = 1e-6,
        n_layers_in_recurrent_block: int = 4,
        mean_recurrence: int = 32,
        mean_backprop_depth: int = 8,
        n_layers_in_prelude: int = 2,
        n_layers_in_coda: int = 2,
        qk_bias: bool = True,
        rope_base: float = 50_000,
        test_time_noise: float = 0.0,
        **kwargs: Any,
    ) -> None:
        for field, value in _FIXED.items():
            given = kwargs.get(field, value)
            if given != value:
                raise ValueError(f"{field}={given!r} is not supported by melt-bench's Huginn (only {value!r})")
        if test_time_noise:
            raise ValueError(f"test_time_noise={test_time_noise!r}: melt-bench's Huginn runs without test-time noise")
        if n_embd % n_heads:
            raise ValueError(f"n_embd={n_embd} is not a multiple of n_heads={n_heads}")
        if not 1 <= mean_recurrence <= MAX_LOOPS:
            raise ValueError(f"mean_recurrence must lie in 1..{MAX_LOOPS}, got {mean_recurrence}")
        self.n_embd = n_embd
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.block_size = block_size
        self.vocab_size = self.padded_vocab_size = vocab_size
        self.padding_multiple = padding_multiple
        self.tie_embeddings = tie_embeddings
        self.intermediate_size = intermediate_size
        self.bias = bias
        self.norm_eps = norm_eps
        self.n_layers_in_recurrent_block = n_layers_in_recurrent_block
        self.mean_recurrence = mean_recurrence
        self.mean_backprop_depth = mean_backprop_depth
        self.n_layers_in_prelude = n_layers_in_prelude
        self.n_layers_in_coda = n_layers_in_coda
        self.qk_bias = qk_bias
        self.rope_base = rope_base
        self.test_time_noise = 0
        self.num_key_value_heads = n_heads  # no GQA in Huginn
        self.head_dim = n_embd // n_heads
        # Derived, as the official config sets them (released config.json files carry them too)
        for derived in ("effective_expected_depth", "init_values", "num_key_value_heads", "head_dim", "init_std",
                        "embed_scale"):
            kwargs.pop(derived, None)
        self.effective_expected_depth = n_layers_in_prelude + n_layers_in_coda + \
            n_layers_in_recurrent_block * mean_recurrence
        self.init_std = sqrt(2 / (5 * n_embd))  # the official init_values["std"]; also the random state's
        self.embed_scale = sqrt(n_embd)  # embeddings and the random state are scaled by it
        kwargs.setdefault("bos_token_id", 65504)
        kwargs.setdefault("eos_token_id", 65505)
        kwargs.setdefault("pad_token_id", 65509)
        kwargs.pop("tie_word_embeddings", None)  # a saved config carries it too: tie_embeddings decides, as upstream
        super().__init__(tie_word_embeddings=tie_embeddings, **kwargs)
