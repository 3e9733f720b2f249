"""`confirm`'s statistics against numbers worked out by hand: Welch's one-sided t-test, Holm's
correction over the K top configurations, and the verdict built from them (ties, no spread, too few
seeds, a diverged contender, and a winner that is better alone but not once K are compared)."""

import math
import statistics

import pytest
from scipy import stats

from alexnet.sweep.confirm import ALPHA, holm, verdict, welch

A = [0.80, 0.82, 0.84]  # mean 0.82, variance 4e-4
B = [0.78, 0.79, 0.80]  # mean 0.79, variance 1e-4


def by_hand(a, b):
    """Welch's t, its Welch-Satterthwaite degrees of freedom and the one-sided p that mean(a) > mean(b)."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t, df, stats.t.sf(t, df)


def test_welch_matches_the_hand_computed_t_df_and_one_sided_p():
    t, df, p = by_hand(A, B)
    # se^2 = 4e-4/3 + 1e-4/3, t = 0.03 / sqrt(5e-4/3), df = (5e-4/3)^2 / ((4e-4/3)^2/2 + (1e-4/3)^2/2) = 50/17
    assert t == pytest.approx(2.32379, abs=1e-5) and df == pytest.approx(50 / 17)
    assert p == pytest.approx(0.0522394, abs=1e-6)
    assert welch(A, B, "maximize") == pytest.approx(p, rel=1e-9)
    assert welch(A, B, "minimize") == pytest.approx(1 - p, rel=1e-9)  # lower is better: A is worse
    assert welch(B, A, "minimize") == pytest.approx(p, rel=1e-9)


def test_welch_ties_no_spread_and_too_few_seeds():
    assert welch(A, A, "maximize") == pytest.approx(0.5)  # equal samples: t = 0
    assert welch([0.9, 0.9], [0.8, 0.8], "maximize") == 0.0  # no spread on either side: certain
    assert welch([0.8, 0.8], [0.9, 0.9], "maximize") == 1.0
    assert welch([0.8, 0.8], [0.8, 0.8], "maximize") == 1.0  # a tie without spread is not "better"
    assert welch([0.9, 0.9], [0.8, 0.8], "minimize") == 1.0
    assert math.isnan(welch([0.9], B, "maximize")) and math.isnan(welch(A, [0.8], "maximize"))


def test_holm_adjusts_step_down_and_keeps_the_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 3*0.01; max(2*0.03, ...); 1*0.04 -> 0.06
    assert holm([0.02]) == [0.02]
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([0.03, math.nan]) == pytest.approx([0.06, 1.0])  # a test that could not be made still counts


def row(label, values):
    finite = [v for v in values if math.isfinite(v)]
    return {"label": label, "finite": finite, "mean": statistics.mean(finite) if finite else math.nan}


WINNER = [0.81, 0.83, 0.85]  # 0.04 above B: one-sided p about 0.027 against it


def test_better_alone_but_not_once_three_configurations_are_compared():
    p = by_hand(WINNER, B)[2]
    assert p < ALPHA <= 3 * p  # better alone; not once three are compared
    alone = verdict([row("baseline", B), row("trial 1", WINNER)], "maximize")
    assert alone.words.startswith("yes: trial 1 beats the baseline by +0.0400") and alone.compared == 1
    assert alone.p == pytest.approx(p) and alone.p_uncorrected == pytest.approx(p)

    three = verdict([row("baseline", B), row("trial 1", WINNER), row("trial 2", [0.78, 0.80, 0.81]),
                     row("trial 3", [0.77, 0.79, 0.80])], "maximize")
    assert three.winner["label"] == "trial 1" and three.compared == 3
    assert three.p_uncorrected == pytest.approx(p) and three.p == pytest.approx(3 * p)  # the smallest of the three
    assert three.words.startswith("no: trial 1 is +0.0400 better on average, within seed noise")
    assert "Holm-adjusted over 3 top configurations" in three.words


def test_a_clear_winner_stays_better_after_the_correction():
    v = verdict([row("baseline", B), row("trial 4", [0.90, 0.91, 0.92]), row("trial 5", B)], "maximize")
    assert v.winner["label"] == "trial 4" and v.p < ALPHA and v.words.startswith("yes: trial 4")
    assert v.p == pytest.approx(2 * welch([0.90, 0.91, 0.92], B, "maximize"))


def test_a_diverged_contender_counts_among_those_compared_but_never_wins():
    v = verdict([row("baseline", B), row("trial 1", WINNER), row("trial 2", [math.nan, math.nan, math.nan])],
                "maximize")
    assert v.winner["label"] == "trial 1" and v.compared == 2
    assert v.p == pytest.approx(2 * by_hand(WINNER, B)[2])
    assert verdict([row("baseline", B), row("trial 2", [math.nan] * 3)], "maximize").words == \
        "no top configuration trained without diverging: nothing beats the baseline"
    assert verdict([row("baseline", B)], "maximize").words == "no configuration besides the baseline to compare"


def test_ties_and_minimising():
    tie = verdict([row("baseline", B), row("trial 1", list(B))], "maximize")
    assert tie.words.startswith("no: the baseline (0.7900) is at least as good")
    lower = verdict([row("baseline", [0.50, 0.51, 0.52]), row("trial 1", [0.30, 0.31, 0.32])], "minimize")
    assert lower.words.startswith("yes: trial 1 beats the baseline by -0.2000")


def test_too_few_finite_seeds_cannot_tell():
    v = verdict([row("baseline", B), row("trial 1", [0.9, math.nan, math.nan])], "maximize")
    assert v.words.startswith("cannot tell: trial 1 +0.1100") and math.isnan(v.p)
