"""Two accuracy runs over the same documents, compared pairwise: per-document differences, their
standard error, a 95% interval, and for 0/1 scores the discordant documents and an exact McNemar
test. Two runs of one task score the same questions, so their scores are correlated; the paired
standard error takes that into account, where comparing each run's own standard error does not.

The 95% interval: for 0/1 scores Agresti and Min's (2005) adjusted Wald interval for paired
proportions (half a document added to each cell of the 2 x 2 table, so it keeps its coverage at a
handful of discordant documents, where the plain Wald interval collapses to a point), otherwise
the normal interval of the mean difference, and none below MIN_DOCUMENTS documents.

A verdict follows the interval: the rival "beats" the reference where the whole interval is above
0 (for 0/1 scores the exact McNemar test must agree, p < 0.05), "falls short" where it is below 0
(likewise), "matches" where it lies within +-EQUIVALENCE_MARGIN (two one-sided tests at 2.5%
each: equivalence within the margin), and "is undecided at n = N" otherwise. An interval inside
(0, margin) is a win, however small. (Anchor: 818 vs 813 of GSM8K's 1,319, 36 and 31 discordant
questions, gives a paired standard error of 0.62 points.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z_95 = 1.959963984540054  # the two-sided 95% point of the normal distribution
# Scores in [0, 1] (exact match, accuracy): a difference within 2 points, at 95%, is a match.
EQUIVALENCE_MARGIN = 0.02
MIN_DOCUMENTS = 30  # scores other than 0/1: the normal interval needs this many documents


@dataclass(frozen=True)
class PairedComparison:
    """Rival minus reference over the documents both scored."""

    n: int
    difference: float  # mean of the per-document differences
    paired_se: float  # their standard deviation (n - 1) over sqrt(n)
    low: float | None  # the 95% interval (Agresti-Min for 0/1 scores; None: too few documents)
    high: float | None
    binary: bool  # every score 0 or 1
    rival_only: int | None = None  # 0/1 scores: documents only the rival got right
    reference_only: int | None = None  # ... only the reference got right
    mcnemar_p: float | None = None  # exact two-sided McNemar test on those two counts
    unpaired: int = 0  # documents that only one of the two runs scored (left out)

    def interval(self) -> str:
        return "none" if self.low is None else f"[{self.low:+.3f}, {self.high:+.3f}]"


def exact_mcnemar_p(rival_only: int, reference_only: int) -> float:
    """Two-sided exact McNemar p: twice the binomial(b + c, 1/2) tail at min(b, c), at most 1."""
    n, k = rival_only + reference_only, min(rival_only, reference_only)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare_paired(rival: list[list] | None, reference: list[list] | None) -> PairedComparison | None:
    """Pair two runs' [doc_id, score] lists on their common documents; None when either has no
    per-document scores or they share no document."""
    if not rival or not reference:
        return None
    a, b = dict(map(tuple, rival)), dict(map(tuple, reference))
    common = sorted(a.keys() & b.keys())
    if not common:
        return None
    diffs = [a[doc] - b[doc] for doc in common]
    n = len(diffs)
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    se = math.sqrt(variance / n)
    binary = all(a[doc] in (0.0, 1.0) and b[doc] in (0.0, 1.0) for doc in common)
    unpaired = len(a.keys() ^ b.keys())
    if not binary:
        low, high = (mean - Z_95 * se, mean + Z_95 * se) if n >= MIN_DOCUMENTS else (None, None)
        return PairedComparison(n, mean, se, low, high, False, unpaired=unpaired)
    rival_only, reference_only = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    low, high = agresti_min_interval(rival_only, reference_only, n)
    return PairedComparison(n, mean, se, low, high, True, rival_only, reference_only,
                            exact_mcnemar_p(rival_only, reference_only), unpaired)


def agresti_min_interval(rival_only: int, reference_only: int, n: int) -> tuple[float, float]:
    """95% interval of a difference of paired proportions, with half a document added to each
    cell of the 2 x 2 table (Agresti and Min 2005)."""
    b, c, total = rival_only + 0.5, reference_only + 0.5, n + 2
    difference = (b - c) / total
    se = math.sqrt(max(0.0, (b + c) - (b - c) ** 2 / total)) / total
    return difference - Z_95 * se, difference + Z_95 * se


def in_unit_range(scores: list[list] | None) -> bool:
    return bool(scores) and all(0.0 <= value <= 1.0 for _, value in scores)


def paired_verdict(comparison: PairedComparison | None, bounded: bool, margin: float = EQUIVALENCE_MARGIN) -> str:
    """What the 95% interval says of the rival against the reference. `bounded`: scores lie in
    [0, 1], where the equivalence margin means points; elsewhere no match is declared."""
    if comparison is None:
        return "is undecided: no per-document scores to pair"
    if comparison.low is None:
        return f"is undecided at n = {comparison.n}"
    significant = not comparison.binary or comparison.mcnemar_p < 0.05
    if comparison.low > 0 and significant:
        return "beats it"
    if comparison.high < 0 and significant:
        return "falls short"
    if bounded and -margin < comparison.low and comparison.high < margin:
        return f"matches it (within +-{margin:g})"
    return f"is undecided at n = {comparison.n}"


def describe(comparison: PairedComparison | None) -> str:
    """The figures behind a verdict, in words."""
    if comparison is None:
        return "no per-document scores to pair (rows written before melt-bench recorded them)"
    method = "Agresti-Min" if comparison.binary else "normal"
    text = (f"paired over n = {comparison.n} documents: difference {comparison.difference:+.3f}, paired SE "
            f"{comparison.paired_se:.3f}, 95% interval ({method}) {comparison.interval()}")
    if comparison.binary:
        text += (f"; discordant {comparison.rival_only} (rival right only) vs {comparison.reference_only}, "
                 f"exact McNemar p = {comparison.mcnemar_p:.3g}")
    if comparison.unpaired:
        text += f"; {comparison.unpaired} documents scored by one run only, left out"
    return text
