"""Reference looped LMs: Ouro (per-loop KV cache) and MELT (shared gated KV cache)."""

from .configs import MAX_LOOPS, MeltConfig, OuroConfig
from .kv_cache import LoopedKVCache
from .kv_policy import kv_bytes_per_token, kv_policy_for, predict_kv_cache_bytes
from .looped import LoopedForCausalLM, exit_distribution, threshold_exit_steps
from .melt import MeltForCausalLM, MeltModel
from .ouro import OuroForCausalLM, OuroModel
from .presets import PRESETS, Preset, UnknownPresetError, count_parameters, get_preset, load_model

__all__ = [
    "MAX_LOOPS", "MeltConfig", "OuroConfig", "LoopedKVCache", "kv_bytes_per_token", "kv_policy_for",
    "predict_kv_cache_bytes", "LoopedForCausalLM", "exit_distribution", "threshold_exit_steps",
    "MeltForCausalLM", "MeltModel", "OuroForCausalLM", "OuroModel", "PRESETS", "Preset",
    "UnknownPresetError", "count_parameters", "get_preset", "load_model",
]
