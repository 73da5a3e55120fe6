"""A preset's static card: sizes and analytic KV costs, printed before anything is measured."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from melt_bench.models import PRESETS, count_parameters, kv_bytes_per_token, kv_policy_for
from melt_bench.models.huginn_config import HuginnConfig


@dataclass
class ModelCard:
    name: str
    family: str
    description: str
    parameters: int
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    loops: int
    kv_policy: str
    dtype: str
    kv_bytes_per_token_per_loop: int  # what one more loop adds per token
    kv_bytes_per_token_at_loops: int  # at the trained loop count
    # at the trained loop count, per KV policy the preset can run (Ouro family: every
    # training-free one; MELT: its own)
    kv_bytes_per_token_by_policy: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


# The policies `models` lists, with the slot counts the CLI's examples use, and the KV
# quantisations (--kv-quant) listed beside a policy: "POLICY + int4".
LISTED_POLICIES = ("per-loop", "last-loop", "mean", "first-loop", "modulo:2", "first-then-shared:2", "flashloop",
                   "per-loop + int8", "per-loop + int4", "per-loop + int4:flashloop-tail", "last-loop + int4")
MELT_LISTED = ("", " + int8", " + int4")
HUGINN_LISTED = ("full", "compress-s4", "compress-s8", "compress-r4", "compress-r8", "compress-anchor", "latest-m4")


def trained_loops(config) -> int:
    """The loop count a preset was trained for: Ouro's total_ut_steps, Huginn's mean_recurrence."""
    return config.mean_recurrence if isinstance(config, HuginnConfig) else config.total_ut_steps


def policy_kv_bytes(config, loops: int, dtype: torch.dtype) -> dict[str, int]:
    """KV bytes per token at `loops` under each policy (and KV quantisation) the config's family
    can run; packed caches (flashloop, int8, int4) at STATED_TOKENS tokens (kv_policy.py)."""
    def bytes_of(listed: str, policy: str | None) -> int:
        quant = listed.partition(" + ")[2] or None
        return kv_bytes_per_token(config, loops, dtype, policy, kv_quant=quant)

    if isinstance(config, HuginnConfig):  # its own cache lookup strategies
        return {listed: bytes_of("", listed) for listed in HUGINN_LISTED}
    if not kv_policy_for(config).training_free:  # MELT: its own gated policy only, quantised or not
        return {f"{config.kv_policy}{quant}": bytes_of(quant, None) for quant in MELT_LISTED}
    return {listed: bytes_of(listed, listed.partition(" + ")[0]) for listed in LISTED_POLICIES}


def preset_cards(dtype: torch.dtype = torch.bfloat16) -> list[ModelCard]:
    cards = []
    for preset in PRESETS.values():
        config = preset.config()
        loops = trained_loops(config)
        cards.append(
            ModelCard(
                name=preset.name, family=preset.family, description=preset.description,
                parameters=count_parameters(preset), layers=config.num_hidden_layers,
                hidden_size=config.hidden_size, heads=config.num_attention_heads,
                kv_heads=config.num_key_value_heads, head_dim=config.head_dim, loops=loops,
                kv_policy=config.kv_policy, dtype=str(dtype).removeprefix("torch."),
                kv_bytes_per_token_per_loop=kv_bytes_per_token(config, loops + 1, dtype)
                - kv_bytes_per_token(config, loops, dtype),
                kv_bytes_per_token_at_loops=kv_bytes_per_token(config, loops, dtype),
                kv_bytes_per_token_by_policy=policy_kv_bytes(config, loops, dtype),
            )
        )
    return cards


@dataclass
class CostCard:
    """Predicted costs of one preset at one loop count, before anything runs."""

    name: str
    loops: int
    seq_len: int
    batch_size: int
    dtype: str
    weights_bytes: int
    kv_cache_bytes: int  # the prompt plus one generated token
    activation_peak_bytes: int  # prefill of the prompt in the model's chunks (Ouro: one chunk)
    predicted_peak_bytes: int
    decode_bytes_per_token: float  # bytes one decode step reads
    roofline_decode_ms_per_token: float  # those bytes at the measured bandwidth

    def to_dict(self) -> dict:
        return asdict(self)


def cost_cards(names: list[str], loops: list[int], seq_len: int, batch_size: int, dtype: torch.dtype,
               bandwidth_bytes_per_s: float) -> list[CostCard]:
    """Analytic weights, KV, activation peak and roofline decode time per (preset, loop count)."""
    from melt_bench.models import cost_model, get_preset, predict_kv_cache_bytes

    cards = []
    for name in names:
        config = get_preset(name).config()
        chunk = min(getattr(config, "chunk_size", None) or seq_len, seq_len)
        for loop_count in loops:
            weights = cost_model.weights_bytes(config, dtype)
            kv = predict_kv_cache_bytes(config, loop_count, batch_size, seq_len + 1, dtype)
            activation = cost_model.activation_peak_bytes(config, batch_size, chunk, dtype)
            read = cost_model.decode_bytes_per_token(config, loop_count, batch_size, seq_len + 1, dtype)
            cards.append(CostCard(name, loop_count, seq_len, batch_size, str(dtype).removeprefix("torch."), weights,
                                  kv, activation, weights + kv + activation, read,
                                  read / bandwidth_bytes_per_s * 1000))
    return cards
