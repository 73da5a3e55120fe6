"""The one place where Ouro and MELT differ: what happens to keys and values across loops.

A KV policy answers four questions for the shared looped stack (looped.py):
  - which cache slot a (loop, layer) writes: Ouro keeps one per loop and layer, MELT one per layer;
  - what a finished token keeps there (its last loop's rows, or a combination of its loops');
  - what the layer projects keys/values from: Ouro the layer input x, MELT a gated state h
    (its gates: melt_gates.py);
  - whether the sequence is processed in chunks (MELT: earlier tokens' rows must be final).
Everything else (embeddings, layers, RoPE, norms, the loop, early exit) is shared.

Besides Ouro's and MELT's own, the training-free cross-loop sharing policies run on Ouro weights
unchanged (the rivals MELT's trained gate must beat): last-loop, mean, first-loop, modulo:N and
first-then-shared:S, each with its source and memory formula in its docstring. Every policy's
analytic KV bytes (`kv_bytes_per_token`) equal the bytes its cache holds.
"""

from __future__ import annotations

import torch
from torch import nn

from . import huginn_cost
from .configs import OuroConfig
from .flashloop import FlashLoopCache, flashloop_bytes
from .huginn_config import HuginnConfig
from .kivi_cache import kivi_slot_bytes
from .melt_gates import GATE_CLASSES
from .names import (  # noqa: F401  (re-exported)
    TRAINING_FREE_POLICIES,
    UnknownKVPolicyError,
    is_huginn_kv_policy,
    parse_kv_policy,
)
from .packed_cache import TailRule, commits_for, layout_after, quant_bits, quant_tail, quantized_slot_bytes

Row = tuple[torch.Tensor, torch.Tensor]  # one layer's keys and values for the tokens being processed


class KVPolicy:
    """Ouro's per-loop KV cache: slot = loop * num_layers + layer, so KV grows linearly in loops.

    Source: the Ouro paper and its released code (one cache per loop and layer); Continuous Depth
    Batching (arXiv 2608.09444, `looped_cdb/kv_cache_policy.py`) calls this layout
    `depth_indexed`, and its early-exit fill below (skipped loops take the exit loop's rows) is
    CDB's `last_exited`.
    KV bytes per token = loops x layers x 2 x kv_heads x head_dim x itemsize.

    Every policy answers: how many slots a cache needs, which slot a (loop, layer) writes (and
    reads: a loop attends over its slot, which holds finished tokens' kept rows and the current
    tokens' rows of this loop), and, for policies that keep a combination of a token's loops
    (`reduces_loops`), how its kept row is built once the token's loops are done.
    """

    name = "per-loop"
    reduces_loops = False  # True: the kept row combines the loops' rows (accumulate / final)
    training_free = True  # runs on Ouro weights unchanged
    lossy = False  # True: kept rows are compressed (quantised), not the rows the loops computed
    early_stop = True  # False: the policy's computation has no early exit (FlashLoop's)
    computes_in_cache = False  # True: the computation lives in the cache, so a forward always has one

    def __init__(self, config: OuroConfig) -> None:
        self.num_layers = config.num_hidden_layers

    def num_slots(self, loops: int) -> int:
        return loops * self.num_layers

    def slot(self, loop: int, layer: int) -> int:
        return loop * self.num_layers + layer

    def make_gate(self, config: OuroConfig) -> nn.Module | None:
        return None

    def cache(self, loops: int, capacity: int | None):
        """A cache of this policy's own kind (None: the model's usual LoopedKVCache)."""
        return None

    def alters_rows(self, loops: int) -> bool:
        """Whether a later token reads earlier tokens' rows other than exactly as each loop
        computed them (shared across loops, combined, or compressed)."""
        return self.lossy or self.shares_rows(loops)

    def shares_rows(self, loops: int) -> bool:
        """Whether a finished token keeps fewer rows than one per loop at `loops` loops, so that a
        token processed after it reads shared (or combined) rows instead of its own loop's: a
        prompt prefilled in several chunks, or a continuation scored after its context, then
        computes something other than one whole forward."""
        return self.num_slots(loops) < loops * self.num_layers

    @property
    def chunk_size(self) -> int | None:
        return None

    @property
    def open_chunk(self) -> int | None:
        """Chunk size C when decoding continues the chunk grid (MELT's decode_reads="chunk"): the
        open chunk's rows of every loop are kept in a side buffer of C rows per (loop, slot)."""
        return None

    def accumulate(self, acc: Row | None, loop: int, keys: torch.Tensor, values: torch.Tensor) -> Row | None:
        """Fold loop `loop`'s rows of the tokens being processed into `acc` (reduces_loops only)."""
        return None

    def final(self, acc: Row | None, loops_run: int) -> Row | None:
        """The rows a token keeps once its `loops_run` loops are done; None: what the slot holds."""
        return None

    def fill_skipped_loops(self, cache, last_loop: int, loops: int, start: int, end: int) -> None:
        """After early stopping at `last_loop`, tokens [start, end) have no rows in the slots of
        later loops; copy their last computed loop's rows there, so later tokens attending at
        those loops find them (Ouro's 'reuse the last loop's KV' rule)."""
        for layer in range(self.num_layers):
            src = self.slot(last_loop, layer)
            keys, values = cache.rows(src, start, end)
            for loop in range(last_loop + 1, loops):
                dst = self.slot(loop, layer)
                if dst != src:
                    cache.update_slot(dst, keys, values, start)


