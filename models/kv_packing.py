"""KIVI-style packed storage for cached keys and values (INT4 / INT8), as FlashLoop 0.1.0 lays it out.

Keys are quantised per channel over groups of `group` consecutive rows (tokens), values per token
over groups of `group` channels (KIVI's layout: keys have outlier channels, values do not). Each
group stores a float16 minimum and scale; a code is round-half-even((x - min) / scale) clamped to
[0, 2^bits - 1], computed with the float32 min and scale, while the float16 copies are what is
stored and what dequantisation uses (code * scale + min in float32, cast to the row dtype), as
FlashLoop's `kivi_outer` backend does. Codes are packed into int32 words, 32 / bits codes a word,
along the token axis for keys and the channel axis for values; the word count rounds up.

Bytes (B sequences, H kv heads, D = head_dim, n rows, G = group, W = 32 / bits codes per word):
    keys:   4 B H D ceil(n / W)  +  4 B H D ceil(n / G)        (payload + fp16 min and scale)
    values: 4 B H n ceil(D / W)  +  4 B H n ceil(D / G)
`stream_bytes` is that formula; `PackedKeys.nbytes()` / `PackedValues.nbytes()` are the storages.
"""

from __future__ import annotations

import math

import torch

BITS = (4, 8)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def stream_bytes(kind: str, rows: int, batch: int, kv_heads: int, head_dim: int, bits: int, group: int) -> int:
    """Bytes of one packed key ("keys") or value ("values") stream of `rows` rows (0 for none)."""
    if rows == 0:
        return 0
    per_word = 32 // bits
    if kind == "keys":
        return 4 * batch * kv_heads * head_dim * (_ceil(rows, per_word) + _ceil(rows, group))
    return 4 * batch * kv_heads * rows * (_ceil(head_dim, per_word) + _ceil(head_dim, group))


def _quantise(x: torch.Tensor, dim: int, bits: int, group: int, meta_dtype: torch.dtype = torch.float16):
    """Codes (uint8, the shape of x) and min / scale per group of `group` along `dim` (a last
    partial group uses only its own entries), stored in `meta_dtype` (fp16 in KIVI's layout)."""
    x32 = x.float().movedim(dim, -1)
    n = x32.shape[-1]
    pad = _ceil(n, group) * group - n
    grouped = torch.nn.functional.pad(x32, (0, pad)).unflatten(-1, (-1, group))
    valid = (torch.arange(grouped.shape[-2] * group, device=x.device) < n).view(-1, group)
    low = grouped.masked_fill(~valid, math.inf).amin(-1)
    high = grouped.masked_fill(~valid, -math.inf).amax(-1)
    scale = (high - low) / (2**bits - 1)
    scale = torch.where(high > low, scale, torch.ones_like(scale))
    codes = torch.round((grouped - low[..., None]) / scale[..., None]).clamp_(0, 2**bits - 1)
    codes = codes.flatten(-2)[..., :n].to(torch.uint8).movedim(-1, dim)
    return codes, low.to(meta_dtype).movedim(-1, dim), scale.to(meta_dtype).movedim(-1, dim)


def _dequantise(codes: torch.Tensor, low: torch.Tensor, scale: torch.Tensor, dim: int, group: int,
                dtype: torch.dtype) -> torch.Tensor:
    n = codes.shape[dim]
    low = low.float().repeat_interleave(group, dim=dim).narrow(dim, 0, n)
    scale = scale.float().repeat_interleave(group, dim=dim).narrow(dim, 0, n)
    return (codes.float() * scale + low).to(dtype)


def _pack(codes: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """uint8 codes -> int32 words of 32 / bits codes along `dim` (zero-padded), low bits first."""
    per_word = 32 // bits
    c = codes.movedim(dim, -1).to(torch.int32)
    n = c.shape[-1]
    c = torch.nn.functional.pad(c, (0, _ceil(n, per_word) * per_word - n)).unflatten(-1, (-1, per_word))
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1, dtype=torch.int32).movedim(-1, dim)


def _unpack(words: torch.Tensor, dim: int, bits: int, n: int) -> torch.Tensor:
    per_word = 32 // bits
    w = words.movedim(dim, -1)
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * bits
    codes = (w[..., None] >> shifts) & (2**bits - 1)
    return codes.flatten(-2)[..., :n].to(torch.uint8).movedim(-1, dim)


class PackedStream:
    """One packed stream of rows (batch, heads, rows, head_dim), grown by appending rows at the end.
    `axis` is what a group and a word run along: 2 (rows) for keys, 3 (channels) for values.
    Appending keys to a stream whose last group is partial requantises the stream (as FlashLoop
    does), so every key group but the last holds exactly `group` rows."""

    axis = 2

    def __init__(self, bits: int, group: int) -> None:
        self.bits, self.group, self.rows = bits, group, 0
        self.words = self.low = self.scale = None
        self.dtype: torch.dtype | None = None
        self.head_dim = 0

    def append(self, rows: torch.Tensor) -> None:
        if rows.shape[2] == 0:
            return
        if self.axis == 2 and self.rows % self.group:
            rows, self.rows, self.words = torch.cat([self.read(), rows], dim=2), 0, None
        codes, low, scale = _quantise(rows, self.axis, self.bits, self.group)
        words = _pack(codes, self.axis, self.bits)
        if self.words is None:
            self.words, self.low, self.scale = words, low, scale
        else:  # rows run along dim 2 in all three
            self.words = torch.cat([self.words, words], dim=2)
            self.low, self.scale = torch.cat([self.low, low], dim=2), torch.cat([self.scale, scale], dim=2)
        self.rows += rows.shape[2]
        self.dtype, self.head_dim = rows.dtype, rows.shape[3]

    def read(self) -> torch.Tensor:
        """The dequantised rows, in the dtype they were appended in."""
        if self.words is None:
            raise ValueError("an empty packed stream has no rows to read")
        along = self.rows if self.axis == 2 else self.head_dim
        codes = _unpack(self.words, self.axis, self.bits, along)
        return _dequantise(codes, self.low, self.scale, self.axis, self.group, self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.words, self.low, self.scale) if t is not None]

    def map(self, fn) -> None:
        if self.words is not None:
            self.words, self.low, self.scale = fn(self.words), fn(self.low), fn(self.scale)

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.tensors())


class PackedKeys(PackedStream):
    """Keys: per channel, over groups of `group` rows."""

    axis = 2


class PackedValues(PackedStream):
    """Values: per token, over groups of `group` channels."""

    axis = 3
