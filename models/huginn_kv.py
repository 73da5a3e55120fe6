"""Huginn's KV cache lookup strategies as KV policies: which cache slot each layer index writes.

Huginn's official cache (`HuginnDynamicCache`, raven_modeling_minimal.py) keys rows by a layer
index: prelude layer p is p, core layer j at recurrence step s is P + 4s + j (P = 2 prelude
layers, 4 core layers), coda layer c is -(c + 1). A lookup strategy remaps the core indices
before a row is written and read back, so a token's later steps overwrite its earlier ones and
later tokens read what was written last:

    full              every index its own slot: 2 + 4T + 2 rows per token at T steps (Ouro's per-loop)
    compress-sN       core index i -> P + (i - P) mod N: N core slots (compress-s4 keeps one per
                      core layer, the last step's rows: Ouro's last-loop)
    compress-rN       core index i -> P + (i - P) // N: ceil(4T / N) core slots, N consecutive
                      layer-steps sharing one
    compress-anchor   the first 8 steps keep their own slots, every later step shares 4 more
    latest-m4         the storage of full; it differs from full only in what a token reads of
                      earlier tokens that exited at fewer steps (per-token exit), which
                      melt-bench does not run: at a fixed depth it is full

The slot numbering is dense (prelude, core, coda), so a preallocated `LoopedKVCache` with
`num_slots(steps)` slots holds exactly these rows; the official formulas are written for P = 2
and 4 core layers and are generalised here with P and the core size. Prefill under a compress
strategy equals full (every prompt token writes and reads its own rows at each step); decoding
reads earlier tokens' last-written rows."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property

from .names import HUGINN_KV_POLICIES, UnknownKVPolicyError, is_huginn_kv_policy  # noqa: F401  (re-exported)

ANCHOR_STEPS = 8  # compress-anchor: the steps that keep their own slots (official: 4 * 8 indices)


@dataclass(frozen=True)
class HuginnKVPolicy:
    name: str
    prelude: int = 2
    core: int = 4
    coda: int = 2
    chunk_size = None  # (what the harness asks of every policy: Huginn prefills in one piece,
    open_chunk = None  # keeps no side buffer and no combination of steps)
    reduces_loops = False
    training_free = True  # every strategy runs on the released weights unchanged

    def shares_rows(self, steps: int) -> bool:
        """Whether a token keeps fewer core rows than one per (step, layer): a token processed
        after it then reads shared rows (a prompt prefilled in pieces is no longer exact)."""
        return self.core_slots(steps) < self.core * steps

    def alters_rows(self, steps: int) -> bool:
        """Whether a later token reads earlier tokens' rows other than each step computed them
        (Huginn's strategies drop rows, they never combine or quantise them: shares_rows)."""
        return self.shares_rows(steps)

    @cached_property  # (slot() asks at every layer call)
    def stage(self) -> int | None:
        """N of compress-sN / compress-rN."""
        found = re.fullmatch(r"compress-[sr](\d+)", self.name)
        return int(found.group(1)) if found else None

    def core_slots(self, steps: int) -> int:
        indices = self.core * steps
        if self.name.startswith("compress-s"):
            return min(self.stage, indices)
        if self.name.startswith("compress-r"):
            return math.ceil(indices / self.stage)
        if self.name == "compress-anchor":
            anchored = self.core * ANCHOR_STEPS
            return indices if indices <= anchored else anchored + self.core
        return indices

    def num_slots(self, steps: int) -> int:
        return self.prelude + self.core_slots(steps) + self.coda

    def slot(self, index: int, steps: int) -> int:
        """The slot of layer index `index` (Huginn's numbering, above) in a run of `steps` steps."""
        if index < 0:  # coda: after the core's slots
            return self.prelude + self.core_slots(steps) + (-index - 1)
        if index < self.prelude:
            return index
        core = index - self.prelude
        if self.name.startswith("compress-s"):
            core %= self.stage
        elif self.name.startswith("compress-r"):
            core //= self.stage
        elif self.name == "compress-anchor" and core >= self.core * ANCHOR_STEPS:
            anchored = self.core * ANCHOR_STEPS
            core = anchored + (core - anchored) % self.core
        return self.prelude + core

    def kv_bytes_per_token(self, steps: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
        """Bytes one token's keys and values take: every slot holds one row of each per token."""
        return self.num_slots(steps) * 2 * kv_heads * head_dim * itemsize


def parse_huginn_kv_policy(name: str, prelude: int = 2, core: int = 4, coda: int = 2) -> HuginnKVPolicy:
    """The policy named as Huginn names it, or one of Ouro's policies that has a Huginn
    equivalent (per-loop: full; last-loop: compress-s<core layers>); UnknownKVPolicyError (one
    line) otherwise."""
    name = {"per-loop": "full", "last-loop": f"compress-s{core}"}.get(name, name)
    if is_huginn_kv_policy(name):
        return HuginnKVPolicy(name, prelude, core, coda)
    raise UnknownKVPolicyError(f"unknown Huginn KV policy {name!r}: choose from {', '.join(HUGINN_KV_POLICIES)}")
