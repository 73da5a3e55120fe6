"""KIVI's KV cache (`--kv-quant int8|int4`): every slot of any model and KV policy packed as KIVI
packs one layer's cache (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache", arXiv 2402.02750; its code, `jy-yuan/KIVI`, `models/llama_kivi.py`), with residual length
R = group G = 64:

  - keys are packed per channel in groups of G rows once G of them are final, so the T mod G
    newest keys are at full precision (KIVI's prefill keeps T mod R; a decode step packs the
    full-precision keys when they reach R);
  - values are packed per token once they leave a sliding window of the G newest (KIVI's prefill
    keeps the last R; a decode step packs the oldest when the window holds R + 1).

After T final tokens a slot holds floor(T / G) G packed keys and max(0, T - G) packed values, and
its full-precision keys and values exactly as rows as KIVI's `torch.cat` leaves them; the packing
itself (codes, fp16 minimum and scale, int32 words) is kv_packing.py's, shared with FlashLoop's.
A row is packed when it is final, when a forward moves `seq_len` on, so the token being computed
always reads its own rows at full precision, as in KIVI, where a step quantises after attending.
FlashLoop's tail rule (the newest 64-127 rows of keys and values alike) stays available as
`int8:flashloop-tail` / `int4:flashloop-tail` (packed_cache.QuantizedKVCache).
"""

from __future__ import annotations

import torch

from .kv_packing import stream_bytes
from .packed_cache import PackedKVCache, QuantizedKVCache, TailRule, quant_bits, quant_tail


def kivi_packed_rows(tokens: int, group: int = TailRule.group) -> tuple[int, int]:
    """(packed keys, packed values) of a KIVI slot holding `tokens` final tokens."""
    return tokens // group * group, max(0, tokens - group)


def kivi_slot_bytes(tokens: int, batch: int, kv_heads: int, head_dim: int, itemsize: int, bits: int,
                    group: int = TailRule.group) -> int:
    """One KIVI slot after `tokens` final tokens: the packed keys and values (kv_packing's
    formula) and the full-precision rows of each."""
    keys, values = kivi_packed_rows(tokens, group)
    packed = (stream_bytes("keys", keys, batch, kv_heads, head_dim, bits, group)
              + stream_bytes("values", values, batch, kv_heads, head_dim, bits, group))
    return packed + batch * kv_heads * head_dim * itemsize * ((tokens - keys) + (tokens - values))


class KiviKVCache(QuantizedKVCache):
    """KIVI's cache for every slot (module docstring): keys and values each keep their own packed
    stream and full-precision rows; their packed counts differ, so each has its own offset."""

    def clear_packed(self) -> None:
        super().clear_packed()
        self.packed_counts = (0, 0)

    def offsets(self) -> tuple[int, int]:
        return self.packed_counts

    def _commit(self, rows: int) -> None:
        tokens = getattr(self, "_seq_len", 0) + rows
        before = self.packed_counts  # packed rows stay packed (after a rewind, too)
        after = tuple(max(done, due) for done, due in zip(before, kivi_packed_rows(tokens, self.rule.group)))
        for slot in range(self.num_slots):
            if self.keys[slot] is None:
                continue
            for kind, (store, streams) in enumerate(((self.keys, self.packed_keys), (self.values, self.packed_values))):
                pack = after[kind] - before[kind]
                if pack:
                    streams[slot].append(store[slot][:, :, :pack])
                self.keep_rows(store, slot, pack, tokens - after[kind])
        self.packed_counts = after

    def read_packed(self, slot: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        keys, values = self.packed_keys[slot], self.packed_values[slot]
        return keys.read() if keys.rows else None, values.read() if values.rows else None


def quantized_cache(config, num_slots: int, loops: int, capacity: int | None) -> PackedKVCache | None:
    """The config's `kv_quant` cache (KIVI's for "int8" / "int4", FlashLoop's tail rule for
    "int8:flashloop-tail" / "int4:flashloop-tail"), or None for full-precision rows."""
    mode = getattr(config, "kv_quant", None)
    bits = quant_bits(mode)
    if bits is None:
        return None
    if quant_tail(mode) == "kivi":
        return KiviKVCache(num_slots, loops, bits, capacity)
    return QuantizedKVCache(num_slots, loops, bits, capacity)