class LastLoopKVPolicy(KVPolicy):
    """One row per (layer, token) that every loop overwrites: a finished token keeps its last
    loop's keys/values. A prompt processed as one chunk attends exactly as Ouro (each loop reads
    that loop's rows of the prompt); decoding tokens read the prompt's last-loop rows.

    Source: the Ouro paper's decode-time KV reuse ("last loop's cache only", its Table 14);
    CDB's `single` layout (one slot, every recursion writes it) is the same slot arithmetic.
    KV bytes per token = layers x 2 x kv_heads x head_dim x itemsize, whatever the loops."""

    name = "last-loop"

    def num_slots(self, loops: int) -> int:
        return self.num_layers

    def slot(self, loop: int, layer: int) -> int:
        return layer

    def fill_skipped_loops(self, cache, last_loop: int, loops: int, start: int, end: int) -> None:
        pass  # the one row already holds the last computed loop's keys/values


class MeanKVPolicy(LastLoopKVPolicy):
    """A finished token keeps the mean of its loops' keys/values (over the loops it ran). While
    its loops run, each loop reads the token's rows of that loop, as in Ouro.

    Source: the Ouro paper's "average of the loops' KV" (its Table 14). KV bytes per token as
    `last-loop`; while a chunk runs, a float32 running sum of its rows is held besides (activation
    memory, counted by the measured peaks, not by the KV formula)."""

    name = "mean"
    reduces_loops = True

    def accumulate(self, acc: Row | None, loop: int, keys: torch.Tensor, values: torch.Tensor) -> Row | None:
        if acc is None:  # a copy: the rows may be a view of cache rows the next loop overwrites
            return keys.to(torch.float32, copy=True), values.to(torch.float32, copy=True)
        return acc[0] + keys.float(), acc[1] + values.float()

    def final(self, acc: Row | None, loops_run: int) -> Row | None:
        return None if acc is None else (acc[0] / loops_run, acc[1] / loops_run)


class FirstLoopKVPolicy(LastLoopKVPolicy):
    """A finished token keeps its first loop's keys/values; while its loops run, each loop reads
    the token's rows of that loop. The collapse case: it shows what a bad policy looks like.

    Source: the Ouro paper's "first loop only" (its Table 14: GSM8K about 18.7 vs 78.9). KV
    bytes per token as `last-loop`; a chunk's first-loop rows are held besides while it runs."""

    name = "first-loop"
    reduces_loops = True

    def accumulate(self, acc: Row | None, loop: int, keys: torch.Tensor, values: torch.Tensor) -> Row | None:
        return (keys.clone(), values.clone()) if acc is None else acc

    def final(self, acc: Row | None, loops_run: int) -> Row | None:
        return acc


