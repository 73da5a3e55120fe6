"""Caches that keep older rows packed (INT4 / INT8 in KIVI's layout, kv_packing.py) and the newest
rows at full precision:

  - `PackedKVCache`: the shared machinery: rows become packable once final, when a forward sets
    `seq_len` at the end of a chunk (a "commit"); reads return the packed rows dequantised and
    the full-precision ones; keys and values may have packed different counts (`offsets`);
  - `QuantizedKVCache` (`--kv-quant int8:flashloop-tail|int4:flashloop-tail`): every slot of any
    model and KV policy, MELT's shared slots included, with FlashLoop's tail rule: the newest
    `residual` to `residual + group - 1` rows stay in a tail, older rows are packed `group` at a
    time, and the tail's capacity follows FlashLoop's engine allocation (its `storage_bytes`, B = 1):
    after the prompt exactly its rows, grown by 16 rows when a commit overflows it (at most
    residual + group), shrunk to its rows + 16 by a pack. `next_layout` is that rule, shared by
    the cache and the byte formulas;
  - KIVI's own rule (`--kv-quant int8|int4`): kivi_cache.py; FlashLoop's computation and cache
    (`--kv-policy flashloop`): flashloop.py.

Attention dequantises on read (eager PyTorch; a fused kernel would read the packed words
directly and never materialise the rows, which changes time, not the bytes held).
"""

from __future__ import annotations

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

    def keep_rows(self, store: list, slot: int, cut: int, rows: int) -> None:
        """`store[slot]` as exactly its `rows` full-precision rows after the first `cut` (as KIVI's
        and FlashLoop's reference caches hold them: no spare capacity)."""
        buf = store[slot]
        if buf is not None and (cut or buf.shape[2] != rows):
            store[slot] = buf[:, :, cut:cut + rows].clone()

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


def quantized_slot_bytes(layout: TailLayout, batch: int, kv_heads: int, head_dim: int, itemsize: int, bits: int,
                         rule: TailRule = TailRule()) -> int:
    """One slot of a QuantizedKVCache: its packed keys and values and its tail at capacity."""
    packed = sum(stream_bytes(kind, layout.packed, batch, kv_heads, head_dim, bits, rule.group)
                 for kind in ("keys", "values"))
    return packed + 2 * batch * kv_heads * layout.capacity * head_dim * itemsize
