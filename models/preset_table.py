"""The presets: published Ouro configs, their MELT counterparts and tiny CPU ones, by name. No
torch here, so the command line checks --models before torch loads (models/names.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .configs import OuroConfig
    from .huginn_config import HuginnConfig

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

# Huginn-0125 (tomg-group-umd/huginn-0125 config.json, commit def35f6): a 2-layer prelude, a
# 4-layer recurrent core run 32 steps by default, a 2-layer coda; 55 heads x 96, no GQA.
_HUGINN_3_5B = dict(
    n_embd=5280, n_heads=55, n_layers=8, block_size=4096, vocab_size=65536, intermediate_size=17920,
    n_layers_in_prelude=2, n_layers_in_recurrent_block=4, n_layers_in_coda=2, mean_recurrence=32,
    qk_bias=True, rope_base=50_000, norm_eps=1e-6, tie_embeddings=True, bias=False,
)
# The same structure (2 + 4 + 2 layers, so Huginn's cache formulas hold as written), CPU-sized.
_HUGINN_TINY = {**_HUGINN_3_5B, "n_embd": 64, "n_heads": 4, "block_size": 8192, "vocab_size": 512,
                "intermediate_size": 176, "mean_recurrence": 8, "bos_token_id": 1, "eos_token_id": 2,
                "pad_token_id": 0}


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "ouro", "melt" or "huginn"
    fields: dict
    description: str

    def config(self) -> OuroConfig | HuginnConfig:
        from .configs import MeltConfig, OuroConfig  # transformers: only when a model is built
        from .huginn_config import HuginnConfig

        return {"melt": MeltConfig, "huginn": HuginnConfig}.get(self.family, OuroConfig)(**self.fields)


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
        Preset("huginn-3.5b", "huginn", _HUGINN_3_5B, "Huginn-0125 (tomg-group-umd/huginn-0125), recurrent depth"),
        Preset("huginn-tiny", "huginn", _HUGINN_TINY, "tiny Huginn for CPU tests"),
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


def is_huginn(name: str) -> bool:
    """Whether the preset called `name` is a Huginn (recurrent-depth) model: its own KV policies."""
    return get_preset(name).family == "huginn"


def is_melt(name: str) -> bool:
    """Whether the preset called `name` is a MELT model (its own gated cache) rather than an
    Ouro-family one (a KV policy applies)."""
    return get_preset(name).family == "melt"
