"""Loading a preset's model (random weights or a checkpoint), and counting its parameters. The
presets themselves (names and configs) are in preset_table.py, which imports no torch."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PreTrainedConfig

from .huginn import HuginnForCausalLM
from .looped import LoopedForCausalLM
from .melt import MeltForCausalLM
from .ouro import OuroForCausalLM
from .preset_table import ALIASES, PRESETS, Preset, UnknownPresetError, get_preset  # noqa: F401  (re-exported)


def model_class(family: str) -> type[LoopedForCausalLM | HuginnForCausalLM]:
    return {"melt": MeltForCausalLM, "huginn": HuginnForCausalLM}.get(family, OuroForCausalLM)


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
) -> LoopedForCausalLM | HuginnForCausalLM:
    """The preset's model: random weights, or `weights` (a local directory or hub id) loaded with
    `from_pretrained`. A MELT preset given Ouro weights is built with `MeltForCausalLM.from_ouro`.
    `kv_policy` runs an Ouro-family model under a training-free KV policy (kv_policy.py), a
    Huginn model under one of its cache lookup strategies (huginn_kv.py);
    `decode_reads` sets what a MELT model's decoded tokens read ("final" or "chunk"); `kv_quant`
    ("int8" / "int4") packs cached rows (packed_cache.py)."""
    model = _load(name, weights, dtype, device)
    if isinstance(model, HuginnForCausalLM) and (decode_reads is not None or kv_quant is not None):
        raise ValueError(f"{name}: decode_reads and kv_quant apply to Ouro-family models, not Huginn's")
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
    if model_type != cls.config_class.model_type:
        raise ValueError(f"{weights} holds a {model_type!r} model, not {cls.config_class.model_type!r}")
    return cls.from_pretrained(str(weights), dtype=dtype).to(device).eval()
