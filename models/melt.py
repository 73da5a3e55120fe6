"""MELT (Memory-Efficient Looped Transformer, arXiv 2605.07721): Ouro's looped stack with ONE
KV cache per layer, shared by all loops and rewritten in place through a learnable gate, so KV
memory is O(layers x tokens), independent of the loop count.

The paper's method text is not available to us; this follows ../shared/papers/melt-ouro-notes.md.
Equations, for layer l at loop t (t = 1..T) and the tokens of the current chunk, with x_t the
layer's normed attention input (the tensor that also feeds the queries):

    z_t = sigmoid(x_t W_z + b_z + h_{t-1} U_z)          element-wise, W_z, U_z: hidden x hidden
    h_t = z_t * h_{t-1} + (1 - z_t) * x_t               no reset gate, no tanh
    q_t = x_t W_Q,   k_t = h_t W_K,   v_t = h_t W_V     (RoPE on q_t and k_t as in Ouro)
    row(token, l) <- (k_t, v_t)                         the token's single K/V row, overwritten
    o_t = softmax(q_t K^T / sqrt(d)) V                  K, V: earlier tokens' final rows + this
                                                        chunk's rows at loop t (causal)

Residual, MLP, norms and the early-exit gate are Ouro's. After loop T every row holds its
final-loop value, which is what later tokens read.

Choices the notes leave open (config fields, MeltConfig):
  - first_loop_state="input": h_1 = x_1 (z ignored at t = 1); "zeros": h_0 = 0.
  - chunk_size=500 (the paper's training chunk): the sequence is processed in chunks, parallel
    inside a chunk and sequential across chunks, at training and at prefill alike. None = the
    whole input as one chunk. Results depend on the chunking (a chunk's tokens see each other's
    loop-t rows, not their final rows), so compare runs with equal chunk sizes.
  - decode_reads="final": decoding is chunks of one token, reading earlier tokens' final rows;
    "chunk": decoding continues the chunk grid (the open chunk's loop-t rows come from a side
    buffer of at most chunk_size x loops rows per layer, kv_cache.py), so generation computes
    exactly what fixed-chunk training computed.
  - gate="elementwise" (the equations above); "scalar", "mean", "ema", "last" are the paper's
    gate ablation, as we read its names (kv_policy.py).
  - gate init: the notes report none. `from_ouro` copies every Ouro weight and sets W_z = U_z = 0,
    b_z = gate_bias_init (-6, z ~ 0.0025), so h_t ~ x_t: a fresh MELT rewrites each row with the
    current loop's keys/values, i.e. starts as Ouro with last-loop KV reuse at decode (the best
    training-free sharing policy in Ouro's Table 14); phase-1 training then learns the gate.
The gate and the shared-slot policy live in kv_policy.py.
"""

from __future__ import annotations

from .configs import MeltConfig, OuroConfig
from .looped import LoopedForCausalLM, LoopedModel, register_auto_class
from .ouro import OuroForCausalLM


class MeltModel(LoopedModel):
    config_class = MeltConfig


class MeltForCausalLM(LoopedForCausalLM):
    config_class = MeltConfig
    base_model_class = MeltModel

    @classmethod
    def from_ouro(cls, ouro: OuroForCausalLM, **melt_fields) -> "MeltForCausalLM":
        """A MELT model with all of `ouro`'s weights and a freshly initialised gate.
        `melt_fields` sets MeltConfig's own fields (chunk_size, first_loop_state, gate_bias_init,
        decode_reads, gate)."""
        config = melt_config_from(ouro.config, **melt_fields)
        melt = cls(config).to(device=ouro.device, dtype=ouro.dtype)
        missing, unexpected = melt.load_state_dict(ouro.state_dict(), strict=False)
        if unexpected or any("kv_gate" not in key for key in missing):
            raise ValueError(f"Ouro weights do not fit MELT: missing={missing} unexpected={unexpected}")
        return melt


def melt_config_from(ouro_config: OuroConfig, **melt_fields) -> MeltConfig:
    """MeltConfig with every Ouro field copied from `ouro_config`."""
    fields = ouro_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        fields.pop(key, None)
    return MeltConfig(**fields, **melt_fields)


register_auto_class(MeltConfig, MeltForCausalLM)