class FixedSlotsKVPolicy(KVPolicy):
    """A fixed number of slots per layer that several loops share (`slot()` says which)."""

    kind = ""

    def __init__(self, config: OuroConfig, slots: int) -> None:
        super().__init__(config)
        self.slots = slots
        self.name = f"{self.kind}:{slots}"

    def num_slots(self, loops: int) -> int:
        return min(self.slots, loops) * self.num_layers


class ModuloKVPolicy(FixedSlotsKVPolicy):
    """N slots per layer; loop t writes (and reads) slot t mod N, so a finished token keeps, in
    slot s, its rows of the last loop t with t mod N = s. N >= loops is `per-loop`; N = 1 has
    `last-loop`'s slot arithmetic.

    Source: Huginn's recurrent-depth cache (`seal-rg/recurrent-pretraining`,
    `HuginnDynamicCache`, mode `compress-s`). Huginn counts cache entries over its 4 core layers
    (a recurrence step runs all 4), so `modulo:N` here is Huginn's `compress-s(4N)`, not
    `compress-sN`. KV bytes per token = min(N, loops) x layers x 2 x
    kv_heads x head_dim x itemsize."""

    kind = "modulo"

    def slot(self, loop: int, layer: int) -> int:
        return (loop % self.slots) * self.num_layers + layer


class FirstThenSharedKVPolicy(FixedSlotsKVPolicy):
    """S slots per layer: loop t writes (and reads) slot min(t, S - 1), i.e. the first S - 1
    loops keep private slots and every later loop shares the last one (S = 2: the first loop's
    rows, then one shared slot that ends with the last loop's rows).

    Source: Continuous Depth Batching (arXiv 2608.09444), public code
    `ZH-Haoran/continuous-depth-batching`, `src/looped_cdb/kv_cache_policy.py`:
    `kv_slot_for_step` returns min(recurrent_step, slots_per_layer - 1) for `first_then_shared`,
    default 2 slots. Early exit: skipped loops take the exit loop's rows (as every layout here).
    CDB differs there: it copies exit rows only under `last_exited`, so under its
    `first_then_shared` the shared slot keeps, for an exited token, a row never written for it.
    We copy, since an unwritten row is undefined memory rather than a policy; without early exit
    the two agree.
    KV bytes per token = min(S, loops) x layers x 2 x kv_heads x head_dim x itemsize."""

    kind = "first-then-shared"

    def slot(self, loop: int, layer: int) -> int:
        return min(loop, self.slots - 1) * self.num_layers + layer


class FlashLoopKVPolicy(KVPolicy):
    """FlashLoop 0.1.0 on Ouro weights, computed as its pure-torch reference computes it
    (flashloop.py): a token-sparse prefill (loops 3 and 4 update the 25% / 10% of prompt tokens
    whose normed state moved most), decode loops 3 and 4 re-reading loop 2's top 10% of keys, and
    its cross-loop INT4 cache (loop 1 an anchor, later loops residuals over the loop before, loops
    3/4 only for the tokens they updated, the newest 64-127 rows at full precision). Loops 1-4 (its
    definition), one sequence (its batch), no early exit (it always reads loop 4).

    Source: FlashLoop (arXiv 2609.29812; PyPI `flashloop` 0.1.0, `flashloop_torch.flashloop`,
    defaults: 4 bits, groups of 64, residual 64, fractions 0.25 / 0.10, decode fraction 0.10).
    KV bytes: `flashloop.flashloop_bytes`, which depends on the prompt length and on which tokens
    were chosen: about 1/4.8 of `per-loop` over a 4K prompt at 4 loops (fp32 minima and scales;
    FlashLoop's own count, fp16 ones: 1/5.4), about 1/3.2 per decoded token (all its rows kept)."""

    name = "flashloop"
    lossy = True
    early_stop = False
    computes_in_cache = True  # its token-sparse prefill and decode attention are the cache's

    def cache(self, loops: int, capacity: int | None):
        return FlashLoopCache(self.num_slots(loops), loops, capacity)


