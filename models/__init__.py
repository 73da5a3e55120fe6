"""Reference looped LMs: Ouro (per-loop KV cache) and MELT (shared gated KV cache)."""

from .configs import MAX_LOOPS, MeltConfig, OuroConfig
from .kv_cache import LoopedKVCache
from .kv_policy import kv_bytes_per_token, kv_policy_for, predict_kv_cache_bytes
from .looped import LoopedForCausalLM, exit_distribution, threshold_exit_steps
from .melt import MeltForCausalLM, MeltModel
from .ouro import OuroForCausalLM, OuroModel
from .presets import PRESETS, Preset, UnknownPresetError, count_parameters, get_preset, load_model


def _register_auto_classes() -> None:
    """Let AutoConfig / AutoModelForCausalLM open Ouro and MELT checkpoints with our classes, so
    an official Ouro directory loads without remote code. A transformers release that ships its
    own "ouro" keeps it (registration then raises ValueError and we leave it be)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for config_class, model_class in ((OuroConfig, OuroForCausalLM), (MeltConfig, MeltForCausalLM)):
        try:
            AutoConfig.register(config_class.model_type, config_class)
            AutoModelForCausalLM.register(config_class, model_class)
        except ValueError:
            pass


_register_auto_classes()

__all__ = [
    "MAX_LOOPS", "MeltConfig", "OuroConfig", "LoopedKVCache", "kv_bytes_per_token", "kv_policy_for",
    "predict_kv_cache_bytes", "LoopedForCausalLM", "exit_distribution", "threshold_exit_steps",
    "MeltForCausalLM", "MeltModel", "OuroForCausalLM", "OuroModel", "PRESETS", "Preset",
    "UnknownPresetError", "count_parameters", "get_preset", "load_model",
]
