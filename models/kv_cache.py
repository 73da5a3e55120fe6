"""`LoopedKVCache`: K/V buffers indexed by slot (a KV policy maps (loop, layer) to a slot).

Two modes, both exact about what they hold:
  - preallocated (`capacity` tokens given, gpt-fast style): each slot's buffers are allocated once
    at full capacity (all at once by `allocate()`, or each on its first write), so memory is
    predictable and nothing is copied while decoding;
  - growing (`capacity=None`): buffers are reallocated to exactly the tokens written, as HF's
    DynamicCache does with `torch.cat`.
A write at a position already written overwrites it in place; MELT relies on that to rewrite a
token's row at every loop. It subclasses transformers' `Cache` so `generate()` accepts it.

MELT with decode_reads="chunk" (`open_chunk` = its chunk size C) also keeps a side buffer: the
rows of the open (unfinished) chunk's tokens at every loop, C rows per (loop, slot) at most.
Before a later piece of that chunk runs loop t, `restore_open_chunk` puts the loop-t rows back
into the slot, so the piece reads what one chunked forward would have shown it; after the last
loop the slot holds final rows again. The buffer counts in `nbytes()` (`side_nbytes()` apart).
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache


class LoopedKVCache(Cache):
    """K/V buffers of shape (batch, kv_heads, tokens, head_dim), one pair per slot."""

    def __init__(
        self, num_slots: int, loops: int, capacity: int | None = None, functional: bool = False,
        open_chunk: int | None = None,
    ) -> None:
        super().__init__(layers=[])
        # functional: writes never modify a tensor in place (training: autograd keeps the rows
        # each loop attended to, though MELT rewrites a chunk's rows at every loop).
        self.functional = functional
        self.num_slots = num_slots
        self.loops = loops  # the loop count the slots were laid out for
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * num_slots
        self.values: list[torch.Tensor | None] = [None] * num_slots
        self.seq_len = 0  # tokens whose rows are final (all loops done)
        self.open_chunk = open_chunk  # chunk size C of the side buffer; None: no side buffer
        sides = loops * num_slots if open_chunk else 0
        self.chunk_keys: list[torch.Tensor | None] = [None] * sides  # index loop * num_slots + slot
        self.chunk_values: list[torch.Tensor | None] = [None] * sides

    @property
    def side_rows(self) -> int | None:
        """Rows per (loop, slot) a preallocated side buffer holds: min(C, capacity)."""
        if self.open_chunk is None:
            return None
        return self.open_chunk if self.capacity is None else min(self.open_chunk, self.capacity)

    def allocate(
        self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
        zero: bool = False,
    ) -> None:
        """Allocate every slot's buffers now, back to back (gpt-fast's setup_caches): no
        allocation interleaves with activations later, so the allocator does not fragment.
        `zero` fills them with zeros: attention that reads the whole capacity under a mask
        (the decode engine) must not meet NaN in rows it masks out (0 x NaN = NaN)."""
        if self.capacity is None:
            raise ValueError("only a cache with a capacity can be allocated ahead")
        shape = (batch, kv_heads, self.capacity, head_dim)
        new = torch.zeros if zero else torch.empty
        self.keys = [new(shape, dtype=dtype, device=device) for _ in range(self.num_slots)]
        self.values = [new(shape, dtype=dtype, device=device) for _ in range(self.num_slots)]
        side = (batch, kv_heads, self.side_rows or 0, head_dim)
        self.chunk_keys = [new(side, dtype=dtype, device=device) for _ in self.chunk_keys]
        self.chunk_values = [new(side, dtype=dtype, device=device) for _ in self.chunk_values]

    def update_slot(
        self, slot: int, key: torch.Tensor, value: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write key/value rows at positions [start, start + n) of `slot`; return rows [0, start + n)."""
        end = start + key.shape[2]
        self.keys[slot] = self._write(self.keys[slot], key, start, end, self.capacity)
        self.values[slot] = self._write(self.values[slot], value, start, end, self.capacity)
        return self.keys[slot][:, :, :end], self.values[slot][:, :, :end]

    def rows(self, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [start, end) of `slot`, as written (positions the current
        forward wrote: a packed cache keeps those at full precision until they are final)."""
        return self.keys[slot][:, :, start:end], self.values[slot][:, :, start:end]

    def observe_loop_output(self, loop: int, hidden: torch.Tensor) -> None:
        """The normed output of loop `loop` for the tokens being processed (caches that choose
        what to keep from it, FlashLoop's, override this)."""

    def active_tokens(self, loop: int) -> torch.Tensor | None:
        """Which of the tokens being processed loop `loop` updates (None: all). FlashLoop's prompt
        updates a chosen few at its late loops; the others keep their hidden state."""
        return None

    def attend(self, attention, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """An attention output the cache computes itself from the rows `update_slot` returned
        (None: the layer's usual attention). FlashLoop's decode re-reads loop 2's chosen keys."""
        return None

    def open_chunk_start(self, start: int) -> int:
        """Where the chunk holding cache position `start` begins (on the grid of C from 0)."""
        return start - start % self.open_chunk

    def restore_open_chunk(self, loop: int, slot: int, start: int) -> None:
        """Before loop `loop` of a piece starting at `start` inside an open chunk: the earlier
        tokens of that chunk get their loop-`loop` rows back in `slot` (the side buffer's)."""
        begin = self.open_chunk_start(start)
        if begin == start:
            return
        side = loop * self.num_slots + slot
        self.keys[slot][:, :, begin:start] = self.chunk_keys[side][:, :, :start - begin]
        self.values[slot][:, :, begin:start] = self.chunk_values[side][:, :, :start - begin]

    def save_open_chunk(self, loop: int, slot: int, start: int, end: int) -> None:
        """After loop `loop` wrote rows [start, end) of `slot` (one piece, inside one chunk):
        keep them in the side buffer at their offsets in the chunk."""
        begin, side = self.open_chunk_start(start), loop * self.num_slots + slot
        if end - begin > self.open_chunk:
            raise ValueError(f"a piece [{start}, {end}) crosses the chunk grid of {self.open_chunk}")
        keys, values = self.keys[slot][:, :, start:end], self.values[slot][:, :, start:end]
        rows = None if self.capacity is None else self.side_rows  # growing: exactly the offsets written
        self.chunk_keys[side] = self._write(self.chunk_keys[side], keys, start - begin, end - begin, rows)
        self.chunk_values[side] = self._write(self.chunk_values[side], values, start - begin, end - begin, rows)

    # --- static-shape writes (the decode engine's): the position is a tensor and no buffer is
    # ever reallocated, so the buffers keep their addresses (CUDA graphs replay over them) -------
    def write_at(self, slot: int, position: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """The rows of the token at `position` into `slot`, in place (in the cache's dtype: a cast
        here would cost every per-loop write a call). `position`: a 1-element index tensor (every
        sequence at the same position) or one position per sequence (continuous batching)."""
        if position.numel() == 1:
            self.keys[slot].index_copy_(2, position, key)
            self.values[slot].index_copy_(2, position, value)
        else:
            put_rows(self.keys[slot], position[:, None], key)
            put_rows(self.values[slot], position[:, None], value)

    def open_chunk_window(self, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """decode_reads="chunk" at a tensor position: the cache positions the side buffer's rows
        map to (the open chunk from its start, clamped into the capacity) and the token's offset
        in it; per sequence, (sequences, rows) and (sequences,), when each has its own position.
        Copying all of them keeps shapes fixed; rows past the token are masked out and are
        rewritten before anyone reads them, and a clamped duplicate lands at or past the token."""
        offset = position % self.open_chunk
        rows = torch.arange(self.chunk_keys[0].shape[2], device=position.device)
        window = ((position - offset)[:, None] + rows).clamp(max=self.keys[0].shape[2] - 1)
        return (window[0], offset) if position.numel() == 1 else (window, offset)

    def swap_open_chunk_at(self, loop: int, slot: int, window: torch.Tensor, offset: torch.Tensor,
                           key: torch.Tensor, value: torch.Tensor) -> None:
        """Static-shape restore_open_chunk + save_open_chunk for one token: the open chunk's
        loop-`loop` rows back into `slot` (at `window`), and the token's new rows kept in the side
        buffer (at `offset`)."""
        side = loop * self.num_slots + slot
        if window.dim() == 1:
            self.keys[slot].index_copy_(2, window, self.chunk_keys[side])
            self.values[slot].index_copy_(2, window, self.chunk_values[side])
            self.chunk_keys[side].index_copy_(2, offset, key)
            self.chunk_values[side].index_copy_(2, offset, value)
            return
        put_rows(self.keys[slot], window, self.chunk_keys[side])
        put_rows(self.values[slot], window, self.chunk_values[side])
        put_rows(self.chunk_keys[side], offset[:, None], key)
        put_rows(self.chunk_values[side], offset[:, None], value)

    def lane(self, index: int) -> LoopedKVCache:
        """Sequence `index` of the batch as a cache of its own: views of its rows in every buffer
        (writes land in this cache), with its own `seq_len`, starting at 0. Continuous batching
        prefills a new request into one sequence of a running batch through it."""
        view = copy.copy(self)
        view._map_batch(lambda t: t[index:index + 1])
        view.seq_len = 0
        return view

    def _write(
        self, buf: torch.Tensor | None, rows: torch.Tensor, start: int, end: int, capacity: int | None
    ) -> torch.Tensor:
        if buf is not None and buf.shape[0] != rows.shape[0]:
            raise ValueError(f"cache holds batch {buf.shape[0]}, forward got batch {rows.shape[0]}")
        if self.functional:
            return rows if buf is None or start == 0 else torch.cat([buf[:, :, :start], rows], dim=2)
        if buf is None or buf.shape[2] < end:
            size = end
            if capacity is not None:
                if end > capacity:
                    raise ValueError(f"KV cache capacity {capacity} tokens exceeded (need {end})")
                size = capacity
            grown = rows.new_empty(rows.shape[0], rows.shape[1], size, rows.shape[3])
            if buf is not None:
                grown[:, :, :start] = buf[:, :, :start]
            buf = grown
        buf[:, :, start:end] = rows
        return buf

    # --- exact accounting --------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of device memory the cache's buffers hold right now (side buffer included)."""
        return sum(t.untyped_storage().nbytes() for t in self.keys + self.values if t is not None) + self.side_nbytes()

    def side_nbytes(self) -> int:
        """Bytes the open-chunk side buffer holds (0 without one)."""
        return sum(t.untyped_storage().nbytes() for t in self.chunk_keys + self.chunk_values if t is not None)

    def allocated_slots(self) -> int:
        return sum(t is not None for t in self.keys)

    # --- what transformers' generate() asks of a Cache -----------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1 if self.capacity is None else self.capacity

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seq_len + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.allocated_slots() > 0

    @property
    def batch_size(self) -> int:
        first = next((t for t in self.keys if t is not None), None)
        return 0 if first is None else first.shape[0]

    def reset(self) -> None:
        self.keys = [None] * self.num_slots
        self.values = [None] * self.num_slots
        self.chunk_keys = [None] * len(self.chunk_keys)
        self.chunk_values = [None] * len(self.chunk_values)
        self.seq_len = 0

    def crop(self, tokens_to_remove: int) -> None:
        # HF semantics: a negative number removes that many tokens; a positive one keeps that many.
        keep = self.seq_len + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove
        self.seq_len = max(0, min(self.seq_len, keep))

    def _map_batch(self, fn) -> None:
        self.keys = [None if t is None else fn(t) for t in self.keys]
        self.values = [None if t is None else fn(t) for t in self.values]
        self.chunk_keys = [None if t is None else fn(t) for t in self.chunk_keys]
        self.chunk_values = [None if t is None else fn(t) for t in self.chunk_values]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def __repr__(self) -> str:
        return (
            f"LoopedKVCache(slots={self.num_slots}, loops={self.loops}, seq_len={self.seq_len}, "
            f"capacity={self.capacity}, nbytes={self.nbytes()})"
        )


def put_rows(buffer: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> None:
    """buffer[b, :, positions[b, i]] = rows[b, :, i] for every sequence b: each at positions of
    its own. buffer (batch, heads, tokens, dim), positions (batch, n), rows (batch, heads, n, dim)."""
    batch = torch.arange(buffer.shape[0], device=buffer.device)[:, None]
    buffer[batch, :, positions] = rows.transpose(1, 2)  # indexed, the buffer reads (batch, n, heads, dim)


def open_chunk_grid(cache) -> int | None:
    """The chunk grid C on which `cache` keeps MELT's open-chunk side buffers (decode_reads=
    "chunk"); None for any other cache, and for a functional (training) one."""
    return cache.open_chunk if isinstance(cache, LoopedKVCache) and not cache.functional else None


class TransitionKVCache:
    """MELT's phase-1 ("interpolated transition") cache: Ouro's per-loop rows and MELT's shared
    rows are both kept, and attention reads KV = alpha * KV_MELT + (1 - alpha) * KV_Ouro.
    At alpha = 0 the model attends exactly as Ouro, at alpha = 1 exactly as MELT."""

    def __init__(self, ouro: LoopedKVCache, melt: LoopedKVCache, alpha: float) -> None:
        self.ouro, self.melt, self.alpha = ouro, melt, alpha

    @property
    def seq_len(self) -> int:
        return self.melt.seq_len

    @seq_len.setter
    def seq_len(self, value: int) -> None:
        self.ouro.seq_len = self.melt.seq_len = value

    def update_mixed(
        self, slots: tuple[int, int], ouro_rows: tuple[torch.Tensor, torch.Tensor],
        melt_rows: tuple[torch.Tensor, torch.Tensor], start: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_o, v_o = self.ouro.update_slot(slots[0], *ouro_rows, start)
        k_m, v_m = self.melt.update_slot(slots[1], *melt_rows, start)
        a = self.alpha
        return a * k_m + (1 - a) * k_o, a * v_m + (1 - a) * v_o
