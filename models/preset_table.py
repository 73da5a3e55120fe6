"""The presets: published Ouro configs, their MELT counterparts and tiny CPU ones, by name. No
torch here, so the command line checks --models before torch loads (models/names.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .configs import OuroConfig

# Published values, ByteDance/Ouro-1.4B and Ouro-2.6B config.json (see shared notes).
_OURO_1_4B = dict(
    vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
    num_attention_heads=16, num_key_value_heads=16, head_dim=128, max_position_embeddings=65536,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, total_ut_steps=4,
    early_exit_threshold=1.0,
)
_OURO_2_6B = {**_OURO_1_4B, "num_hidden_layers": 48}
# Small enough for a CPU sweep in seconds; GQA (4 query heads, 2 KV heads) so that path is tested.
_TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
    rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, total_ut_steps=4,
    early_exit_threshold=1.0,
)

# A mid-size CPU shape (~58 M parameters) for decode at the machine's limit
# (benchmarks/cpu_decode_limit.py): big enough that weights, not dispatch, set the time.
_MID = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, total_ut_steps=4,
    early_exit_threshold=1.0,
)


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "ouro" or "melt"
    fields: dict
    description: str

    def config(self) -> OuroConfig:
        from .configs import MeltConfig, OuroConfig  # transformers: only when a model is built

        return (MeltConfig if self.family == "melt" else OuroConfig)(**self.fields)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("ouro-1.4b", "ouro", _OURO_1_4B, "ByteDance Ouro-1.4B"),
        Preset("ouro-2.6b", "ouro", _OURO_2_6B, "ByteDance Ouro-2.6B"),
        Preset("ouro-tiny", "ouro", _TINY, "tiny Ouro for CPU tests"),
        Preset("melt-1.4b", "melt", _OURO_1_4B, "MELT on Ouro-1.4B (MELT-1.6B)"),
        Preset("melt-2.6b", "melt", _OURO_2_6B, "MELT on Ouro-2.6B"),
        Preset("melt-tiny", "melt", _TINY, "tiny MELT for CPU tests"),
        Preset("ouro-mid", "ouro", _MID, "mid-size Ouro for CPU decode benchmarks"),
        Preset("melt-mid", "melt", _MID, "mid-size MELT for CPU decode benchmarks"),
    ]
}
ALIASES = {"tiny": "ouro-tiny"}


class UnknownPresetError(ValueError):
    pass


def get_preset(name: str) -> Preset:
    """The preset called `name` (or an alias of one)."""
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise UnknownPresetError(f"unknown model {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[key]


def is_melt(name: str) -> bool:
    """Whether the preset called `name` is a MELT model (its own gated cache) rather than an
    Ouro-family one (a KV policy applies)."""
    return get_preset(name).family == "melt"
