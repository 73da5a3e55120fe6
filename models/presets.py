"""Named presets (published Ouro configs, their MELT counterparts, tiny CPU ones) and loading."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedConfig

from .configs import MeltConfig, OuroConfig
from .looped import LoopedForCausalLM
from .melt import MeltForCausalLM
from .ouro import OuroForCausalLM

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


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "ouro" or "melt"
    fields: dict
    description: str

    def config(self) -> OuroConfig:
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


def model_class(family: str) -> type[LoopedForCausalLM]:
    return MeltForCausalLM if family == "melt" else OuroForCausalLM


def count_parameters(preset: Preset) -> int:
    """Parameters of the preset's model, counted on the meta device (no memory used)."""
    with torch.device("meta"):
        model = model_class(preset.family)(preset.config())
    return sum(p.numel() for p in model.parameters())


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    name: str,
    weights: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    kv_policy: str | None = None,
    decode_reads: str | None = None,
    kv_quant: str | None = None,
) -> LoopedForCausalLM:
    """The preset's model: random weights, or `weights` (a local directory or hub id) loaded with
    `from_pretrained`. A MELT preset given Ouro weights is built with `MeltForCausalLM.from_ouro`.
    `kv_policy` runs an Ouro-family model under a training-free KV policy (kv_policy.py);
    `decode_reads` sets what a MELT model's decoded tokens read ("final" or "chunk"); `kv_quant`
    ("int8" / "int4") packs cached rows (packed_cache.py)."""
    model = _load(name, weights, dtype, device)
    if kv_policy is not None:
        model.use_kv_policy(kv_policy)
    if decode_reads is not None:
        model.use_decode_reads(decode_reads)
    if kv_quant is not None:
        model.use_kv_quant(kv_quant)
    return model


def _load(name: str, weights: str | Path | None, dtype: torch.dtype, device: str | torch.device) -> LoopedForCausalLM:
    preset = get_preset(name)
    cls = model_class(preset.family)
    if weights is None:
        # Built where it will run, in its dtype: a 1.4B model never passes through fp32 on the CPU.
        torch.manual_seed(0)
        with torch.device(device), default_dtype(dtype):
            return cls(preset.config()).eval()
    model_type = PreTrainedConfig.get_config_dict(str(weights))[0].get("model_type")
    if preset.family == "melt" and model_type == "ouro":
        ouro = OuroForCausalLM.from_pretrained(str(weights), dtype=dtype).to(device)
        return MeltForCausalLM.from_ouro(ouro).eval()
    if model_type != preset.family:
        raise ValueError(f"{weights} holds a {model_type!r} model, not {preset.family!r}")
    return cls.from_pretrained(str(weights), dtype=dtype).to(device).eval()