class SharedGatedKVPolicy(KVPolicy):
    """MELT's shared cache: one slot per layer, rewritten at every loop from a gated state
    (the gate's weights are MELT's own: not training-free, not for Ouro weights)."""

    name = "shared-gated"
    training_free = False

    def __init__(self, config: OuroConfig) -> None:
        super().__init__(config)
        self._chunk_size = getattr(config, "chunk_size", None)
        self._decode_reads = getattr(config, "decode_reads", "final")

    def num_slots(self, loops: int) -> int:
        return self.num_layers

    def slot(self, loop: int, layer: int) -> int:
        return layer

    def make_gate(self, config: OuroConfig) -> nn.Module | None:
        return GATE_CLASSES[getattr(config, "gate", "elementwise")](config.hidden_size, config.first_loop_state)

    @property
    def chunk_size(self) -> int | None:
        return self._chunk_size

    @property
    def open_chunk(self) -> int | None:
        return self._chunk_size if self._decode_reads == "chunk" else None

    def fill_skipped_loops(self, cache, last_loop: int, loops: int, start: int, end: int) -> None:
        pass  # one shared row per token: it already holds the last computed loop's keys/values


# The policy classes behind the names of names.py (tests/test_names.py keeps them in step).
_PLAIN = {cls.name: cls for cls in (KVPolicy, LastLoopKVPolicy, MeanKVPolicy, FirstLoopKVPolicy, FlashLoopKVPolicy,
                                    SharedGatedKVPolicy)}
_WITH_SLOTS = {"modulo": ModuloKVPolicy, "first-then-shared": FirstThenSharedKVPolicy}


def is_training_free(name: str) -> bool:
    """Whether the policy `name` runs on Ouro weights unchanged (False for MELT's trained gate)."""
    name = _ouro_family_policy(name)
    return (_PLAIN.get(name) or _WITH_SLOTS[name.partition(":")[0]]).training_free


def _ouro_family_policy(name: str) -> str:
    """parse_kv_policy's name, refusing (one line) Huginn's strategies, which it also accepts."""
    name = parse_kv_policy(name)
    if is_huginn_kv_policy(name):
        raise UnknownKVPolicyError(f"KV policy {name!r} is a Huginn cache lookup strategy; Ouro-family models take "
                                   f"{', '.join(TRAINING_FREE_POLICIES)}")
    return name


def policy_alters_rows(name: str, loops: int) -> bool:
    """`KVPolicy.alters_rows` for a policy name, no model needed (the answer does not depend on
    the layer count)."""
    return kv_policy_for(_ONE_LAYER, name).alters_rows(loops)


class _OneLayer:
    num_hidden_layers = 1
    kv_policy = "per-loop"


_ONE_LAYER = _OneLayer()


def kv_policy_for(config: OuroConfig, name: str | None = None) -> KVPolicy:
    """The KV policy `name` asks for, else the config's (`config.kv_policy`, a class default or
    set per model), laid out for the config's layers."""
    name = _ouro_family_policy(name or config.kv_policy)
    if name in _PLAIN:
        return _PLAIN[name](config)
    kind, _, count = name.partition(":")
    return _WITH_SLOTS[kind](config, int(count))


# Where a policy's bytes per token depend on the sequence's length (packed caches: the tail is
# full precision), listings state them at this many tokens.
STATED_TOKENS = 4096


