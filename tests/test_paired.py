"""Paired comparison of two accuracy runs over the same documents (#31 item 4)."""

import pytest

from melt_bench.reporting.paired import compare_paired, exact_mcnemar_p, in_unit_range, paired_verdict


def gsm8k_anchor():
    """818 vs 813 of GSM8K's 1,319: 36 questions only the first answers, 31 only the second."""
    first = [[doc, float(doc < 782 + 36)] for doc in range(1319)]  # 782 both right + 36
    second = [[doc, float(doc < 782 or 818 <= doc < 818 + 31)] for doc in range(1319)]
    return first, second


def test_the_published_gsm8k_comparison_gives_its_paired_standard_error():
    first, second = gsm8k_anchor()
    assert sum(v for _, v in first) == 818 and sum(v for _, v in second) == 813
    paired = compare_paired(first, second)
    assert paired.n == 1319 and paired.binary and (paired.rival_only, paired.reference_only) == (36, 31)
    assert paired.difference == pytest.approx(5 / 1319)
    assert round(paired.paired_se * 100, 2) == 0.62  # points, as published
    assert paired.low == pytest.approx(5 / 1319 - 1.96 * paired.paired_se, abs=1e-4)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert paired.mcnemar_p == pytest.approx(scipy_stats.binomtest(31, 67, 0.5).pvalue, rel=1e-12)
    # Agresti-Min's interval, a 5-question lead: [-0.008, +0.016], within 2 points, so a match
    assert (round(paired.low, 3), round(paired.high, 3)) == (-0.008, 0.016)
    assert paired_verdict(paired, bounded=True) == "matches it (within +-0.02)"
    assert paired_verdict(paired, bounded=True, margin=0.01) == "is undecided at n = 1319"


def test_the_interval_alone_decides():
    everyone = [[doc, 1.0] for doc in range(100)]
    fewer = [[doc, float(doc >= 20)] for doc in range(100)]
    assert paired_verdict(compare_paired(everyone, fewer), True) == "beats it"
    assert paired_verdict(compare_paired(fewer, everyone), True) == "falls short"
    # one discordant document in 20: the unpaired one-sigma rule called it a match
    small = compare_paired([[d, float(d < 11)] for d in range(20)], [[d, float(d < 10)] for d in range(20)])
    assert small.low < 0 < small.high and paired_verdict(small, True) == "is undecided at n = 20"
    # scores outside [0, 1] (a perplexity) have no margin in points: never a match
    values = [[d, 5.0 + d % 2] for d in range(50)]
    assert not in_unit_range(values) and paired_verdict(compare_paired(values, values), False) == \
        "is undecided at n = 50"


def test_a_handful_of_documents_decides_nothing():
    """Where the plain Wald interval collapses to a point (every difference alike), the adjusted
    interval and the exact test keep a few documents from deciding."""
    three_wins = compare_paired([[d, 1.0] for d in range(3)], [[d, 0.0] for d in range(3)])
    assert three_wins.paired_se == 0 and three_wins.mcnemar_p == 0.25
    assert paired_verdict(three_wins, True) == "is undecided at n = 3"
    five_alike = compare_paired([[d, 1.0] for d in range(5)], [[d, 1.0] for d in range(5)])
    assert paired_verdict(five_alike, True) == "is undecided at n = 5"
    # 5 discordant documents, all one way, in 100: the interval clears 0 but McNemar's p = 0.0625
    five_of_100 = compare_paired([[d, float(d < 5)] for d in range(100)], [[d, 0.0] for d in range(100)])
    assert five_of_100.low > 0 and five_of_100.mcnemar_p == 0.0625
    assert paired_verdict(five_of_100, True) == "is undecided at n = 100"
    # scores other than 0/1 get no interval below 30 documents
    few = compare_paired([[d, 2.5 + d] for d in range(10)], [[d, 1.0 + d] for d in range(10)])
    assert few.low is None and paired_verdict(few, False) == "is undecided at n = 10"


def test_only_documents_both_runs_scored_are_paired():
    a = [[d, 1.0] for d in range(10)]
    b = [[d, 0.0] for d in range(5, 15)]
    paired = compare_paired(a, b)
    assert paired.n == 5 and paired.unpaired == 10 and paired.difference == 1.0
    assert compare_paired(a, None) is None and compare_paired(a, [[99, 1.0]]) is None
    assert paired_verdict(None, True) == "is undecided: no per-document scores to pair"


def test_exact_mcnemar_edges():
    assert exact_mcnemar_p(0, 0) == 1.0 and exact_mcnemar_p(3, 3) == 1.0
    assert exact_mcnemar_p(10, 0) == pytest.approx(2 / 2**10)
