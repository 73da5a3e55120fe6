"""A static-shape decode step for the looped models, after gpt-fast's `decode_one_token`.

`decode_one_token` computes one whole decode step (embedding, every loop and layer, the final
norm, the lm head and the greedy pick) over a preallocated cache whose shapes never change: the
position is a tensor, cache rows are written in place through the cache's static-shape writes
(`write_at`, `index_copy_` at a tensor position), and attention reads the whole capacity with a
mask of the positions written so far. Called as it is, it is the eager engine;
through `torch.compile` (CUDA graphs on CUDA, `mode="reduce-overhead"`) it is the compiled
engine: the same code either way, so one graph is captured per (batch, capacity, loops).

Early stopping cannot be one graph (the number of loops depends on the gate), so it runs
`run_loop`, one graph per loop, and checks the exit gate on the host between loops.

The KV policy decides the slot each (loop, layer) writes, as in `LoopedModel.forward`, so Ouro
and MELT (its gate inside the graph) share this code; the tests check that its logits equal the
model's own forward. A Huginn model (recurrent depth) runs its own step, huginn_decode.py, through
the same engine: the same cache, positions, compilation and continuous batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .attention import Attention, AttentionMask, rope_table
from .decoder_layer import MLP
from .exit_rules import EarlyStop, fill_after_early_stop
from .fused_projections import fuse_linears, unfuse
from .huginn import HuginnForCausalLM
from .huginn_decode import huginn_decode_one_token, huginn_rope_table
from .kv_cache import LoopedKVCache
from .looped import LoopedForCausalLM
from .names import STEP_ENGINES


def run_loop(
    model: LoopedForCausalLM, x: torch.Tensor, input_pos: torch.Tensor, cache: LoopedKVCache,
    kv_states: list[torch.Tensor | None], loop: int, rope: tuple[torch.Tensor, torch.Tensor], kept: list | None = None,
    one_query_attention: bool = False, filled: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor, list | None]:
    """One loop of the layer stack for the token at `input_pos` (a 1-element tensor, or one
    position per sequence): returns the normed output, each layer's KV state (MELT's h, None for
    Ouro), the exit-gate logit and, for policies that keep a combination of the loops' rows, each
    layer's running combination. Rows
    go into `cache` through its static-shape writes (write_at; MELT with decode_reads="chunk":
    swap_open_chunk_at, its open-chunk buffers). `one_query_attention`: attention written out
    (`Attention.attend_one_query`), for the compiled CPU step. `rope`: the engine's `rope_table`.
    `filled` (the eager engine, one position for the batch): attention reads the rows written so
    far, rows [0, filled), without a mask, instead of the whole capacity under one."""
    base = model.model
    capacity = cache.keys[0].shape[2]
    # Rows past the current position hold zeros or an earlier run's rows: masked out. One
    # position for the batch, or one per sequence (continuous batching): (1 or batch, 1, 1, capacity).
    positions = input_pos[:, None]
    if filled is None:
        attn = AttentionMask((torch.arange(capacity, device=x.device)[None] <= positions)[:, None, None], False)
    else:
        attn = AttentionMask(None, False)
    rope = rope[0][positions], rope[1][positions]  # (1 or batch, 1, head_dim)
    states: list[torch.Tensor | None] = []
    folded = [] if base.policy.reduces_loops else None
    if cache.open_chunk:
        window, offset = cache.open_chunk_window(input_pos)
    for i, layer in enumerate(base.layers):
        slot = base.policy.slot(loop, i)
        q, k, v, kv_in = layer.self_attn.project(layer.input_layernorm(x), rope, kv_states[i], loop)
        if cache.open_chunk:  # the open chunk's earlier tokens read as they did at this loop
            cache.swap_open_chunk_at(loop, slot, window, offset, k, v)
        cache.write_at(slot, input_pos, k, v)
        attend = layer.self_attn.attend_one_query if one_query_attention else layer.self_attn.attend
        keys, values = cache.keys[slot], cache.values[slot]
        if filled is not None:
            keys, values = keys[:, :, :filled], values[:, :, :filled]
        x = layer.after_attention(x, attend(q, keys, values, attn))
        states.append(kv_in if layer.self_attn.kv_gate is not None else None)
        if folded is not None:
            folded.append(base.policy.accumulate(kept[i] if kept else None, loop, k, v))
    x = base.norm(x)
    return x, states, base.early_exit_gate(x).squeeze(-1), folded


def write_kept_rows(model: LoopedForCausalLM, input_pos: torch.Tensor, cache: LoopedKVCache, kept: list | None,
                    loops_run: int) -> None:
    """The rows the policy keeps for the token once its loops are done (mean, first loop)."""
    policy = model.model.policy
    if kept is None:
        return
    dtype = cache.keys[0].dtype
    for i, acc in enumerate(kept):
        key, value = policy.final(acc, loops_run)  # the mean accumulates in float32
        cache.write_at(policy.slot(0, i), input_pos, key.to(dtype), value.to(dtype))


def greedy_head(model: LoopedForCausalLM, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the last position and the greedy next token (batch, 1)."""
    logits = model.lm_head(x[:, -1])
    return logits.argmax(-1, keepdim=True), logits


