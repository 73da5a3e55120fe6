"""FlashLoop 0.1.0 (arXiv 2609.29812, PyPI `flashloop`) as its pure-torch reference,
`flashloop_torch.flashloop(model)`, computes it on Ouro: its token-sparse prefill, its decode
attention and its cross-loop INT4 cache (`--kv-policy flashloop`). Tested against that reference's
own outputs on the same weights (tests/fixtures/flashloop_reference.pt, made by
scripts/flashloop_reference.py).

Prefill (one piece). Loops 1 and 2 run densely. After loop 2's final norm each token is scored by
how far its normed state moved, ||h2 - h1|| / ||h2|| (fp32); loop 3 updates the top 25% of the
prompt (A3: max(1, ceil(P/4)) tokens, the last one always in). After loop 3 the tokens of A3 are
scored again (loop 3 against loop 2) and loop 4 updates the top 10% of the prompt among them (A4,
nested). At loops 3 and 4 every row is computed, then a token outside the loop's set keeps its
input hidden state (the norm is not applied to it again) and, in that loop's cache slot, the
previous loop's keys and values; selected tokens attend causally to all tokens through that mixed
slot. Logits of every position come from the last loop the token was updated in.

Decode. Every token runs all loops, its keys and values appended at full precision. Loops 1 and 2
attend densely; at loop 2 each layer and query head keeps the 10% of keys (max(1, ceil(T/10)), T
counting the new token) with the largest attention probability, their probability mass m, and
the subset-renormalised attention S2 over them. Loops 3 and 4 do not attend densely: their output
is loop 2's, corrected on those keys, o_proj(...) of a2 + m (S_t - S2), S_t the same subset's
attention with loop t's keys and values (FlashLoop's "cached source mass" rule; its engine
refuses dense attention at loops 3/4).

The cache. After every forward, while T - s >= 128, the 64 rows [s, s + 64) of every layer are
packed: loop 1 as an INT4 anchor, each later loop as an INT4 residual over the previous loop's
reconstruction (closed loop), loop 2 for every row, loops 3 and 4 only for the rows of A3 / A4
(prompt positions; decoded positions always), so the newest 64-127 rows of every loop stay at full
precision. Keys are quantised per channel over the group's (selected) rows, values per row over
64 channels, asymmetric min/max 4 bits, as the reference's fake quantiser. Storage is real: 4-bit
codes two to a byte (in int32 words along the channels), the minimum and scale of each group in
fp32 (META_DTYPE), the full-precision rows exactly as many as there are, and A3 / A4 as one
bit-packed mask; `nbytes()` equals `flashloop_bytes`.

What FlashLoop counts differs in two widths, not in what is held: its reference's `audit()` counts
each minimum and scale at 2 bytes (fp16, as its optimised engine stores them) and the tail at 2
bytes an element (bf16, its dtype), while the reference computes with fp32 minima and scales.
Holding fp16 ones changes what is computed: on the test fixture greedy tokens then leave the
reference's within 20 steps. So melt-bench holds fp32 ones, computes what the reference computes,
and `flashloop_audit_bytes` gives FlashLoop's own count of the same cache (equal to its `audit()`
at every step, tested).
"""

from __future__ import annotations

import math

import torch

from .kv_packing import _dequantise, _pack, _quantise, _unpack
from .packed_cache import PackedKVCache, TailLayout, TailRule

FRACTIONS = (0.25, 0.10)  # prefill: the share of prompt tokens loops 3 and 4 update
DECODE_FRACTION = 0.10  # decode: the share of keys loops 3 and 4 re-read
GROUP = 64  # rows a pack takes; also the channel group of a value row
RESIDUAL = 64  # rows that always stay at full precision (64-127 after a pack)
# The dtype of each quantisation group's minimum and scale: fp32, as FlashLoop's reference
# computes with them (it counts them as fp16, the width its engine stores: flashloop_audit_bytes).
META_DTYPE = torch.float32


def selected_count(fraction: float, prompt_tokens: int) -> int:
    """How many prompt tokens a late loop updates: max(1, ceil(fraction x P))."""
    return max(1, math.ceil(prompt_tokens * fraction))


