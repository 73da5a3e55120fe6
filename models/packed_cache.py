"""Caches that keep older rows packed (INT4 / INT8 in KIVI's layout, kv_packing.py) and the newest
rows at full precision in a tail:

  - `QuantizedKVCache` (`--kv-quant int8|int4`): every slot of any model and KV policy, MELT's
    shared slots included, packed as it is;
  - `FlashLoopCache` (`--kv-policy flashloop`): FlashLoop 0.1.0's cross-loop cache for Ouro
    (arXiv 2609.29812, PyPI `flashloop`, `CrossLoopKVLayer`): per layer, loop 1's rows as an INT4
    anchor, loop 2 as an INT4 residual over the reconstructed loop 1, loops 3 and 4 as INT4
    residuals for the selected prompt tokens only (the top 25% / 10% by how much the token's
    hidden state moved at that loop, nested, the last prompt token always in), every decoded
    token with residuals for all loops. A token without a loop-3 (4) residual reads its loop-2
    (3) reconstruction there.

A row becomes packable once it is final: when a forward sets `seq_len` at the end of a chunk
(a "commit"). The tail keeps the newest `residual` to `residual + group - 1` rows; older rows are
packed `group` at a time. Tail capacity follows FlashLoop's allocation, so the bytes equal its
`storage_bytes` (B = 1, its only batch): after the prompt the tail holds exactly its rows; a
later commit that overflows it grows it by 16 rows (at most residual + group); packing shrinks it
to its rows + 16. `next_layout` is that rule, shared by the caches and the byte formulas.
Attention dequantises on read (eager PyTorch; a fused kernel would read the packed words
directly and never materialise the rows, which changes time, not the bytes held).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kv_cache import LoopedKVCache
from .kv_packing import PackedKeys, PackedValues, stream_bytes
from .names import KV_QUANT


def quant_bits(mode: str | None) -> int | None:
    """4 or 8 for "int4" / "int8" (and their ":flashloop-tail" forms); None for full precision."""
    return None if mode in (None, "none") else int(mode.removeprefix("int").partition(":")[0])


def quant_tail(mode: str | None) -> str | None:
    """Which rows a quantised cache keeps at full precision: "kivi" (KIVI's rule, kivi_cache.py:
    the T mod 64 newest keys and the 64 newest values; "int8" / "int4") or "flashloop-tail"
    (FlashLoop's: the newest 64-127 rows of both; "int8:flashloop-tail"); None unquantised."""
    if quant_bits(mode) is None:
        return None
    return mode.partition(":")[2] or "kivi"


QUANT_TAIL_RULES = {
    "kivi": "KIVI's rule: keys packed 64 rows at a time (the T mod 64 newest at full precision), values packed "
            "once they leave a window of the 64 newest",
    "flashloop-tail": "FlashLoop's tail rule: the newest 64-127 rows of keys and values at full precision",
}


def selected_count(fraction: float, prompt_tokens: int) -> int:
    """How many prompt tokens FlashLoop keeps a late-loop residual for: max(1, ceil(f x P))."""
    return max(1, math.ceil(prompt_tokens * fraction))


def check_kv_quant(mode: str | None, kv_policy: str, decode_reads: str | None = None) -> None:
    """ValueError unless `mode` is a KV quantisation this policy / decode mode can take."""
    if mode in (None, "none"):
        return
    if mode not in KV_QUANT:
        raise ValueError(f"kv_quant must be one of {', '.join(KV_QUANT)}, got {mode!r}")
    if kv_policy == "flashloop":
        raise ValueError(f"kv_quant={mode} on flashloop: FlashLoop's cache is INT4 already (its residual coding "
                         "is its quantisation)")
    if decode_reads == "chunk":
        raise ValueError(f"kv_quant={mode} with decode_reads=chunk: the side buffer rewrites rows of the open "
                         "chunk, which a packed cache has already packed")


def quantized_cache(config, num_slots: int, loops: int, capacity: int | None) -> PackedKVCache | None:
    """The config's `kv_quant` cache (KIVI's for "int8" / "int4", FlashLoop's tail rule for
    "int8:flashloop-tail" / "int4:flashloop-tail"), or None for full-precision rows."""
    mode = getattr(config, "kv_quant", None)
    bits = quant_bits(mode)
    if bits is None:
        return None
    if quant_tail(mode) == "kivi":
        from .kivi_cache import KiviKVCache  # it builds on this module's PackedKVCache

        return KiviKVCache(num_slots, loops, bits, capacity)
    return QuantizedKVCache(num_slots, loops, bits, capacity)


@dataclass(frozen=True)
class TailRule:
    """FlashLoop 0.1.0's defaults (it refuses any other group, residual or bit width)."""

    group: int = 64
    residual: int = 64
    growth: int = 16


@dataclass(frozen=True)
class TailLayout:
    packed: int = 0  # rows packed so far (positions [0, packed))
    tail: int = 0  # final rows in the tail (positions [packed, packed + tail))
    capacity: int = 0  # rows the tail buffers hold
    started: bool = False  # the first commit (the prompt) is done


def next_layout(layout: TailLayout, new_rows: int, rule: TailRule) -> tuple[TailLayout, int]:
    """The layout once `new_rows` final rows join the tail, and how many rows are packed now."""
    tail, capacity = layout.tail + new_rows, layout.capacity
    pack = max(0, (tail - rule.residual) // rule.group) * rule.group
    if not layout.started:  # the prompt: everything but the last residual..residual+group-1 rows
        tail -= pack
        return TailLayout(layout.packed + pack, tail, tail, True), pack
    if tail > capacity:
        capacity = max(tail, min(rule.residual + rule.group, capacity + rule.growth))
    if pack:
        tail -= pack
        capacity = min(capacity, rule.residual + rule.group, tail + rule.growth)
    return TailLayout(layout.packed + pack, tail, capacity, True), pack


def layout_after(commits: list[int], rule: TailRule = TailRule()) -> TailLayout:
    """The layout after commits of these row counts (the prompt's chunks, then decoded tokens)."""
    layout = TailLayout()
    for rows in commits:
        layout, _ = next_layout(layout, rows, rule)
    return layout


def commits_for(tokens: int, prompt_tokens: int | None, chunk: int | None) -> list[int]:
    """The commits a cache of `tokens` tokens saw: the prompt in chunks of `chunk` (one piece
    when None), then one decoded token at a time."""
    prompt = tokens if prompt_tokens is None else min(prompt_tokens, tokens)
    step = chunk or prompt or 1
    pieces = [min(step, prompt - start) for start in range(0, prompt, step)]
    return pieces + [1] * (tokens - prompt)


class PackedKVCache(LoopedKVCache):
    """A LoopedKVCache whose `keys` / `values` hold only the tail (positions from `packed` on);
    subclasses pack rows and read them back. Always grows (nothing is allocated ahead)."""

    batch_one = False  # True: one sequence only (FlashLoop's)

    def __init__(self, num_slots: int, loops: int, capacity: int | None = None, rule: TailRule = TailRule()) -> None:
        self.rule, self.layout = rule, TailLayout()
        super().__init__(num_slots, loops, capacity)

    # --- the commit: rows become final when a forward moves seq_len on ------------------------
    @property
    def seq_len(self) -> int:
        return self._seq_len

    @seq_len.setter
    def seq_len(self, value: int) -> None:
        done = getattr(self, "_seq_len", 0)
        if value > done:
            self._commit(value - done)
        self._seq_len = value

    def _commit(self, rows: int) -> None:
        before = self.layout
        self.before_pack(before, rows)
        self.layout, pack = next_layout(before, rows, self.rule)
        if pack:
            self.pack(pack)
        keep = slice(pack, pack + self.layout.tail)
        for store in (self.keys, self.values):
            for slot, buf in enumerate(store):
                if buf is not None:  # a tail of exactly `capacity` rows, as FlashLoop allocates it
                    shape = (*buf.shape[:2], self.layout.capacity, buf.shape[3])
                    tail = buf.new_empty(shape)
                    tail[:, :, :self.layout.tail] = buf[:, :, keep]
                    store[slot] = tail
        self.after_pack(pack)

    def before_pack(self, before: TailLayout, rows: int) -> None:
        """Hook: the `rows` rows after the tail's `before.tail` just became final (nothing packed yet)."""

    def pack(self, rows: int) -> None:
        """Pack tail rows [0, rows) of every slot (positions [packed - rows, packed))."""
        raise NotImplementedError

    def after_pack(self, rows: int) -> None:
        """Hook: `rows` rows were packed and the tails cut to the new layout."""

    def read_packed(self, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        raise NotImplementedError

    def packed_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    # --- reads and writes ------------------------------------------------------------------
    def offsets(self) -> tuple[int, int]:
        """Rows packed so far, of keys and of values: positions below them are packed, the rest in
        the full-precision rows (one count here; KIVI's differ)."""
        return self.layout.packed, self.layout.packed

    def update_slot(self, slot: int, key: torch.Tensor, value: torch.Tensor, start: int):
        end = start + key.shape[2]
        if min(self.offsets()) > start:
            raise ValueError(f"positions from {start} are packed: a packed KV cache cannot rewrite them")
        if self.capacity is not None and end > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} tokens exceeded (need {end})")
        if key.shape[0] != 1 and self.batch_one:
            raise ValueError(f"{type(self).__name__} holds one sequence (FlashLoop 0.1.0 runs batch 1), "
                             f"got {key.shape[0]}")
        packed = self.read_packed(slot) if any(self.offsets()) else (None, None)
        out = []
        for kind, (store, rows, done) in enumerate(zip((self.keys, self.values), (key, value), self.offsets())):
            if start < done:
                raise ValueError(f"positions from {start} are packed: a packed KV cache cannot rewrite them")
            store[slot] = self._write(store[slot], rows, start - done, end - done, None)
            recent = store[slot][:, :, :end - done]
            out.append(recent if packed[kind] is None else torch.cat([packed[kind], recent], dim=2))
        return out[0], out[1]

    def rows(self, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys_done, values_done = self.offsets()
        if start < max(keys_done, values_done):
            raise ValueError(f"positions from {start} are packed")
        return (self.keys[slot][:, :, start - keys_done:end - keys_done],
                self.values[slot][:, :, start - values_done:end - values_done])

    def allocate(self, *args, **kwargs) -> None:
        """Nothing to allocate ahead: a packed cache grows as it packs (as FlashLoop's)."""

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.untyped_storage().nbytes() for t in self.packed_tensors())

    def reset(self) -> None:
        super().reset()
        self.layout = TailLayout()
        self._seq_len = 0
        self.clear_packed()

    def clear_packed(self) -> None:
        raise NotImplementedError

    def crop(self, tokens_to_remove: int) -> None:
        """Rewind (HF semantics) within the tail; packed rows cannot be unpacked as they were
        (ValueError: start a new cache instead)."""
        keep = self._seq_len + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove
        keep = max(0, min(self._seq_len, keep))
        if keep < max(self.offsets()):
            raise ValueError(f"a packed KV cache cannot rewind to {keep} tokens: rows up to {max(self.offsets())} "
                             "are packed")
        tail = keep - self.layout.packed
        self.layout = TailLayout(self.layout.packed, tail, self.layout.capacity, self.layout.started)
        self._seq_len = keep


class QuantizedKVCache(PackedKVCache):
    """Every slot's rows packed to `bits` bits (KIVI's layout, kv_packing.py) once final, the newest
    64-127 in the tail as FlashLoop keeps them (`int8:flashloop-tail`; KIVI's own rule:
    kivi_cache.py)."""

    def __init__(self, num_slots: int, loops: int, bits: int, capacity: int | None = None,
                 rule: TailRule = TailRule()) -> None:
        self.bits = bits
        super().__init__(num_slots, loops, capacity, rule)
        self.clear_packed()

    def clear_packed(self) -> None:
        self.packed_keys = [PackedKeys(self.bits, self.rule.group) for _ in range(self.num_slots)]
        self.packed_values = [PackedValues(self.bits, self.rule.group) for _ in range(self.num_slots)]

    def pack(self, rows: int) -> None:
        for slot in range(self.num_slots):
            if self.keys[slot] is not None:
                self.packed_keys[slot].append(self.keys[slot][:, :, :rows])
                self.packed_values[slot].append(self.values[slot][:, :, :rows])

    def read_packed(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.packed_keys[slot].read(), self.packed_values[slot].read()

    def packed_tensors(self) -> list[torch.Tensor]:
        return [t for stream in self.packed_keys + self.packed_values for t in stream.tensors()]

    def _map_batch(self, fn) -> None:
        super()._map_batch(fn)
        for stream in self.packed_keys + self.packed_values:
            stream.map(fn)


def _select(scores: torch.Tensor, fraction: float, eligible: torch.Tensor) -> torch.Tensor:
    """FlashLoop's `select_prefill_tokens` (batch 1): the last token, then the top-scored eligible
    tokens up to max(1, ceil(fraction x tokens)) in all."""
    tokens = scores.shape[-1]
    chosen = torch.zeros(tokens, dtype=torch.bool, device=scores.device)
    chosen[-1] = True
    candidates = torch.nonzero(eligible, as_tuple=False).flatten()
    candidates = candidates[candidates != tokens - 1]
    take = min(selected_count(fraction, tokens), candidates.numel() + 1) - 1
    if take > 0:
        chosen[candidates[torch.topk(scores[candidates].float(), k=take).indices]] = True
    return chosen


class FlashLoopCache(PackedKVCache):
    """FlashLoop 0.1.0's cache (see the module docstring) for Ouro's per-loop slots
    (slot = loop x layers + layer), 1 to 4 loops, one sequence. Per layer it holds what
    `CrossLoopKVLayer.storage_bytes` counts: the packed streams, per late loop (3, 4) the packed
    positions that have a residual (int32) and a rank map over the packed rows (int32, -1 for
    none), and the tail's flags of which rows are residual-carrying (bool)."""

    batch_one = True
    FRACTIONS = (0.25, 0.10)  # loops 3 and 4: the share of prompt tokens keeping a residual

    def __init__(self, num_slots: int, loops: int, capacity: int | None = None, rule: TailRule = TailRule()) -> None:
        if not 1 <= loops <= 4:
            raise ValueError(f"flashloop: FlashLoop 0.1.0 defines loops 1-4, got {loops}")
        self.num_layers = num_slots // loops
        self.late = loops - 2 if loops > 2 else 0  # late loops (3, 4) present
        super().__init__(num_slots, loops, capacity, rule)
        self.clear_packed()
        self._previous: torch.Tensor | None = None
        self._scores: list[torch.Tensor | None] = [None, None]
        self.active: list[torch.Tensor | None] = [None] * self.late  # per late loop, over the tail (1, rows)

    def clear_packed(self) -> None:
        self.streams = [[(PackedKeys(4, self.rule.group), PackedValues(4, self.rule.group)) for _ in range(self.loops)]
                        for _ in range(self.num_layers)]
        # per layer and late loop: packed positions with a residual, and the rank map over packed rows
        self.positions = [[torch.zeros(0, dtype=torch.int32) for _ in range(self.late)] for _ in range(self.num_layers)]
        self.ranks = [[torch.zeros(0, dtype=torch.int32) for _ in range(self.late)] for _ in range(self.num_layers)]
        self.flags = [[None] * self.late for _ in range(self.num_layers)]  # per layer: the tail flags (1, capacity)

    def slot(self, loop: int, layer: int) -> int:
        return loop * self.num_layers + layer

    # --- selection, from the prompt's per-loop hidden states --------------------------------
    def observe_loop_output(self, loop: int, hidden: torch.Tensor) -> None:
        if self.layout.started or loop > 2:
            return
        if loop > 0:  # how far the token moved at this loop: ||h_t - h_t-1|| / ||h_t||, in fp32
            h, prev = hidden[0].float(), self._previous[0].float()
            self._scores[loop - 1] = (h - prev).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12)
        self._previous = hidden

    def before_pack(self, before: TailLayout, rows: int) -> None:
        """Flag which of the new rows keep loop-3 / loop-4 residuals: for the prompt (the first
        commit) the selected tokens, whose unselected rows take the loop before's; for decoded
        tokens all."""
        if not before.started:
            self.prompt_tokens = rows
        if not self.late:
            return
        device = self.keys[0].device
        if not before.started:
            eligible, new = torch.ones(rows, dtype=torch.bool, device=device), []
            for index in range(self.late):
                scores = self._scores[index]
                eligible = _select(torch.zeros(rows, device=device) if scores is None else scores,
                                   self.FRACTIONS[index], eligible)
                new.append(eligible)
            self._keep_selected_rows(new)
        else:
            new = [torch.ones(rows, dtype=torch.bool, device=device)] * self.late
        empty = torch.zeros(0, dtype=torch.bool, device=device)
        self.active = [torch.cat([(old if old is not None else empty)[:before.tail], flags])
                       for old, flags in zip(self.active, new)]
        self._previous, self._scores = None, [None, None]

    prompt_tokens = 0

    def late_rows_in_tail(self) -> tuple[int, int]:
        """Per late loop (3, 4), the selected prompt tokens still in the tail: what the byte
        formula needs to be exact (predict_kv_cache_bytes' `late_rows_in_tail`)."""
        prompt_in_tail = max(0, self.prompt_tokens - self.layout.packed)
        counts = [int(flags[:prompt_in_tail].sum()) for flags in self.active] if self.late else []
        return tuple(counts + [0] * (2 - len(counts)))

    def _keep_selected_rows(self, chosen: list[torch.Tensor]) -> None:
        """A prompt token without a loop-3 (4) residual holds its loop-2 (3) rows there, as
        FlashLoop's sparse prefill leaves them (its inactive tokens keep the previous loop's K/V)."""
        for index, selected in enumerate(chosen):
            loop = index + 2
            drop = torch.nonzero(~selected, as_tuple=False).flatten()
            for layer in range(self.num_layers):
                src, dst = self.slot(loop - 1, layer), self.slot(loop, layer)
                for store in (self.keys, self.values):
                    store[dst][:, :, drop] = store[src][:, :, drop]

    def pack(self, rows: int) -> None:
        start = self.layout.packed - rows
        for layer in range(self.num_layers):
            slots = [self.slot(loop, layer) for loop in range(self.loops)]
            anchor_k, anchor_v = self.streams[layer][0]
            anchor_k.append(self.keys[slots[0]][:, :, :rows])
            anchor_v.append(self.values[slots[0]][:, :, :rows])
            recon = [anchor_k.read()[:, :, -rows:], anchor_v.read()[:, :, -rows:]]
            if self.loops > 1:
                recon = self._append_residual(layer, 1, slots[1], torch.arange(rows, device=recon[0].device), recon)
            for index in range(self.late):
                picked = torch.nonzero(self.active[index][:rows], as_tuple=False).flatten()
                base = [r[:, :, picked] for r in recon]
                if index == 1:  # loop 4 builds on the loop-3 reconstruction of its (nested) tokens
                    within = torch.searchsorted(torch.nonzero(self.active[0][:rows], as_tuple=False).flatten(), picked)
                    base = [r[:, :, within] for r in self._late_recon]
                self._late_recon = self._append_residual(layer, index + 2, slots[index + 2], picked, base)
                count = self.positions[layer][index].numel()
                ranks = torch.full((rows,), -1, dtype=torch.int32, device=picked.device)
                ranks[picked] = torch.arange(count, count + picked.numel(), dtype=torch.int32, device=picked.device)
                self.positions[layer][index] = torch.cat([self.positions[layer][index].to(picked.device),
                                                          (picked + start).to(torch.int32)])
                self.ranks[layer][index] = torch.cat([self.ranks[layer][index].to(picked.device), ranks])
        self.active = [a[rows:] for a in self.active]

    def _append_residual(self, layer: int, loop: int, slot: int, picked: torch.Tensor,
                         base: list[torch.Tensor]) -> list[torch.Tensor]:
        """Append loop `loop`'s rows of the picked tail rows as INT4 residuals over `base` (their
        reconstruction at the loop before); returns their reconstruction at this loop."""
        keys_stream, values_stream = self.streams[layer][loop]
        if picked.numel() == 0:
            return [prior[:, :, :0] for prior in base]
        out = []
        for stream, store, prior in ((keys_stream, self.keys, base[0]), (values_stream, self.values, base[1])):
            residual = store[slot][:, :, picked] - prior
            stream.append(residual)
            out.append(prior + stream.read()[:, :, stream.rows - picked.numel():])
        return out

    def after_pack(self, rows: int) -> None:
        for layer in range(self.num_layers):
            for index in range(self.late):
                flags = torch.zeros((1, self.layout.capacity), dtype=torch.bool, device=self.active[index].device)
                flags[0, :self.layout.tail] = self.active[index][:self.layout.tail]
                self.flags[layer][index] = flags

    def read_packed(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        loop, layer = divmod(slot, self.num_layers)
        keys_stream, values_stream = self.streams[layer][0]
        recon = [keys_stream.read(), values_stream.read()]
        for later in range(1, loop + 1):
            keys_stream, values_stream = self.streams[layer][later]
            if later == 1:
                recon = [recon[0] + keys_stream.read(), recon[1] + values_stream.read()]
            elif keys_stream.rows:
                where = self.positions[layer][later - 2].long()
                recon = [r.index_add(2, where, s.read()) for r, s in zip(recon, (keys_stream, values_stream))]
        return recon[0], recon[1]

    def packed_tensors(self) -> list[torch.Tensor]:
        tensors = [t for layer in self.streams for pair in layer for stream in pair for t in stream.tensors()]
        for layer in range(self.num_layers):
            tensors += [t for t in self.positions[layer] + self.ranks[layer] if t.numel()]
            tensors += [t for t in self.flags[layer] if t is not None]
        return tensors


def flashloop_layer_bytes(layout: TailLayout, loops: int, late_rows: tuple[int, int], kv_heads: int, head_dim: int,
                          itemsize: int, rule: TailRule = TailRule()) -> int:
    """`CrossLoopKVLayer.storage_bytes` of one layer (batch 1): packed anchor and loop-2 residual
    over all packed rows, loop-3/4 residuals over `late_rows`, the bf16 tail of every loop at its
    capacity, and per late loop the residual positions (int32), the rank map (int32 per packed
    row) and the tail flags (bool per tail row)."""
    def pair(rows: int) -> int:
        return sum(stream_bytes(kind, rows, 1, kv_heads, head_dim, 4, rule.group) for kind in ("keys", "values"))

    late = max(loops - 2, 0)
    total = pair(layout.packed) * min(loops, 2) + sum(pair(rows) for rows in late_rows[:late])
    total += loops * 2 * kv_heads * layout.capacity * head_dim * itemsize
    return total + sum(4 * rows for rows in late_rows[:late]) + late * (4 * layout.packed + layout.capacity)


def quantized_slot_bytes(layout: TailLayout, batch: int, kv_heads: int, head_dim: int, itemsize: int, bits: int,
                         rule: TailRule = TailRule()) -> int:
    """One slot of a QuantizedKVCache: its packed keys and values and its tail at capacity."""
    packed = sum(stream_bytes(kind, layout.packed, batch, kv_heads, head_dim, bits, rule.group)
                 for kind in ("keys", "values"))
    return packed + 2 * batch * kv_heads * layout.capacity * head_dim * itemsize
