"""Huginn-0125 (recurrent depth) in plain PyTorch: the official checkpoint's modules, parameter
names and numerics (seal-rg/recurrent-pretraining, recpre/raven_modeling_minimal.py), with
melt-bench's preallocated cache.

    e = prelude(wte(ids) * sqrt(E))                      2 sandwich blocks
    s_0 = random state (truncated normal) or given
    s_t = core(adapter([s_{t-1}, e]))                    4 sandwich blocks, t = 1..num_steps
    logits = lm_head(ln_f(coda(ln_f(s_T))))              2 sandwich blocks; ln_f twice, as the official code

A sandwich block normalises both its sublayer inputs and its residual sums:
x = norm_2(x + attn(norm_1(x))); x = norm_4(x + mlp(norm_3(x))). Attention has fused q/k/v
(`Wqkv`), a learned bias on q and k before RoPE (`qk_bias`), and RoPE over interleaved pairs of
dimensions. Each layer's keys and values go to the slot the KV policy (huginn_kv.py) gives its
layer index."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import chunk_attention_mask, one_query_attention
from .huginn_config import HuginnConfig
from .huginn_kv import HuginnKVPolicy, parse_huginn_kv_policy
from .kv_cache import LoopedKVCache
from .looped import _CACHE_FIELD
from .names import MAX_LOOPS


def freqs_cis_table(head_dim: int, positions: int, theta: float) -> torch.Tensor:
    """cos and sin of every position and frequency, (1, positions, 1, head_dim / 2, 2) in float32:
    the official `freqs_cis` buffer."""
    inv_freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freqs)
    return torch.stack([freqs.cos()[None, :, None], freqs.sin()[None, :, None]], dim=4)


def apply_rope_pairs(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each pair of dimensions (2i, 2i + 1) of q and k (batch, tokens, heads, head_dim) in
    float32; `freqs` is (1, tokens, 1, head_dim / 2, 2)."""
    pairs = torch.cat([q, k], dim=2).unflatten(-1, (-1, 2)).float()
    cos, sin = freqs[..., 0], freqs[..., 1]
    rotated = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return torch.split(rotated.flatten(3).type_as(q), q.shape[2], dim=2)


class HuginnRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As the official code: normalise in float32, cast back, then scale.
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class HuginnAttention(nn.Module):
    def __init__(self, config: HuginnConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.Wqkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        if config.qk_bias:
            self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.n_heads, self.head_dim))
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def project(self, x: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values (batch, heads, tokens, head_dim), biased and rotated."""
        bsz, seq, width = x.shape
        q, k, v = (t.view(bsz, seq, self.n_heads, self.head_dim) for t in self.Wqkv(x).split(width, dim=2))
        if hasattr(self, "qk_bias"):
            q, k = (q + self.qk_bias[0]).to(q.dtype), (k + self.qk_bias[1]).to(q.dtype)
        q, k = apply_rope_pairs(q, k, freqs)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, cache: LoopedKVCache | None, slot: int, start: int,
                key_padding: torch.Tensor | None) -> torch.Tensor:
        bsz, seq, width = x.shape
        q, k, v = self.project(x, freqs)
        if cache is not None:
            k, v = cache.update_slot(slot, k, v, start)
        # The official code's three cases (causal, bottom-right causal, one query: no mask).
        mask = chunk_attention_mask(start, seq, key_padding, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal)
        return self.proj(y.transpose(1, 2).reshape(bsz, seq, width))

    def decode(self, x: torch.Tensor, freqs: torch.Tensor, cache: LoopedKVCache, slot: int, input_pos: torch.Tensor,
               mask: torch.Tensor, one_query: bool) -> torch.Tensor:
        """One token per sequence at `input_pos` (huginn_decode.py): its rows written in place,
        attention over the whole preallocated capacity where `mask` is True (static shapes);
        `one_query`: written out (`one_query_attention`, for the compiled CPU step), else SDPA."""
        bsz, seq, width = x.shape
        q, k, v = self.project(x, freqs)
        cache.write_at(slot, input_pos, k, v)
        keys, values = cache.keys[slot], cache.values[slot]
        if one_query:
            return self.proj(one_query_attention(q, keys, values, mask))
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(bsz, seq, width))


class GatedMLP(nn.Module):
    def __init__(self, config: HuginnConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)  # [gate | up]
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class SandwichBlock(nn.Module):
    def __init__(self, config: HuginnConfig) -> None:
        super().__init__()
        self.norm_1 = HuginnRMSNorm(config.n_embd, config.norm_eps)
        self.attn = HuginnAttention(config)
        self.norm_2 = HuginnRMSNorm(config.n_embd, config.norm_eps)
        self.mlp = GatedMLP(config)
        self.norm_3 = HuginnRMSNorm(config.n_embd, config.norm_eps)
        self.norm_4 = HuginnRMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x, freqs, cache, slot, start, key_padding):
        return self.after_attention(x, self.attn(self.norm_1(x), freqs, cache, slot, start, key_padding))

    def decode(self, x, freqs, cache, slot, input_pos, mask, one_query):
        """forward for one token per sequence over a preallocated cache (HuginnAttention.decode)."""
        return self.after_attention(x, self.attn.decode(self.norm_1(x), freqs, cache, slot, input_pos, mask, one_query))

    def after_attention(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = self.norm_2(attended + x)
        return self.norm_4(self.mlp(self.norm_3(x)) + x)


@dataclass
class HuginnOutput(CausalLMOutputWithPast):
    latent_states: torch.Tensor | None = None  # ln_f of the last recurrent state, as the official output's
    loops_run: int | None = None  # recurrence steps run
    exit_steps: torch.Tensor | None = None  # (no per-token exit: every token runs every step)


class HuginnForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HuginnConfig
    base_model_prefix = "model"
    _no_split_modules = ["SandwichBlock"]
    _supports_sdpa = True
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: HuginnConfig) -> None:
        super().__init__(config)
        make = lambda n: nn.ModuleList(SandwichBlock(config) for _ in range(n))  # noqa: E731
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            prelude=make(config.n_layers_in_prelude),
            adapter=nn.Linear(2 * config.n_embd, config.n_embd, bias=config.bias),
            core_block=make(config.n_layers_in_recurrent_block),
            coda=make(config.n_layers_in_coda),
            ln_f=HuginnRMSNorm(config.n_embd, config.norm_eps),  # used twice, as the official code
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Persistent, as the official buffer: released checkpoints carry it.
        self.register_buffer("freqs_cis", freqs_cis_table(config.head_dim, config.block_size, config.rope_base))
        self.policy: HuginnKVPolicy = self._policy(config.kv_policy)
        self.post_init()

    def _policy(self, name: str) -> HuginnKVPolicy:
        c = self.config
        return parse_huginn_kv_policy(name, c.n_layers_in_prelude, c.n_layers_in_recurrent_block, c.n_layers_in_coda)

    @property
    def kv_policy(self) -> HuginnKVPolicy:
        return self.policy

    def use_kv_policy(self, name: str) -> None:
        """Run under another of Huginn's cache lookup strategies (huginn_kv.py)."""
        self.policy = self._policy(name)
        self.config.kv_policy = self.policy.name

    def _init_weights(self, module: nn.Module) -> None:
        # The official init ("takase"): truncated normals at 3 std; only what random-weight
        # presets need (transformers skips parameters loaded from a checkpoint).
        std = self.config.init_std
        out_std = std / (2 * self.config.effective_expected_depth) ** 0.5
        if isinstance(module, HuginnRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, GatedMLP):
            if not getattr(module.fc.weight, "_is_hf_initialized", False):  # (a slice would not say it)
                half = self.config.intermediate_size
                with torch.no_grad():
                    nn.init.trunc_normal_(module.fc.weight[:half], std=std, a=-3 * std, b=3 * std)
                    nn.init.trunc_normal_(module.fc.weight[half:], std=out_std, a=-3 * out_std, b=3 * out_std)
            init.trunc_normal_(module.proj.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
        elif isinstance(module, HuginnAttention):
            init.trunc_normal_(module.Wqkv.weight, std=std, a=-3 * std, b=3 * std)
            init.trunc_normal_(module.proj.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
            if hasattr(module, "qk_bias"):
                init.zeros_(module.qk_bias)
        elif isinstance(module, nn.Embedding) or module is self.transformer["adapter"] or module is self.lm_head:
            init.trunc_normal_(module.weight, std=std, a=-3 * std, b=3 * std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def new_cache(self, steps: int | None = None, capacity: int | None = None, batch_size: int | None = None
                  ) -> LoopedKVCache:
        """An empty cache laid out for `steps` recurrence steps under the model's KV policy, sized
        to `capacity` tokens if given; with `batch_size` too, allocated now."""
        steps = steps or self.config.mean_recurrence
        cache = LoopedKVCache(self.policy.num_slots(steps), steps, capacity)
        if batch_size is not None:
            cache.allocate(batch_size, self.config.n_heads, self.config.head_dim, self.dtype, self.device)
        return cache

    def initialize_state(self, embeds: torch.Tensor, scale: float = 1.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """The official random state: a truncated normal (std sqrt(2 / 5E) x scale, cut at 3 std)
        times sqrt(E), in the embeddings' dtype. It draws from `generator` (or the global RNG)
        exactly as the official code draws from the global one (a normal, then the truncated
        normal over it), so a seed gives the official state."""
        x = torch.randn(embeds.shape, dtype=embeds.dtype, device=embeds.device, generator=generator)
        std = self.config.init_std * scale
        if std <= 0:
            return x.zero_()
        with torch.no_grad():
            nn.init.trunc_normal_(x, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        return x * self.config.embed_scale

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: LoopedKVCache | None = None,
        num_steps: int | tuple[int, int] | None = None,
        input_states: torch.Tensor | None = None,
        init_scale: float = 1.0,
        generator: torch.Generator | None = None,
        logits_to_keep: int = 0,
        loops: int | None = None,
        use_cache: bool | None = None,
        chunk_starts: list[int] | None = None,
        cache: LoopedKVCache | None = None,
        **kwargs,
    ) -> HuginnOutput:
        """`num_steps` (or `loops`): recurrence steps, an int or the official (no-grad, with-grad)
        pair; default the config's mean_recurrence. `input_states`: the initial state (else
        random: `init_scale`, `generator`; init_scale=0 gives zeros). `attention_mask` masks
        padded keys (the official forward ignores it: the same without padding). `chunk_starts`
        (0 first, increasing) prefills the prompt in pieces through the cache. `cache`:
        `past_key_values` under the name transformers' generate() passes from 5.24 on."""
        if cache is not None:
            past_key_values = cache
        exits = {k: v for k, v in kwargs.items() if k.startswith(("early_stop", "exit_")) and v is not None}
        if exits:
            raise ValueError(f"{', '.join(exits)}: Huginn's adaptive exit is not built; it runs every step")
        if chunk_starts is not None and len(chunk_starts) > 1:
            return self._forward_in_pieces(input_ids, list(chunk_starts), past_key_values, num_steps or loops,
                                           input_states, init_scale, generator, logits_to_keep, attention_mask)
        if num_steps is None:
            num_steps = loops if loops is not None else self.config.mean_recurrence
        steps_no_grad, steps_grad = self._steps(num_steps)
        steps = steps_no_grad + steps_grad
        cache = past_key_values
        if cache is not None and not isinstance(cache, LoopedKVCache):
            # generate() hands us an empty DynamicCache; ours replaces it (never a filled one)
            if cache.get_seq_length() > 0:
                raise ValueError("past_key_values must be a LoopedKVCache (see model.new_cache())")
            cache = self.new_cache(steps)
        if isinstance(cache, LoopedKVCache) and cache.num_slots != self.policy.num_slots(steps):
            raise ValueError(f"cache was laid out for {cache.loops} steps, forward asked for {steps}")
        start = cache.seq_len if cache is not None else 0
        seq = input_ids.shape[1]
        positions = position_ids.reshape(-1)[-seq:] if position_ids is not None else \
            torch.arange(start, start + seq, device=input_ids.device)
        if start + seq > self.config.block_size:
            raise ValueError(f"positions up to {start + seq} are past the {self.config.block_size}-position RoPE "
                             "table (block_size)")
        freqs = self.freqs_cis[:, positions]
        key_padding = attention_mask.bool() if attention_mask is not None and not bool(attention_mask.all()) else None

        def layer(block, x, slot):
            return block(x, freqs, cache, slot, start, key_padding)

        def initial_state(e):
            return input_states.clone() if input_states is not None else self.initialize_state(e, init_scale, generator)

        latent, x = self.run_stack(input_ids, steps, initial_state, layer, steps_no_grad)
        if cache is not None:
            cache.seq_len = start + seq
        logits = self.lm_head(x[:, -logits_to_keep:]).float()
        return HuginnOutput(logits=logits, latent_states=latent, loops_run=steps, **{_CACHE_FIELD: cache})

    def run_stack(self, input_ids: torch.Tensor, steps: int, initial_state: Callable[[torch.Tensor], torch.Tensor],
                  layer: Callable[[SandwichBlock, torch.Tensor, int], torch.Tensor], steps_no_grad: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prelude, `steps` recurrence steps, coda: (latent = ln_f of the last state, the coda's
        normed output). `initial_state(e)` gives s_0 from the prelude's output e; `layer(block, x,
        slot)` runs one block with its KV slot (forward: over a growing or sliced cache; the
        decode step: at a tensor position over the preallocated one). The first `steps_no_grad`
        steps run without gradients."""
        t, slot = self.transformer, self.policy.slot

        def run(blocks, x, first_index, stride=1):
            for i, block in enumerate(blocks):
                x = layer(block, x, slot(first_index + stride * i, steps))
            return x

        e = run(t.prelude, t.wte(input_ids) * self.config.embed_scale, 0)
        x = initial_state(e)
        for step in range(steps):
            with torch.set_grad_enabled(torch.is_grad_enabled() and step >= steps_no_grad):
                x = run(t.core_block, t.adapter(torch.cat([x, e], dim=-1)), len(t.prelude) + len(t.core_block) * step)
        latent = t.ln_f(x)
        return latent, t.ln_f(run(t.coda, latent, -1, stride=-1))

    def _forward_in_pieces(self, input_ids, starts, cache, num_steps, input_states, init_scale, generator,
                           logits_to_keep, attention_mask) -> HuginnOutput:
        seq = input_ids.shape[1]
        if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= seq:
            raise ValueError(f"chunk_starts must start at 0 and increase within {seq} tokens, got {starts}")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("a padded batch is prefilled in one piece")
        cache = cache if cache is not None else self.new_cache(num_steps)
        if not 0 < logits_to_keep <= seq - starts[-1]:
            raise ValueError("a prompt in pieces returns logits of its last piece only: pass logits_to_keep "
                             f"within its {seq - starts[-1]} tokens")
        pieces, bounds = [], list(zip(starts, [*starts[1:], seq]))
        for n, (a, b) in enumerate(bounds):
            state = input_states[:, a:b] if input_states is not None else None
            keep = logits_to_keep if n == len(bounds) - 1 else 1  # earlier pieces: no vocabulary-wide logits
            pieces.append(self(input_ids[:, a:b], past_key_values=cache, num_steps=num_steps, input_states=state,
                               init_scale=init_scale, generator=generator, logits_to_keep=keep))
        latent = torch.cat([p.latent_states for p in pieces], dim=1)
        return HuginnOutput(logits=pieces[-1].logits, latent_states=latent, loops_run=pieces[-1].loops_run,
                            **{_CACHE_FIELD: cache})

    @staticmethod
    def _steps(num_steps) -> tuple[int, int]:
        """(no-grad steps, steps with gradients): an int runs every step without gradients, as
        the official forward does."""
        pair = (num_steps, 0) if isinstance(num_steps, int) else tuple(int(n) for n in num_steps)
        if len(pair) != 2 or min(pair) < 0 or not 1 <= sum(pair) <= MAX_LOOPS:
            raise ValueError(f"num_steps must be 1..{MAX_LOOPS} steps (or a (no-grad, grad) pair), got {num_steps!r}")
        return pair