def movement_scores(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """||h_t - h_t-1|| / ||h_t|| per token, in fp32 (FlashLoop's "hidden_delta" selector)."""
    current, previous = current.float(), previous.float()
    return (current - previous).norm(dim=-1) / current.norm(dim=-1).clamp_min(1e-12)


def select_tokens(scores: torch.Tensor, fraction: float, eligible: torch.Tensor) -> torch.Tensor:
    """FlashLoop's selection over a prompt of P tokens: the last token, then the top-scored eligible
    tokens, max(1, ceil(fraction x P)) in all (at most the eligible count)."""
    tokens = scores.shape[-1]
    chosen = torch.zeros(tokens, dtype=torch.bool, device=scores.device)
    candidates = torch.nonzero(eligible, as_tuple=False).flatten()
    count = min(selected_count(fraction, tokens), candidates.numel())
    candidates = candidates[candidates != tokens - 1]
    if count > 1:
        chosen[candidates[torch.topk(scores[candidates].float(), k=count - 1).indices]] = True
    chosen[-1] = True
    return chosen


def pack_bits(masks: list[torch.Tensor]) -> torch.Tensor:
    """Boolean masks, concatenated, as bits in uint8 (ceil(n / 8) bytes)."""
    bits = torch.cat(masks).to(torch.uint8)
    bits = torch.nn.functional.pad(bits, (0, -bits.numel() % 8)).view(-1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 1).flatten()[:count].bool()


class Quantised:
    """Rows (1, heads, n, head_dim) quantised to 4 bits: keys per channel over the rows (`axis` 2),
    values per row over groups of 64 channels (`axis` 3); codes packed along the channels."""

    def __init__(self, rows: torch.Tensor, axis: int) -> None:
        codes, self.low, self.scale = _quantise(rows, axis, 4, GROUP, META_DTYPE)
        self.words, self.axis, self.dtype, self.head_dim = _pack(codes, 3, 4), axis, rows.dtype, rows.shape[3]

    def read(self) -> torch.Tensor:
        codes = _unpack(self.words, 3, 4, self.head_dim)
        return _dequantise(codes, self.low, self.scale, self.axis, GROUP, self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.words, self.low, self.scale]


def quantised_bytes(rows: int, kv_heads: int, head_dim: int, meta_itemsize: int) -> int:
    """Keys plus values of `rows` quantised rows (0 for none): 4-bit codes, and a minimum and a
    scale per key channel and per value row and 64 channels (FlashLoop's audit: Kb + Vb)."""
    if rows == 0:
        return 0
    payload = math.ceil(rows * kv_heads * head_dim * 4 / 8)
    return 2 * payload + 2 * meta_itemsize * kv_heads * (head_dim + rows * math.ceil(head_dim / GROUP))


class FlashLoopCache(PackedKVCache):
    """FlashLoop's cache and its computation hooks (module docstring) for Ouro's per-loop slots
    (slot = loop x layers + layer), 1 to 4 loops, one sequence."""

    batch_one = True

    def __init__(self, num_slots: int, loops: int, capacity: int | None = None) -> None:
        if not 1 <= loops <= 4:
            raise ValueError(f"flashloop: FlashLoop 0.1.0 defines loops 1-4, got {loops}")
        self.num_layers = num_slots // loops
        self.late = max(0, loops - 2)  # late loops (3, 4) present
        super().__init__(num_slots, loops, capacity, TailRule(GROUP, RESIDUAL, 0))
        self.clear_packed()

    def clear_packed(self) -> None:
        # per layer, per packed group: per loop the quantised (keys, values) of its rows
        self.groups: list[list[list[tuple[Quantised, Quantised] | None]]] = [[] for _ in range(self.num_layers)]
        self.prompt_tokens = 0
        self.masks: torch.Tensor | None = None  # A3 and A4 over the prompt, bit-packed
        self._selected: list[torch.Tensor] = []  # while the prompt runs
        self._outputs: list[torch.Tensor] = []
        self._sources: dict[int, tuple] = {}  # decode: per layer, loop 2's keys, mass, S2 and output

    def slot(self, loop: int, layer: int) -> int:
        return loop * self.num_layers + layer

    @property
    def in_prompt(self) -> bool:
        return not self.layout.started

    # --- prefill: which tokens a late loop updates ---------------------------------------------
    def observe_loop_output(self, loop: int, hidden: torch.Tensor) -> None:
        """After loop `loop`'s norm (with the carry): choose the tokens of the next late loop."""
        if not self.in_prompt or loop + 1 >= self.loops:
            return
        if loop == 0:  # a new prompt (an earlier one that failed midway leaves nothing behind)
            self._selected, self._outputs = [], []
        self._outputs.append(hidden[0])
        if loop >= 1:
            eligible = self._selected[-1] if self._selected else torch.ones(hidden.shape[1], dtype=torch.bool,
                                                                             device=hidden.device)
            scores = movement_scores(self._outputs[-1], self._outputs[-2])
            self._selected.append(select_tokens(scores, FRACTIONS[loop - 1], eligible))

    def active_tokens(self, loop: int) -> torch.Tensor | None:
        """The prompt tokens loop `loop` updates (None: all of them)."""
        return self._selected[loop - 2] if self.in_prompt and loop >= 2 else None

    def update_slot(self, slot: int, key: torch.Tensor, value: torch.Tensor, start: int):
        loop, layer = divmod(slot, self.num_layers)
        active = self.active_tokens(loop)
        if active is not None:  # tokens outside the loop's set keep the previous loop's rows
            earlier_keys, earlier_values = self.rows(self.slot(loop - 1, layer), start, start + key.shape[2])
            keep = active[None, None, :, None]
            key, value = torch.where(keep, key, earlier_keys), torch.where(keep, value, earlier_values)
        return super().update_slot(slot, key, value, start)

    # --- decode: loops 3 and 4 re-read loop 2's chosen keys ---------------------------------------
    def attend(self, attention, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """The attention output of a decoded token at loops 2-4 (None: the usual dense attention)."""
        loop, layer = divmod(slot, self.num_layers)
        if self.in_prompt or q.shape[2] != 1 or loop == 0 or self.loops < 3:
            return None
        groups = attention.n_heads // attention.n_kv_heads
        keys, values = k.repeat_interleave(groups, 1).float(), v.repeat_interleave(groups, 1).float()
        logits = (q.float() @ keys.transpose(-1, -2)) * attention.head_dim**-0.5  # (1, heads, 1, T)
        if loop == 1:
            probs = torch.softmax(logits, dim=-1)
            out = attention.o_proj((probs.to(q.dtype) @ values.to(q.dtype)).transpose(1, 2).reshape(1, 1, -1))
            take = min(logits.shape[-1], max(1, math.ceil(logits.shape[-1] * DECODE_FRACTION)))
            chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(
                -1, torch.topk(probs.to(q.dtype), take, dim=-1).indices, True)
            mass = (probs * chosen).sum(-1, keepdim=True)
            self._sources[layer] = (chosen, mass, self._subset(logits, chosen, values), out)
            return out
        chosen, mass, subset_2, out_2 = self._sources[layer]
        delta = (mass * (self._subset(logits, chosen, values) - subset_2)).transpose(1, 2).reshape(1, 1, -1)
        return (out_2.float() + delta @ attention.o_proj.weight.float().T).to(out_2.dtype)

    @staticmethod
    def _subset(logits: torch.Tensor, chosen: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.masked_fill(~chosen, -torch.inf), dim=-1) @ values

    # --- the commit: pack every complete group past the newest 64..127 rows -------------------
    def _commit(self, rows: int) -> None:
        if self.in_prompt:
            self.prompt_tokens = rows
            if self._selected:
                self.masks = pack_bits(self._selected)
            self._selected, self._outputs = [], []
        tokens = self._seq_len + rows
        packed = max(0, (tokens - RESIDUAL) // GROUP) * GROUP
        for start in range(self.layout.packed, packed, GROUP):
            self._pack_group(start, start - self.layout.packed)
        for store in (self.keys, self.values):
            for slot in range(self.num_slots):
                self.keep_rows(store, slot, packed - self.layout.packed, tokens - packed)
        self.layout = TailLayout(packed, tokens - packed, tokens - packed, True)

    def late_rows(self, start: int, end: int) -> list[torch.Tensor]:
        """Per late loop, which of positions [start, end) carry a residual: the prompt's selected
        tokens, every decoded one."""
        device = self.masks.device if self.masks is not None else None
        decoded = torch.arange(start, end, device=device) >= self.prompt_tokens
        if self.masks is None:
            return [decoded] * self.late
        bits = unpack_bits(self.masks, self.late * self.prompt_tokens).view(self.late, -1)
        inside = torch.zeros(self.late, end - start, dtype=torch.bool, device=device)
        prompt_end = min(end, self.prompt_tokens)
        if prompt_end > start:
            inside[:, :prompt_end - start] = bits[:, start:prompt_end]
        return [inside[index] | decoded for index in range(self.late)]

    def picked_rows(self, late: list[torch.Tensor], loop: int, offset: int, device) -> torch.Tensor:
        """Rows of the group at `offset` with a loop-`loop` residual (loop 2: all of them)."""
        if loop == 1:
            return torch.arange(GROUP, device=device)
        return torch.nonzero(late[loop - 2][offset:offset + GROUP]).flatten().to(device)

    def _pack_group(self, start: int, offset: int) -> None:
        late = self.late_rows(start, start + GROUP)
        for layer in range(self.num_layers):
            base, group = None, []
            for loop in range(self.loops):
                slot = self.slot(loop, layer)
                rows = [store[slot][:, :, offset:offset + GROUP] for store in (self.keys, self.values)]
                if base is None:  # the anchor
                    pair = (Quantised(rows[0], 2), Quantised(rows[1], 3))
                    base = [pair[0].read(), pair[1].read()]
                    group.append(pair)
                    continue
                picked = self.picked_rows(late, loop, 0, rows[0].device)
                if picked.numel() == 0:
                    group.append(None)
                    continue
                pair = tuple(Quantised(row[:, :, picked] - prior[:, :, picked], axis)
                             for row, prior, axis in zip(rows, base, (2, 3)))
                base = [prior.index_add(2, picked, part.read()) for prior, part in zip(base, pair)]
                group.append(pair)
            self.groups[layer].append(group)

    def read_packed(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        loop, layer = divmod(slot, self.num_layers)
        keys, values = [], []
        late = self.late_rows(0, self.layout.packed)
        for index, group in enumerate(self.groups[layer]):
            recon = [part.read() for part in group[0]]
            for later in range(1, loop + 1):
                if group[later] is None:
                    continue
                picked = self.picked_rows(late, later, index * GROUP, recon[0].device)
                recon = [prior.index_add(2, picked, part.read()) for prior, part in zip(recon, group[later])]
            keys.append(recon[0])
            values.append(recon[1])
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    def packed_tensors(self) -> list[torch.Tensor]:
        tensors = [t for layer in self.groups for group in layer for pair in group if pair is not None
                   for part in pair for t in part.tensors()]
        return tensors + ([self.masks] if self.masks is not None else [])

    def crop(self, tokens_to_remove: int) -> None:
        keep = self._seq_len + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove
        if keep < self.prompt_tokens:
            raise ValueError(f"a FlashLoop cache cannot rewind to {keep} tokens, into its {self.prompt_tokens}-token "
                             "prompt: the prompt's token selection is final")
        super().crop(tokens_to_remove)

    def flashloop_count(self) -> int:
        """FlashLoop's own count of this cache (flashloop_audit_bytes; 0 before anything is held)."""
        first = next((t for t in self.keys if t is not None), None)
        if first is None:
            return 0
        return flashloop_audit_bytes(self.seq_len, self.prompt_tokens, self.loops, self.num_layers, first.shape[1],
                                     first.shape[3], self.selected_per_group())

    def selected_per_group(self) -> list[tuple[int, int]]:
        """(loop-3 rows, loop-4 rows) with a residual in each packed group: what the byte formula
        needs to be exact (flashloop_bytes' `late_rows`)."""
        counts = []
        for start in range(0, self.layout.packed, GROUP):
            late = self.late_rows(start, start + GROUP)
            counts.append(tuple(int(rows.sum()) for rows in late) + (0,) * (2 - self.late))
        return counts


def flashloop_bytes(tokens: int, prompt_tokens: int, loops: int, layers: int, kv_heads: int, head_dim: int,
                    itemsize: int, late_rows: list[tuple[int, int]] | None = None,
                    meta_itemsize: int = torch.empty((), dtype=META_DTYPE).element_size()) -> int:
    """What a FlashLoop cache holds after `tokens` tokens (`prompt_tokens` of them the prompt, the
    rest decoded one at a time): per packed group and layer the anchor, loop 2's residual over all
    64 rows and loops 3/4's over their selected rows (`late_rows`, per packed group; by default
    the selected prompt tokens spread evenly, ceil(64 f) a group, and every decoded row), the
    full-precision rows of every loop, and the bit-packed prompt masks."""
    packed = max(0, (tokens - RESIDUAL) // GROUP) * GROUP
    late = max(0, loops - 2)
    total = 0
    for index, start in enumerate(range(0, packed, GROUP)):
        if late_rows is not None:
            counts = late_rows[index]
        else:
            prompt_rows = max(0, min(GROUP, prompt_tokens - start))
            counts = tuple(min(prompt_rows, math.ceil(GROUP * fraction)) + GROUP - prompt_rows
                           for fraction in FRACTIONS)
        total += quantised_bytes(GROUP, kv_heads, head_dim, meta_itemsize) * min(loops, 2)
        total += sum(quantised_bytes(rows, kv_heads, head_dim, meta_itemsize) for rows in counts[:late])
    total *= layers
    total += layers * loops * 2 * kv_heads * (tokens - packed) * head_dim * itemsize
    return total + (math.ceil(late * prompt_tokens / 8) if late else 0)


def flashloop_audit_bytes(tokens: int, prompt_tokens: int, loops: int, layers: int, kv_heads: int, head_dim: int,
                          late_rows: list[tuple[int, int]] | None = None) -> int:
    """FlashLoop's own count of the same cache (its reference's `audit()`): minima and scales at
    fp16, the full-precision rows at bf16."""
    return flashloop_bytes(tokens, prompt_tokens, loops, layers, kv_heads, head_dim, 2, late_rows, meta_itemsize=2)
