"""Configs for the looped models: `OuroConfig` (HF field names of the released Ouro checkpoints)
and `MeltConfig`, which adds MELT's few fields on top of the same looped stack."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from .names import DECODE_READS, GATES, MAX_LOOPS  # noqa: F401  (MAX_LOOPS: re-exported)


def check_decode_reads(mode: str, chunk_size: int | None) -> None:
    """ValueError unless `mode` is a decode_reads mode this chunking allows."""
    if mode not in DECODE_READS:
        raise ValueError(f"decode_reads must be one of {', '.join(DECODE_READS)}, got {mode!r}")
    if mode == "chunk" and chunk_size is None:
        raise ValueError("decode_reads='chunk' continues the chunk grid: it needs a chunk_size")


class OuroConfig(PreTrainedConfig):
    """Ouro / LoopLM config; field names and defaults follow ByteDance/Ouro-1.4B's config.json."""

    model_type = "ouro"
    kv_policy = "per-loop"  # one KV cache per (loop, layer); a training-free policy may be set: kv_policy.py
    kv_quant = None  # "int8" / "int4": rows packed KIVI-style once final (packed_cache.py); set per model

    def __init__(
        self,
        vocab_size: int = 49152,
        hidden_size: int = 2048,
        intermediate_size: int = 5632,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 65536,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1_000_000.0,
        attention_dropout: float = 0.0,
        tie_word_embeddings: bool = False,
        total_ut_steps: int = 4,
        early_exit_threshold: float | None = 1.0,
        early_exit_step: int | None = None,
        use_cache: bool = True,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 0,
        pad_token_id: int | None = 0,
        **kwargs: Any,
    ) -> None:
        # The released configs carry Qwen2-style fields we do not implement; refuse the ones that
        # would change the numerics instead of silently ignoring them.
        rope_scaling = kwargs.pop("rope_scaling", None)
        if rope_scaling is not None:
            raise ValueError(f"rope_scaling={rope_scaling!r} is not supported by melt-bench's Ouro")
        if kwargs.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported by melt-bench's Ouro")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r}: only 'silu' (SwiGLU) is supported")
        if not 1 <= total_ut_steps <= MAX_LOOPS:
            raise ValueError(f"total_ut_steps must lie in 1..{MAX_LOOPS}, got {total_ut_steps}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.attention_dropout = attention_dropout
        self.total_ut_steps = total_ut_steps
        self.early_exit_threshold = early_exit_threshold
        self.early_exit_step = early_exit_step
        self.use_cache = use_cache
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class MeltConfig(OuroConfig):
    """MELT config: Ouro's fields plus the gated shared KV cache's choices (see melt.py)."""

    model_type = "melt"
    kv_policy = "shared-gated"  # one KV cache per layer, shared by all loops

    def __init__(
        self,
        chunk_size: int | None = 500,
        first_loop_state: str = "input",
        gate_bias_init: float = -6.0,
        decode_reads: str = "final",
        gate: str = "elementwise",
        **kwargs: Any,
    ) -> None:
        if first_loop_state not in ("input", "zeros"):
            raise ValueError(f"first_loop_state must be 'input' or 'zeros', got {first_loop_state!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        check_decode_reads(decode_reads, chunk_size)
        if gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, got {gate!r}")
        self.chunk_size = chunk_size
        # "final": a decoded token reads earlier tokens' final rows; "chunk": it continues the
        # chunk grid, reading its open chunk's same-loop rows (kept in a bounded side buffer)
        self.decode_reads = decode_reads
        self.gate = gate  # how a loop's state combines with the token's earlier loops (kv_policy.py)
        self.first_loop_state = first_loop_state
        self.gate_bias_init = gate_bias_init
        super().__init__(**kwargs)
