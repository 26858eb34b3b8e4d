"""Uncertainty for evaluation means: percentile bootstrap intervals and paired comparisons of two runs.

Units: pass one value per independent unit. When slices come from volumes, pass per-volume means (slices of one
volume are correlated; resampling them as if independent makes intervals too narrow). Non-finite values
(e.g. ``inf`` PSNR of an identical pair) are dropped and counted, never averaged.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats as sps


@dataclass
class BootstrapCI:
    """Mean of ``n`` finite values with a percentile bootstrap interval [lo, hi]."""

    mean: float
    lo: float
    hi: float
    n: int
    n_dropped: int
    confidence: float
    n_boot: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def _finite(values: Sequence[float]) -> tuple[np.ndarray, int]:
    v = np.asarray(values, dtype=np.float64).ravel()
    keep = np.isfinite(v)
    return v[keep], int((~keep).sum())


def bootstrap_means(values: np.ndarray, n_boot: int, seed: int, chunk: int = 1000) -> np.ndarray:
    """``n_boot`` means of resamples (with replacement) of 1-D ``values``; deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    n = values.size
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        out[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return out


def bootstrap_ci(values: Sequence[float], n_boot: int = 10000, confidence: float = 0.95,
                 seed: int = 0) -> BootstrapCI:
    """Mean and percentile bootstrap interval of the finite entries of ``values`` (1-D)."""
    v, dropped = _finite(values)
    if v.size == 0:
        nan = float("nan")
        return BootstrapCI(nan, nan, nan, 0, dropped, confidence, n_boot)
    means = bootstrap_means(v, n_boot, seed)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return BootstrapCI(float(v.mean()), float(lo), float(hi), int(v.size), dropped, confidence, n_boot)


def paired_comparison(a: Sequence[float], b: Sequence[float], n_boot: int = 10000, confidence: float = 0.95,
                      seed: int = 0) -> dict[str, float]:
    """Compare paired per-unit values of run A and run B (same units, same order); differences are ``a - b``.

    Returns the mean difference with its bootstrap interval, the two-sided Wilcoxon signed-rank test
    (``scipy.stats.wilcoxon``, default zero handling ``"wilcox"``), and how many units each run wins.
    Pairs where either value is non-finite are dropped (``n_dropped``).
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs equal lengths, got {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    ci = bootstrap_ci(d, n_boot, confidence, seed)
    stat, p = float("nan"), float("nan")
    if np.all(d == 0):
        p = 1.0
    elif d.size > 0:
        res = sps.wilcoxon(d)
        stat, p = float(res.statistic), float(res.pvalue)
    return {"n": int(d.size), "n_dropped": int((~keep).sum()), "mean_a": float(a[keep].mean()) if d.size else np.nan,
            "mean_b": float(b[keep].mean()) if d.size else np.nan, "mean_diff": ci.mean, "diff_lo": ci.lo,
            "diff_hi": ci.hi, "wilcoxon_stat": stat, "p_value": p, "n_a_higher": int((d > 0).sum()),
            "n_b_higher": int((d < 0).sum()), "n_ties": int((d == 0).sum())}
