"""A preset's static card: sizes and analytic KV costs, printed before anything is measured."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from melt_bench.models import PRESETS, count_parameters, kv_bytes_per_token


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

    def to_dict(self) -> dict:
        return asdict(self)


def preset_cards(dtype: torch.dtype = torch.bfloat16) -> list[ModelCard]:
    cards = []
    for preset in PRESETS.values():
        config = preset.config()
        loops = config.total_ut_steps
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
            )
        )
    return cards
