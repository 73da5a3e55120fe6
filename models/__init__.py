"""Reference looped LMs: Ouro (per-loop KV cache) and MELT (shared gated KV cache).

The names below load on first use (PEP 562), so `melt_bench.models.names` and `.preset_table`
(plain Python) can be read without importing torch: the command line checks flags that way."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "MAX_LOOPS": "names", "MeltConfig": "configs", "OuroConfig": "configs", "LoopedKVCache": "kv_cache",
    "kv_bytes_per_token": "kv_policy", "kv_policy_for": "kv_policy", "predict_kv_cache_bytes": "kv_policy",
    "LoopedForCausalLM": "looped", "exit_distribution": "exit_rules", "threshold_exit_steps": "exit_rules",
    "MeltForCausalLM": "melt", "MeltModel": "melt", "OuroForCausalLM": "ouro", "OuroModel": "ouro",
    "PRESETS": "preset_table", "Preset": "preset_table", "UnknownPresetError": "preset_table",
    "get_preset": "preset_table", "count_parameters": "presets", "load_model": "presets",
}
__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)


if TYPE_CHECKING:
    from .configs import MeltConfig, OuroConfig
    from .exit_rules import exit_distribution, threshold_exit_steps
    from .kv_cache import LoopedKVCache
    from .kv_policy import kv_bytes_per_token, kv_policy_for, predict_kv_cache_bytes
    from .looped import LoopedForCausalLM
    from .melt import MeltForCausalLM, MeltModel
    from .names import MAX_LOOPS
    from .ouro import OuroForCausalLM, OuroModel
    from .preset_table import PRESETS, Preset, UnknownPresetError, get_preset
    from .presets import count_parameters, load_model
