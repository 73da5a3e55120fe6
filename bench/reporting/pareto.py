"""Accuracy against KV memory: which points no other point beats (the Pareto frontier), and, at each
MELT point (its gated shared cache), the best a training-free KV policy does with no more KV bytes
per token. Scores from random weights measure nothing: no verdict is drawn from them (the report
leaves them out). Reads the accuracy rows of the results DataFrame (`model`, `loops`, `value`,
`kv_bytes_per_token` and the metric `kv_policy`: the policy a point ran under)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from melt_bench.models import PRESETS
from melt_bench.models.kv_policy import is_training_free
from melt_bench.reporting.paired import compare_paired, describe, in_unit_range, paired_verdict


def pareto_mask(cost: Sequence[float], value: Sequence[float]) -> list[bool]:
    """True for each point that no other point dominates: none costs no more and scores no less
    while being strictly better in one of the two (equal points are all kept)."""
    points = list(zip(cost, value))
    return [not any(c <= ci and v >= vi and (c < ci or v > vi) for c, v in points) for ci, vi in points]


def training_free_column(frame: pd.DataFrame) -> pd.Series:
    """Per row: True where the point ran a training-free KV policy, False for MELT's gated shared cache
    (MELT). Rows written before policies were recorded fall back on the preset's family."""
    def one(row) -> bool:
        policy = row.get("kv_policy")
        if isinstance(policy, str):
            return is_training_free(policy)
        return PRESETS[row.model_name].family != "melt" if row.get("model_name") in PRESETS else True
    return frame.apply(one, axis=1) if len(frame) else pd.Series(dtype=bool)


def random_weights_column(frame: pd.DataFrame) -> pd.Series:
    """Per row: True where the model ran on a preset's random initialisation (`weights_source`,
    point_setup.weights_origin; rows from before it was recorded: no --weights given)."""
    if not len(frame):
        return pd.Series(dtype=bool)
    given = frame["weights"].notna() if "weights" in frame else pd.Series(False, index=frame.index)
    recorded = frame["weights_source"] if "weights_source" in frame else pd.Series(None, index=frame.index)
    return recorded.eq("random") | (recorded.isna() & ~given)


def kv_cost_per_token(frame: pd.DataFrame) -> pd.Series:
    """Measured KV bytes per token, plus MELT's open-chunk side buffer (decode_reads="chunk")
    spread over one chunk: what a sequence one chunk long holds per token. That is the worst case
    (a longer sequence spreads the buffer thinner) and the case of short tasks, where a chunk-read
    MELT keeps every loop's rows of the open chunk, as much as Ouro does and more."""
    cost = frame.kv_bytes_per_token.astype(float)
    if "kv_side_buffer_bytes_per_sequence" in frame and "chunk_size" in frame:
        side = frame.kv_side_buffer_bytes_per_sequence.fillna(0).astype(float)
        chunk = frame.chunk_size.astype(float).where(side > 0, 1.0)
        cost = cost + side / chunk
    return cost


def matched_memory(frame: pd.DataFrame) -> pd.DataFrame:
    """For every MELT point (the gated shared cache, a learned KV policy), the best training-free point
    (any model, policy and loop count) whose KV bytes per token (kv_cost_per_token) are at most the
    MELT point's: one row each with both values, the difference (training-free minus MELT) and the
    paired comparison over the documents both scored (reporting/paired.py: n, paired SE, 95%
    interval, discordant counts and McNemar p for 0/1 scores, the verdict). Empty when either side
    is."""
    frame = frame[frame.kv_bytes_per_token.notna() & frame.value.notna()]
    frame = frame.assign(kv_bytes_per_token=kv_cost_per_token(frame))
    free = training_free_column(frame)
    gated, rivals = frame[~free], frame[free]
    rows = []
    for _, point in gated.sort_values(["model", "loops"]).iterrows():
        within = rivals[rivals.kv_bytes_per_token <= point.kv_bytes_per_token]
        if within.empty:
            continue
        # the best value; among equals the smaller memory, then the fewer loops
        best = within.sort_values(["value", "kv_bytes_per_token", "loops"], ascending=[False, True, True]).iloc[0]
        ours, theirs = _scores(point), _scores(best)
        paired = compare_paired(theirs, ours)
        rows.append({"MELT (gated shared cache)": point.model, "loops": point.loops, "value": point.value,
                     "KV/token": int(point.kv_bytes_per_token),
                     "best training-free": best.model, "its loops": best.loops, "its value": best.value,
                     "its KV/token": int(best.kv_bytes_per_token), "rivals within": len(within),
                     "difference": best.value - point.value,
                     "n paired": paired.n if paired else None,
                     "paired SE": paired.paired_se if paired else None,
                     "95% interval": paired.interval() if paired else None,
                     "discordant (it / MELT)": (f"{paired.rival_only} / {paired.reference_only}"
                                                   if paired and paired.binary else None),
                     "McNemar p": paired.mcnemar_p if paired else None,
                     "verdict": paired_verdict(paired, in_unit_range(ours) and in_unit_range(theirs)),
                     "evidence": describe(paired)})
    return pd.DataFrame(rows)


def _scores(row) -> list | None:
    scores = row.get("document_scores")
    return scores if isinstance(scores, list) else None


def verdicts(matched: pd.DataFrame, metric: str = "value") -> list[str]:
    """One plain sentence per MELT model, at its best point (highest value, fewest loops):
    whether the best training-free policy with no more KV memory beats it, falls short, matches it
    or is undecided, as the paired 95% interval says (matched_memory), with the figures behind it.
    The interval is that one pair's: it does not correct for the rival being the best of several
    (the sentence says of how many), which favours the rival."""
    lines = []
    for model, rows in matched.groupby("MELT (gated shared cache)", sort=True):
        row = rows.sort_values(["value", "loops"], ascending=[False, True]).iloc[0]
        best = "The best training-free point" if row["rivals within"] == 1 else \
            f"The best of {row['rivals within']} training-free points"
        lines.append(f"{model} at {_loops(row.loops)}: {metric} {row.value:.3f} with {row['KV/token']:,} KV bytes per "
                     f"token. {best} with no more KV memory, {row['best training-free']} at "
                     f"{_loops(row['its loops'])}, scores {row['its value']:.3f} ({row['difference']:+.3f}): it "
                     f"{row['verdict']} ({row['evidence']}).")
    return lines


def _loops(count: int) -> str:
    return f"{count} loop" if count == 1 else f"{count} loops"
