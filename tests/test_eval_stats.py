"""Bootstrap intervals and the paired comparison on seeded data."""
import numpy as np
import pytest
from scipy import stats as sps

from bagel_sr.eval import stats


def test_bootstrap_is_seeded_and_contains_mean():
    x = np.random.default_rng(0).normal(30.0, 2.0, size=50)
    a, b = stats.bootstrap_ci(x, n_boot=2000, seed=1), stats.bootstrap_ci(x, n_boot=2000, seed=1)
    assert a == b
    assert stats.bootstrap_ci(x, n_boot=2000, seed=2).lo != a.lo
    assert a.mean == pytest.approx(x.mean()) and a.lo < a.mean < a.hi
    # the percentile interval is close to the normal-theory one for a large normal sample
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    assert (a.hi - a.lo) / 2 == pytest.approx(half, rel=0.15)


def test_bootstrap_coverage():
    rng = np.random.default_rng(3)
    hits = 0
    trials = 200
    for i in range(trials):
        ci = stats.bootstrap_ci(rng.normal(1.0, 1.0, size=40), n_boot=400, seed=i)
        hits += ci.lo <= 1.0 <= ci.hi
    assert 0.88 <= hits / trials <= 0.99


def test_bootstrap_drops_non_finite():
    ci = stats.bootstrap_ci([1.0, 2.0, np.inf, np.nan, 3.0], n_boot=200)
    assert ci.n == 3 and ci.n_dropped == 2 and ci.mean == 2.0
    empty = stats.bootstrap_ci([np.inf], n_boot=10)
    assert empty.n == 0 and np.isnan(empty.mean)


def test_paired_comparison_agrees_with_scipy():
    rng = np.random.default_rng(4)
    b = rng.normal(30.0, 2.0, size=40)
    a = b + rng.normal(0.3, 0.5, size=40)
    res = stats.paired_comparison(a, b, n_boot=2000, seed=0)
    want = sps.wilcoxon(a - b)
    assert res["p_value"] == pytest.approx(want.pvalue) and res["wilcoxon_stat"] == pytest.approx(want.statistic)
    assert res["mean_diff"] == pytest.approx(np.mean(a - b))
    assert res["diff_lo"] < res["mean_diff"] < res["diff_hi"] and res["diff_lo"] > 0
    assert res["n_a_higher"] + res["n_b_higher"] + res["n_ties"] == 40
    assert res == stats.paired_comparison(a, b, n_boot=2000, seed=0)


def test_paired_comparison_edge_cases():
    x = np.arange(5.0)
    same = stats.paired_comparison(x, x, n_boot=100)
    assert same["p_value"] == 1.0 and same["n_ties"] == 5
    dropped = stats.paired_comparison([1.0, np.inf, 3.0, 4.0], [0.5, 1.0, 2.0, 2.5], n_boot=100)
    assert dropped["n"] == 3 and dropped["n_dropped"] == 1
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_comparison([1.0], [1.0, 2.0])