def decode_one_token(
    model: LoopedForCausalLM, token: torch.Tensor, input_pos: torch.Tensor, cache: LoopedKVCache, loops: int,
    rope: tuple[torch.Tensor, torch.Tensor], one_query_attention: bool = False, filled: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole decode step for `token` (batch, 1) at `input_pos`: (next token, logits). `filled`: run_loop's."""
    x = model.model.embed_tokens(token)
    states: list[torch.Tensor | None] = [None] * len(model.model.layers)
    kept = None
    for loop in range(loops):
        x, states, _, kept = run_loop(model, x, input_pos, cache, states, loop, rope, kept, one_query_attention,
                                      filled)
    write_kept_rows(model, input_pos, cache, kept, loops)
    return greedy_head(model, x)


def lay_out_weights(model: LoopedForCausalLM, engine: str) -> int:
    """Give the Linear weights the layout each engine's decode GEMVs (one row times the weight)
    read fastest, with the same shapes, values, parameters and state-dict keys
    (docs/cpu-decode-profile.md, one AVX2 thread). Returns how many weights changed.
    - eager: the projections of one input fused into one matmul (fused_projections.py: q, k, v
      and gate, up), on every device. On a CPU in float32, each tall weight (out >= in), fused
      or not, takes the strides of its transpose made contiguous, MKL's fast path (12-25 vs
      10 GB/s); a wide one (down_proj) reads faster contiguous (14 vs 13). In bf16 that layout
      is 4x slower: contiguous.
    - compiled: each weight contiguous and on its own, where inductor's multiply-reduce
      (`compiled_gemv_options`) reads at copy speed (20-29 GB/s), and the transposed layout at 10.
      CUDA's cuBLAS reads both alike: only fusions are undone.
    A tied weight changes once."""
    on_cpu = model.device.type == "cpu"
    in_out = engine == "eager" and on_cpu and model.dtype == torch.float32
    changed: set[int] = set()
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, whatever mode the caller is in
        kept: set[int] = set()
        for module in _fusable(model):
            fused = module.fused
            if engine == "eager" and fused is not None and fused.current() and fused.in_out_contiguous == in_out:
                kept.update(id(linear) for linear in fused.linears)
                continue
            changed.update(id(linear) for linear in unfuse(fused))
            module.fused = None
        if on_cpu:
            changed.update(_lay_out_linears(model, in_out, skip=kept))
        if engine == "eager":
            for module in _fusable(model):
                if module.fused is None:
                    module.fused = fuse_linears(module.one_input_linears(), in_out)
                    changed.update(id(linear) for linear in module.fused.linears)
    return len(changed)


def _fusable(model: LoopedForCausalLM) -> list[Attention | MLP]:
    return [module for module in model.modules() if isinstance(module, Attention | MLP)]


def _lay_out_linears(model: LoopedForCausalLM, in_out: bool, skip: set[int]) -> list[int]:
    """Lays out every Linear weight but those in `skip` (ids of fused modules); returns the ids changed."""
    changed = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or min(weight.shape) == 1 or id(module) in skip:
            continue  # (a vector: both layouts are one)
        transposed = in_out and weight.shape[0] >= weight.shape[1]
        if transposed and weight.stride() != (1, weight.shape[0]):
            weight.data = weight.data.t().contiguous().t()
            changed.append(id(module))
        elif not transposed and not weight.is_contiguous():
            weight.data = weight.data.contiguous()
            changed.append(id(module))
    return changed


def compiled_gemv_options(device: torch.device) -> dict:
    """Inductor options for the compiled CPU step: every one-row matmul (batch 1) becomes a fused
    multiply-reduce over the contiguous weight (inductor's `decompose_mm_pass`), which reads it at
    copy speed, 2.2-2.5x faster than the extern GEMV in float32 and bf16 (docs/cpu-decode-profile.md).
    At batch 4 it is slower than the GEMM, so only one row is decomposed, as inductor's default
    says. The lm head (vocab x hidden) is past inductor's default size limit of 2,048: raised."""
    if device.type != "cpu":
        return {}
    from torch._inductor.fx_passes import decompose_mem_bound_mm

    # Read from the module, not the config, once it is imported.
    decompose_mem_bound_mm.cpu_max_other_dimension_decomposition = 1 << 31
    return {"post_grad_fusion_options": {"decompose_mm_pass": {"cpu_max_other_dimension_decomposition": 1 << 31}}}


@dataclass
class StepOutput:
    token: torch.Tensor  # (batch, 1), the greedy pick
    logits: torch.Tensor  # (batch, vocab)
    loops_run: int
    exit_steps: torch.Tensor | None  # early stopping: each sequence's exit loop (0-based)


class DecodeEngine:
    """Prefill with the model's own forward (eager, chunked as the model or `chunk_starts` says),
    then decode steps through `decode_one_token` over one preallocated, zeroed cache. Build one
    per (model, loops, batch, capacity) and `reset()` it between runs: the compiled graphs are
    tied to the cache's buffers."""

    def __init__(
        self, model: LoopedForCausalLM | HuginnForCausalLM, loops: int, batch_size: int, capacity: int,
        engine: str = "eager", early_stop_threshold: float | None = None, per_sequence_positions: bool = False,
    ) -> None:
        if engine not in STEP_ENGINES:
            raise ValueError(f"engine must be one of {', '.join(STEP_ENGINES)}, got {engine!r}")
        self.model, self.loops, self.engine, self.batch_size = model, loops, engine, batch_size
        self.capacity = capacity
        # Continuous batching: each sequence (a serving slot) has a position of its own, is
        # prefilled alone (`prefill_sequence`) and moved by `set_positions`.
        self.per_sequence_positions = per_sequence_positions
        # Huginn (recurrent depth): its own step (huginn_decode.py), every step run (no exit rule)
        self.huginn = isinstance(model, HuginnForCausalLM)
        if self.huginn and early_stop_threshold is not None:
            raise ValueError("Huginn runs every recurrence step: no early-exit threshold")
        self.weights_laid_out = lay_out_weights(model, engine)
        self.early_stop_threshold = early_stop_threshold
        self.cache: LoopedKVCache = model.new_cache(loops, capacity=capacity)
        self.cache.allocate(batch_size, model.config.num_key_value_heads, model.config.head_dim, model.dtype,
                            model.device, zero=True)
        positions = batch_size if per_sequence_positions else 1
        self.input_pos = torch.zeros(positions, dtype=torch.long, device=model.device)
        config = model.config
        if self.huginn:
            self.rope = huginn_rope_table(model, capacity)
            # the initial state's shape, for initialize_state (which reads only shape, dtype, device)
            self._state_like = torch.empty(batch_size, 1, config.n_embd, dtype=model.dtype, device=model.device)
        else:
            self.rope = rope_table(capacity, config.head_dim, config.rope_theta, model.dtype, model.device)
        self.cuda_graphs = engine == "compiled" and model.device.type == "cuda"
        self.one_query_attention = engine == "compiled" and model.device.type == "cpu"
        # Eager shapes need not be static: attention reads only the rows written so far (one
        # position for the batch; per-sequence positions differ, so they keep the mask).
        self.reads_filled_rows = engine == "eager" and not per_sequence_positions and not self.huginn
        step = huginn_decode_one_token if self.huginn else decode_one_token
        self._step, self._loop, self._head = step, run_loop, greedy_head
        if engine == "compiled":
            self._compile()

    def _compile(self) -> None:
        buffers = self.cache.keys + self.cache.values + self.cache.chunk_keys + self.cache.chunk_values
        for buffer in buffers + (list(self.rope) if isinstance(self.rope, tuple) else [self.rope]):
            # Fixed addresses, so CUDA graphs replay over the cache instead of copying it in.
            torch._dynamo.mark_static_address(buffer)
        # One graph per loop when early stopping; dynamo's default limit of 8 would fall back
        # to eager past loop 8.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * self.loops)
        mode = "reduce-overhead" if self.cuda_graphs else None
        options = dict(mode=mode) if mode else dict(options=compiled_gemv_options(self.model.device))
        self._step = torch.compile(self._step, fullgraph=True, dynamic=False, **options)
        self._loop = torch.compile(run_loop, fullgraph=True, dynamic=False, **options)
        self._head = torch.compile(greedy_head, fullgraph=True, dynamic=False, **options)

    @property
    def description(self) -> str:
        layout = ""
        if self.model.device.type == "cpu" and self.engine == "compiled":
            # inductor decomposes only one-row matmuls: a larger batch keeps the GEMM
            matmuls = "multiply-reduces over contiguous weights" if self.batch_size == 1 else "GEMMs"
            layout = f", matmuls as inductor {matmuls}, one-query attention written out"
        elif self.engine == "eager":
            # MELT's keys and values read its gated state: only they are fused with each other
            layout = ", projections of one input fused (q, k, v or k, v; gate, up)"
            if self.huginn:
                layout = ", projections fused as the checkpoint stores them (Wqkv; fc: gate, up)"
            if self.model.device.type == "cpu" and self.model.dtype == torch.float32:
                layout += ", tall Linear weights (in, out)-contiguous for MKL's GEMV"
        positions = ", a position per sequence (continuous batching)" if self.per_sequence_positions else ""
        return self._steps_description() + layout + positions

    def _steps_description(self) -> str:
        name = "huginn_decode_one_token" if self.huginn else "decode_one_token"
        if self.engine == "eager":
            return f"{name}, eager"
        graphs = "one graph per loop, exit check on the host" if self.early_stop_threshold else "one graph per step"
        mode = 'mode="reduce-overhead" (CUDA graphs)' if self.cuda_graphs else "inductor (no CUDA graphs on CPU)"
        return f"{name}, torch.compile {mode}, {graphs}"

    def reset(self) -> None:
        self.rewind(0)

    def rewind(self, position: int) -> None:
        """Forget every token from `position` on (their rows are overwritten by the next steps)."""
        self.cache.seq_len = position
        self.input_pos.fill_(position)

    def prefill(self, input_ids: torch.Tensor, chunk_starts: Sequence[int] | None = None) -> StepOutput:
        """Fill the cache with the prompt (eager); returns the first generated token."""
        self.reset()
        out = self.model(input_ids, past_key_values=self.cache, loops=self.loops, logits_to_keep=1,
                         chunk_starts=chunk_starts)
        self.input_pos.fill_(self.cache.seq_len)
        logits = out.logits[:, -1]
        return StepOutput(logits.argmax(-1, keepdim=True), logits, self.loops, None)

    def prefill_sequence(self, index: int, input_ids: torch.Tensor, chunk_starts: Sequence[int] | None = None
                         ) -> StepOutput:
        """Per-sequence positions: prefill sequence `index` alone with the prompt (1, tokens),
        writing its rows in place (the other sequences' rows are untouched); its position becomes
        the prompt's length. Returns its first generated token."""
        if not self.per_sequence_positions:
            raise ValueError("prefill_sequence needs an engine built with per_sequence_positions=True")
        if input_ids.shape[1] > self.capacity:
            raise ValueError(f"a {input_ids.shape[1]}-token prompt does not fit the cache's {self.capacity} tokens")
        lane = self.cache.lane(index)
        out = self.model(input_ids, past_key_values=lane, loops=self.loops, logits_to_keep=1,
                         chunk_starts=chunk_starts)
        self.input_pos[index] = lane.seq_len
        logits = out.logits[:, -1]
        return StepOutput(logits.argmax(-1, keepdim=True), logits, self.loops, None)

    def set_positions(self, indices: Sequence[int], position: int) -> None:
        """Per-sequence positions: where sequences `indices` write their next token, in one write
        (free slots are parked at 0, so that stepping them never runs past the capacity; keeping
        a running sequence within it is the caller's: ContinuousBatcher.check)."""
        self.input_pos[list(indices)] = position

    def step(self, token: torch.Tensor) -> StepOutput:
        """Decode one token for every sequence: writes its rows at the next position."""
        position = self.cache.seq_len
        filled = position + 1 if self.reads_filled_rows else None
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.huginn:
            state = self.model.initialize_state(self._state_like)  # (the global RNG, as forward draws it)
            next_token, logits = self._step(self.model, token, self.input_pos, self.cache, self.loops, self.rope,
                                            state, self.one_query_attention)
            loops_run, exit_steps = self.loops, None
        elif self.early_stop_threshold is None:
            next_token, logits = self._step(self.model, token, self.input_pos, self.cache, self.loops, self.rope,
                                            self.one_query_attention, filled)
            loops_run, exit_steps = self.loops, None
        else:
            x = self.model.model.embed_tokens(token)
            states: list[torch.Tensor | None] = [None] * len(self.model.model.layers)
            stop = EarlyStop(self.early_stop_threshold, self.loops)
            kept = None
            for loop in range(self.loops):
                x, states, gate, kept = self._loop(self.model, x, self.input_pos, self.cache, states, loop, self.rope,
                                                   kept, self.one_query_attention, filled)
                if stop.update(loop, gate, x):
                    break
            write_kept_rows(self.model, self.input_pos, self.cache, kept, loop + 1)
            if self.per_sequence_positions:  # each sequence's rows at its own position
                for index, at in enumerate(self.input_pos.tolist()):
                    fill_after_early_stop(self.model.model.policy, self.cache.lane(index), loop, self.loops, at, at + 1)
            else:
                fill_after_early_stop(self.model.model.policy, self.cache, loop, self.loops, position, position + 1)
            next_token, logits = self._head(self.model, stop.hidden)
            loops_run, exit_steps = loop + 1, stop.exit_steps
        if not self.per_sequence_positions:  # (each sequence's length is its position: the caller's)
            self.cache.seq_len = position + 1
        self.input_pos.add_(1)
        # CUDA graphs reuse their output buffers on the next replay: keep copies.
        return StepOutput(next_token.clone(), logits.clone(), loops_run, exit_steps)
