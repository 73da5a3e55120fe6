"""Tiny tasks that need several reasoning steps, for proving the MELT conversion on a CPU."""

from __future__ import annotations

import json
import random
from pathlib import Path


def addition_example(a: int, b: int) -> dict:
    return {"question": f"{a}+{b}", "answer": f"#### {a + b}"}


def write_addition(out_dir: Path, digits: int = 2, train: int = 4000, test: int = 200, seed: int = 0) -> Path:
    """DIR/addition/{train,test}.jsonl: sums of two `digits`-digit numbers; the test pairs never
    appear in the training split (held out)."""
    rng = random.Random(seed)
    low, high = 10 ** (digits - 1), 10**digits - 1
    pairs = {(rng.randint(low, high), rng.randint(low, high)) for _ in range(4 * (train + test))}
    pairs = sorted(pairs)
    rng.shuffle(pairs)
    if len(pairs) < train + test:
        raise ValueError(f"only {len(pairs)} distinct pairs of {digits}-digit numbers")
    folder = out_dir / "addition"
    folder.mkdir(parents=True, exist_ok=True)
    for name, chunk in (("test", pairs[:test]), ("train", pairs[test : test + train])):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for a, b in chunk:
                handle.write(json.dumps(addition_example(a, b)) + "\n")
    return folder