def kv_bytes_per_token(config: OuroConfig, loops: int, dtype: torch.dtype, policy: str | None = None,
                       kv_quant: str | None = None, tokens: int = STATED_TOKENS) -> int:
    """Analytic KV-cache bytes one token costs at `loops` loops (K and V, all slots), under
    `policy` (default: the config's). A packed cache (flashloop, `kv_quant`) holds its newest rows
    at full precision, so its bytes per token depend on the length: the mean over a prompt of
    `tokens` tokens, rounded down."""
    if isinstance(config, HuginnConfig):
        return huginn_cost.kv_cache_bytes(config, loops, 1, 1, dtype, policy)
    policy_ = kv_policy_for(config, policy)
    quant = kv_quant if kv_quant is not None else getattr(config, "kv_quant", None)
    if policy_.lossy or quant_bits(quant) is not None:
        return predict_kv_cache_bytes(config, loops, 1, tokens, dtype, kv_policy=policy, kv_quant=kv_quant) // tokens
    itemsize = torch.empty((), dtype=dtype).element_size()
    return policy_.num_slots(loops) * 2 * config.num_key_value_heads * config.head_dim * itemsize


def kv_side_buffer_bytes(config: OuroConfig, loops: int, dtype: torch.dtype, tokens: int) -> int:
    """Analytic bytes of the open-chunk side buffer one sequence of `tokens` tokens holds (MELT
    with decode_reads="chunk": min(C, tokens) rows per loop and layer, K and V; 0 otherwise)."""
    if isinstance(config, HuginnConfig):
        return 0
    policy = kv_policy_for(config)
    if policy.open_chunk is None:
        return 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = loops * policy.num_slots(loops) * min(policy.open_chunk, tokens)
    return rows * 2 * config.num_key_value_heads * config.head_dim * itemsize


def predict_kv_cache_bytes(
    config: OuroConfig, loops: int, batch: int, tokens: int, dtype: torch.dtype, kv_policy: str | None = None,
    prompt_tokens: int | None = None, kv_quant: str | None = None,
    flashloop_late_rows: list[tuple[int, int]] | None = None,
) -> int:
    """Analytic bytes a cache holding `tokens` tokens for `batch` sequences must hold (the rows
    kept per token, plus MELT's open-chunk side buffer where decoding continues the chunk grid),
    under `kv_policy` and `kv_quant` (default: the config's).

    Packed caches depend on how the tokens came: `prompt_tokens` of them as the prompt (default:
    all; MELT's in chunks of its chunk_size), the rest decoded one at a time. FlashLoop's loop-3/4
    residuals cover the tokens its loops 3/4 updated; which prompt tokens those are depends on the
    data, so `flashloop_late_rows` gives their count per packed group (FlashLoopCache.
    selected_per_group); by default they are assumed spread evenly over the prompt."""
    if isinstance(config, HuginnConfig):
        return huginn_cost.kv_cache_bytes(config, loops, batch, tokens, dtype, kv_policy)
    policy = kv_policy_for(config, kv_policy)
    itemsize = torch.empty((), dtype=dtype).element_size()
    heads, head_dim = config.num_key_value_heads, config.head_dim
    quant = kv_quant if kv_quant is not None else getattr(config, "kv_quant", None)
    if policy.name == "flashloop":
        if batch != 1:
            raise ValueError("flashloop: FlashLoop 0.1.0 holds one sequence (batch 1)")
        prompt = tokens if prompt_tokens is None else min(prompt_tokens, tokens)
        return flashloop_bytes(tokens, prompt, loops, config.num_hidden_layers, heads, head_dim, itemsize,
                               flashloop_late_rows)
    if (bits := quant_bits(quant)) is not None and quant_tail(quant) == "kivi":
        return policy.num_slots(loops) * kivi_slot_bytes(tokens, batch, heads, head_dim, itemsize, bits)
    if bits is not None:
        layout = layout_after(commits_for(tokens, prompt_tokens, policy.chunk_size))
        slot = quantized_slot_bytes(layout, batch, heads, head_dim, itemsize, bits, TailRule())
        return policy.num_slots(loops) * slot
    per_token = policy.num_slots(loops) * 2 * heads * head_dim * itemsize
    return batch * (tokens * per_token + kv_side_buffer_bytes(config, loops, dtype, tokens))
