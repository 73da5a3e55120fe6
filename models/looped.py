"""The looped transformer shared by Ouro and MELT, in plain PyTorch, read top to bottom.

Per token, the whole layer stack runs `loops` times (Ouro's `total_ut_steps`); after every loop
the final norm is applied and its output feeds the next loop. Each decoder layer is an RMSNorm
sandwich around attention and around a SwiGLU MLP:

    x = x + input_layernorm_2(attn(input_layernorm(x)))
    x = x + post_attention_layernorm_2(mlp(post_attention_layernorm(x)))

`model.early_exit_gate` scores each loop's output: lambda_t = sigmoid(gate_t),
p_t = lambda_t * prod_{j<t} (1 - lambda_j), the last loop takes the remaining mass. Logits come
from the last loop (default), a fixed exit step, the first step whose cumulative exit probability
reaches a threshold, or the exit-probability-weighted expectation of the loops' logits.

What happens to keys and values across loops is the KV policy's business (kv_policy.py). Module
and parameter names are those of the official Ouro checkpoints, so their state dicts load as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import chunk_attention_mask, rope_cos_sin
from .configs import MAX_LOOPS, OuroConfig, check_decode_reads
from .decoder_layer import DecoderLayer, RMSNorm
from .exit_rules import EarlyStop, exit_distribution, fill_after_early_stop, official_exit_steps, threshold_exit_steps
from .fused_projections import unfuse
from .kivi_cache import quantized_cache
from .kv_cache import LoopedKVCache, TransitionKVCache, open_chunk_grid
from .kv_policy import KVPolicy, kv_bytes_per_token, kv_policy_for, parse_kv_policy
from .melt_gates import EmaGate, GateProjection
from .packed_cache import check_kv_quant, quant_bits


class LoopedPreTrainedModel(PreTrainedModel):
    config_class = OuroConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def checkpoint_mlp_blocks(self, enable: bool = True) -> None:
        """Recompute every layer's MLP block in backward (what gradient_checkpointing_enable()
        sets up, without depending on that method's name in this transformers version)."""
        for module in self.modules():
            if isinstance(module, DecoderLayer):
                module.gradient_checkpointing = enable
                module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def save_pretrained(self, *args, **kwargs):
        """As transformers', after giving every weight the eager decode engine fused
        (fused_projections.py) storage of its own: safetensors refuses weights that share one."""
        for module in self.modules():
            if getattr(module, "fused", None) is not None:
                unfuse(module.fused)
                module.fused = None
        return super().save_pretrained(*args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        # transformers.initialization skips parameters already loaded from a checkpoint.
        if isinstance(module, GateProjection):
            # MELT gate: W_z = U_z = 0 and b_z = gate_bias_init, so z ~ 0 and h_t ~ x_t: a fresh
            # MELT rewrites each row with the current loop's K/V (Ouro with last-loop KV reuse).
            init.zeros_(module.weight)
            if module.bias is not None:
                init.constant_(module.bias, getattr(self.config, "gate_bias_init", 0.0))
        elif isinstance(module, EmaGate):  # the ema gate's decay logit: starts as last-loop too
            init.constant_(module.logit, getattr(self.config, "gate_bias_init", 0.0))
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


@dataclass
class LoopOutputs:
    """The base model's output: the last loop's normed hidden state, each loop's exit-gate logit
    (batch, seq) and, when asked for, each loop's hidden state."""

    last_hidden_state: torch.Tensor
    gate_logits: list[torch.Tensor]
    hidden_per_loop: list[torch.Tensor] | None
    loops_run: int  # loops actually computed (fewer than asked when early stopping)
    exit_steps: torch.Tensor | None = None  # early stopping: each token's exit loop (0-based)
    attention: dict[tuple[int, int], torch.Tensor] | None = None  # (loop, layer) -> attention output


class LoopedModel(LoopedPreTrainedModel):
    def __init__(self, config: OuroConfig) -> None:
        super().__init__(config)
        self.policy: KVPolicy = kv_policy_for(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            DecoderLayer(config, self.policy.make_gate(config)) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def new_cache(
        self, loops: int | None = None, capacity: int | None = None, batch_size: int | None = None
    ) -> LoopedKVCache:
        """An empty cache laid out for `loops` loops, sized to `capacity` tokens if given; with
        `batch_size` too, every buffer is allocated now, on the model's device and dtype."""
        loops = loops or self.config.total_ut_steps
        packed = self.policy.cache(loops, capacity)  # (a Cache with no HF layers is falsy: test for None)
        if packed is None:
            packed = quantized_cache(self.config, self.policy.num_slots(loops), loops, capacity)
        if packed is not None:  # packed caches grow as they pack: nothing to allocate ahead
            return packed
        cache = LoopedKVCache(self.policy.num_slots(loops), loops, capacity, open_chunk=self.policy.open_chunk)
        if batch_size is not None:
            cache.allocate(batch_size, self.config.num_key_value_heads, self.config.head_dim, self.dtype, self.device)
        return cache

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: LoopedKVCache | None = None,
        loops: int | None = None,
        keep_hidden_per_loop: bool = False,
        early_stop_threshold: float | None = None,
        record_attention: bool = False,
        chunk_starts: Sequence[int] | None = None,
    ) -> LoopOutputs:
        """`early_stop_threshold` stops computing loops once every token's cumulative exit
        probability reaches it (one chunk only: decoding steps, or a prompt within chunk_size).
        `record_attention` returns every (loop, layer)'s attention output (for distillation).
        `chunk_starts` (0 first, increasing) replaces the fixed `chunk_size` split: training can
        then chunk a sequence the way inference will (the prompt, then one token at a time)."""
        loops = loops or self.config.total_ut_steps
        if not 1 <= loops <= MAX_LOOPS:
            raise ValueError(f"loops must lie in 1..{MAX_LOOPS}, got {loops}")
        cache = past_key_values
        if isinstance(cache, LoopedKVCache) and cache.num_slots != self.policy.num_slots(loops):
            raise ValueError(f"cache was laid out for {cache.loops} loops, forward asked for {loops}")
        seq = input_ids.shape[1]
        if seq == 0:
            raise ValueError("input_ids must hold at least one token")
        past = cache.seq_len if cache is not None else 0
        key_padding = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_padding = attention_mask.bool()
        if position_ids is None:
            position_ids = _positions(attention_mask, past, seq, input_ids.device)
        chunks = self.chunk_plan(seq, past, cache, chunk_starts)
        if cache is None and (len(chunks) > 1 or self.policy.computes_in_cache):
            # chunks must see earlier chunks' final rows; when training, through autograd
            training = self.training and torch.is_grad_enabled()
            cache = LoopedKVCache(self.policy.num_slots(loops), loops, functional=True) if training \
                else self.new_cache(loops)
        if early_stop_threshold is not None and not self.policy.early_stop:
            raise ValueError(f"early stopping under KV policy {self.policy.name}: it always computes every loop")
        if early_stop_threshold is not None and len(chunks) > 1:
            raise ValueError(f"early stopping needs the input in one chunk ({seq} tokens > chunk_size {chunks[0][1]})")

        x_all = self.embed_tokens(input_ids)
        found = _Collected(loops, len(self.layers), keep_hidden_per_loop, record_attention)
        last, stop = [], None
        for c0, c1 in chunks:
            stop = EarlyStop(early_stop_threshold, loops) if early_stop_threshold is not None else None
            x = self.run_chunk(x_all[:, c0:c1], position_ids[:, c0:c1], past + c0, key_padding, cache, loops, stop,
                               found)
            last.append(x)
            if cache is not None:
                cache.seq_len = past + c1
        return found.outputs(torch.cat(last, dim=1), stop)

    def chunk_plan(self, seq: int, past: int, cache, chunk_starts: Sequence[int] | None) -> list[tuple[int, int]]:
        """The (start, end) pieces the sequence runs in: `chunk_starts` when given, else MELT's
        fixed chunk_size, else one piece. With decode_reads="chunk" the pieces follow the grid of C
        cache positions from 0, so a piece inside an open chunk reads that chunk's earlier rows of
        its own loop (the cache's side buffer)."""
        grid = open_chunk_grid(cache)
        if chunk_starts is None and grid:
            chunk_starts = [0, *range(grid - past % grid, seq, grid)]
        elif chunk_starts is None:
            chunk_starts = range(0, seq, self.policy.chunk_size or seq)
        elif list(chunk_starts[:1]) != [0] or any(b <= a for a, b in zip(chunk_starts, chunk_starts[1:])) \
                or chunk_starts[-1] >= seq:
            raise ValueError(f"chunk_starts must start at 0 and increase within {seq} tokens, got {list(chunk_starts)}")
        return list(zip(chunk_starts, [*chunk_starts[1:], seq]))

    def run_chunk(
        self, x: torch.Tensor, positions: torch.Tensor, start: int, key_padding: torch.Tensor | None, cache,
        loops: int, stop: EarlyStop | None, found: _Collected,
    ) -> torch.Tensor:
        """Every loop of the layer stack over one piece at cache positions [start, start + len):
        each (loop, layer) writes its rows through the KV policy; returns the piece's output (each
        token's hidden state at its own exit loop when stopping early)."""
        end = start + x.shape[1]
        rope = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        attn = chunk_attention_mask(start, x.shape[1], key_padding, x.device)
        grid = open_chunk_grid(cache)
        kv_states: list[torch.Tensor | None] = [None] * len(self.layers)
        # policies that keep a combination of a token's loops fold each loop's rows in here
        kept = [None] * len(self.layers) if self.policy.reduces_loops and cache is not None else None
        for loop in range(loops):
            # FlashLoop's prompt: at its late loops only the chosen tokens move on
            active = cache.active_tokens(loop) if isinstance(cache, LoopedKVCache) else None
            for i, layer in enumerate(self.layers):
                slot = self.policy.slot(loop, i)
                if isinstance(cache, TransitionKVCache):
                    slot = (loop * len(self.layers) + i, slot)  # (Ouro's per-loop slot, MELT's)
                if grid:
                    cache.restore_open_chunk(loop, slot, start)
                before = x
                x, kv_states[i], attn_out = layer(x, rope, attn, cache, slot, start, kv_states[i], loop)
                if active is not None:
                    x = torch.where(active[None, :, None], x, before)
                if grid:
                    cache.save_open_chunk(loop, slot, start, end)
                if kept is not None:
                    kept[i] = self.policy.accumulate(kept[i], loop, *cache.rows(slot, start, end))
                found.attention_output(loop, i, attn_out)
            x = self.norm(x) if active is None else torch.where(active[None, :, None], self.norm(x), x)
            if isinstance(cache, LoopedKVCache):
                cache.observe_loop_output(loop, x)
            gate = self.early_exit_gate(x).squeeze(-1)
            found.loop_output(loop, gate, x)
            if stop is not None and stop.update(loop, gate, x):
                fill_after_early_stop(self.policy, cache, loop, loops, start, end)
                x = stop.hidden
                break
        if kept is not None:
            for i, acc in enumerate(kept):
                keys, values = self.policy.final(acc, loop + 1)
                dtype = cache.rows(self.policy.slot(0, i), start, end)[0].dtype
                cache.update_slot(self.policy.slot(0, i), keys.to(dtype), values.to(dtype), start)
        return x


class _Collected:
    """What forward returns besides the last hidden state, gathered piece by piece: each loop's
    exit-gate logits and (if asked) hidden states, each (loop, layer)'s attention output."""

    def __init__(self, loops: int, layers: int, keep_hidden: bool, record_attention: bool) -> None:
        self.gates: list[list[torch.Tensor]] = [[] for _ in range(loops)]
        self.hidden = [[] for _ in range(loops)] if keep_hidden else None
        self.attention = {(t, i): [] for t in range(loops) for i in range(layers)} if record_attention else None

    def attention_output(self, loop: int, layer: int, output: torch.Tensor) -> None:
        if self.attention is not None:
            self.attention[(loop, layer)].append(output)

    def loop_output(self, loop: int, gate: torch.Tensor, x: torch.Tensor) -> None:
        self.gates[loop].append(gate)
        if self.hidden is not None:
            self.hidden[loop].append(x)

    def outputs(self, last_hidden: torch.Tensor, stop: EarlyStop | None) -> LoopOutputs:
        ran = [loop for loop, gates in enumerate(self.gates) if gates]
        return LoopOutputs(
            last_hidden_state=last_hidden,
            gate_logits=[torch.cat(self.gates[loop], dim=1) for loop in ran],
            hidden_per_loop=[torch.cat(self.hidden[loop], dim=1) for loop in ran] if self.hidden is not None else None,
            loops_run=len(ran),
            exit_steps=stop.exit_steps if stop is not None else None,
            attention={key: torch.cat(parts, dim=1) for key, parts in self.attention.items() if parts}
            if self.attention is not None else None,
        )


def _positions(attention_mask: torch.Tensor | None, past: int, seq: int, device: torch.device) -> torch.Tensor:
    """RoPE positions: count real tokens (left padding gets position 0), as HF generate() does."""
    if attention_mask is None:
        return torch.arange(past, past + seq, device=device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -seq:]


# transformers 5.24 renamed the output's cache field from past_key_values to cache
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class LoopedCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the exit distribution (batch, seq, loops), for threshold exit
    or early stopping each kept token's exit loop (0-based), and the loops actually computed."""

    exit_pdf: torch.Tensor | None = None
    exit_steps: torch.Tensor | None = None
    loops_run: int | None = None


class LoopedForCausalLM(LoopedPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    @property
    def kv_policy(self) -> KVPolicy:
        """The KV policy the model runs under (Huginn's models have the same property)."""
        return self.model.policy

    def __init__(self, config: OuroConfig) -> None:
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    base_model_class = LoopedModel

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def new_cache(
        self, loops: int | None = None, capacity: int | None = None, batch_size: int | None = None
    ) -> LoopedKVCache:
        return self.model.new_cache(loops, capacity, batch_size)

    def use_kv_policy(self, name: str) -> None:
        """Run these weights under another training-free KV policy ('last-loop', 'mean',
        'modulo:2', ...: kv_policy.py). Only for Ouro-family models: MELT keeps its gated policy,
        whose gate is part of its weights; caches made before the switch no longer fit."""
        canonical = parse_kv_policy(name)
        if not self.model.policy.training_free:
            raise ValueError(f"KV policy {canonical!r} asked of a {self.model.policy.name} model: MELT keeps its "
                             "own gated policy (training-free policies apply to Ouro-family models)")
        policy = kv_policy_for(self.config, canonical)
        if not policy.training_free:
            raise ValueError(f"KV policy {canonical!r} needs MELT's trained gate: load a MELT model instead")
        check_kv_quant(self.config.kv_quant, canonical)
        self.config.kv_policy = canonical
        self.model.policy = policy

    def use_kv_quant(self, mode: str | None) -> None:
        """Keep cached rows packed to INT8 or INT4 (KIVI's layout, the newest rows at full precision:
        packed_cache.py), or at full precision ("none" / None); any KV policy, MELT included.
        Caches made before the switch keep their own kind."""
        check_kv_quant(mode, self.model.policy.name, getattr(self.config, "decode_reads", None))
        self.config.kv_quant = None if quant_bits(mode) is None else mode

    def use_decode_reads(self, mode: str) -> None:
        """What MELT's decoded tokens read: "final" (earlier tokens' final rows) or "chunk" (they
        continue the chunk grid, reading the open chunk's same-loop rows; see kv_cache.py). Caches
        made before the switch no longer fit."""
        if not hasattr(self.config, "decode_reads"):
            raise ValueError(f"decode_reads={mode!r} asked of a {self.model.policy.name} model: it is MELT's choice")
        check_decode_reads(mode, self.config.chunk_size)
        check_kv_quant(self.config.kv_quant, self.model.policy.name, mode)
        self.config.decode_reads = mode
        self.model.policy = kv_policy_for(self.config)

    def kv_bytes_per_token(self, loops: int | None = None, dtype: torch.dtype | None = None) -> int:
        """Analytic KV-cache bytes per token at `loops` loops in `dtype` (default: the model's)."""
        return kv_bytes_per_token(self.config, loops or self.config.total_ut_steps, dtype or self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: LoopedKVCache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        loops: int | None = None,
        exit_at_step: int | None = None,
        exit_threshold: float | None = None,
        use_weighted_exit: bool = False,
        early_stop_threshold: float | None = None,
        chunk_starts: Sequence[int] | None = None,
        official_exit: bool = False,
        cache: LoopedKVCache | None = None,
        **kwargs,
    ) -> LoopedCausalLMOutput:
        """Logits from the last loop unless `exit_at_step` (0-based), `exit_threshold` or
        `use_weighted_exit` asks otherwise (the official Ouro keyword names and precedence); all
        loops run for those. `early_stop_threshold` really stops computing loops once every token
        has exited (see EarlyStop). `loops` overrides config.total_ut_steps for this call (1..64);
        `chunk_starts` overrides the chunk split (see LoopedModel.forward). `official_exit` applies
        the released code's default rule (config.early_exit_threshold, in the model's dtype; see
        official_exit_steps) and nothing else. `cache` is `past_key_values` under the name
        transformers' generate() passes from 5.24 on."""
        if input_ids is None:
            raise ValueError("input_ids is required")
        if cache is not None:
            if past_key_values is not None:
                raise ValueError("pass the KV cache as past_key_values or as cache, not both")
            past_key_values = cache
        loops = loops or self.config.total_ut_steps
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if exit_at_step is None:
            exit_at_step = self.config.early_exit_step
        if exit_at_step is not None and not 0 <= exit_at_step < loops:
            raise ValueError(f"exit_at_step must lie in 0..{loops - 1}, got {exit_at_step}")
        if use_cache and not isinstance(past_key_values, (LoopedKVCache, TransitionKVCache)):
            # generate() hands us an empty DynamicCache; ours replaces it (never a filled one).
            if past_key_values is not None and past_key_values.get_seq_length() > 0:
                raise ValueError("past_key_values must be a LoopedKVCache (see model.new_cache())")
            past_key_values = self.new_cache(loops)
        elif not use_cache:
            past_key_values = None

        post_hoc = exit_at_step is not None or exit_threshold is not None or use_weighted_exit
        if official_exit and (post_hoc or early_stop_threshold is not None):
            raise ValueError("official_exit is the released code's own rule: combine it with no other exit mode")
        needs_all_loops = post_hoc or official_exit
        if early_stop_threshold is not None and needs_all_loops:
            raise ValueError("early_stop_threshold cannot be combined with the post-hoc exit modes")
        out = self.model(
            input_ids, attention_mask, position_ids, past_key_values, loops,
            keep_hidden_per_loop=needs_all_loops, early_stop_threshold=early_stop_threshold, chunk_starts=chunk_starts,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        pdf = exit_distribution(out.gate_logits)[:, keep] if early_stop_threshold is None else None
        logits, exit_steps = self.exit_logits(out, keep, pdf, exit_at_step, exit_threshold, use_weighted_exit,
                                              official_exit)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return LoopedCausalLMOutput(
            loss=loss, logits=logits, exit_pdf=pdf, exit_steps=exit_steps, loops_run=out.loops_run,
            **{_CACHE_FIELD: past_key_values},
        )


    def exit_logits(
        self, out: LoopOutputs, keep: slice | torch.Tensor, pdf: torch.Tensor | None, exit_at_step: int | None,
        exit_threshold: float | None, use_weighted_exit: bool, official_exit: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the kept positions under the exit mode asked for (the official keywords'
        precedence: a fixed step, a threshold or the official rule, the weighted expectation, else
        the last loop computed), and each token's exit loop where a rule picked one."""
        exit_steps = out.exit_steps[:, keep] if out.exit_steps is not None else None
        if exit_at_step is not None:
            return self.lm_head(out.hidden_per_loop[exit_at_step][:, keep]), exit_steps
        if exit_threshold is not None or official_exit:
            if official_exit:
                threshold = 1.0 if self.config.early_exit_threshold is None else self.config.early_exit_threshold
                exit_steps = official_exit_steps([g[:, keep] for g in out.gate_logits], threshold)
            else:
                exit_steps = threshold_exit_steps(pdf, exit_threshold)
            stacked = torch.stack([h[:, keep] for h in out.hidden_per_loop], dim=2)
            index = exit_steps[..., None, None].expand(-1, -1, 1, stacked.shape[-1])
            return self.lm_head(stacked.gather(2, index).squeeze(2)), exit_steps
        if use_weighted_exit:
            return sum(self.lm_head(h[:, keep]) * pdf[..., t, None].to(h.dtype)
                       for t, h in enumerate(out.hidden_per_loop)), exit_steps
        return self.lm_head(out.last_hidden_state[:, keep]), exit_steps


def register_auto_class(config_class: type, model_class: type) -> None:
    """Let AutoConfig / AutoModelForCausalLM open checkpoints of `config_class.model_type` with our
    class, so an official Ouro directory loads without remote code. A transformers release that
    ships its own "ouro" keeps it (registration then raises ValueError and we leave it be)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(config_class.model_type, config_class)
        AutoModelForCausalLM.register(config_class, model_class)
    except ValueError:
        pass

