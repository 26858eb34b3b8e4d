"""Tables of an evaluation: which rows are units, their means with bootstrap intervals, failures (outputs that
held NaN/Inf: counted, never averaged) and the paired comparison of two runs (failures scored as losses).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from . import report, stats


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The metric columns present in a per-image or per-volume table, in a fixed order."""
    order = ["psnr", "ssim_uniform7", "ssim_gaussian11", "nmse", "nrmse", "hfen", "lpips", "dc_psnr", "dc_nrmse",
             "dc_ref_nrmse", "dc_band_nrmse", "null_energy_fraction", "err_band_nrmse", "err_null_nrmse",
             "halluc_share", "bg_mean", "std_spearman", "std_within_2"]
    return [c for c in order if c in df.columns and pd.to_numeric(df[c], errors="coerce").notna().any()]


def unit_table(per_image: pd.DataFrame, per_volume: pd.DataFrame | None) -> tuple[pd.DataFrame, str, str]:
    """The table whose rows are independent units (volumes when known, else images), its unit and key column."""
    if per_volume is not None and len(per_volume):
        return per_volume, "volume", "volume_id"
    return per_image, "image", "pair_id"


SUMMARY_COLUMNS = ["metric", "unit", "n", "n_failed", "n_dropped", "mean", "ci_lo", "ci_hi"]


def failed_units(table: pd.DataFrame) -> pd.Series:
    """Boolean per row: the unit's output (or one of its slices) held NaN/Inf."""
    if "nonfinite" not in table.columns:
        return pd.Series(False, index=table.index)
    return table["nonfinite"].fillna(False).astype(bool)


def summarize(table: pd.DataFrame, unit: str, n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """One row per metric: mean and bootstrap 95% interval over the units whose output is finite, their number,
    the failed units (non-finite output; never averaged, always counted) and dropped non-finite metric values
    (e.g. the inf PSNR of an identical pair)."""
    ok = table[~failed_units(table)]
    n_failed = int(failed_units(table).sum())
    rows = []
    for m in metric_columns(table):
        ci = stats.bootstrap_ci(pd.to_numeric(ok[m], errors="coerce"), n_boot=n_boot, seed=seed)
        rows.append({"metric": m, "unit": unit, "n": ci.n, "n_failed": n_failed, "n_dropped": ci.n_dropped,
                     "mean": ci.mean, "ci_lo": ci.lo, "ci_hi": ci.hi})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def failure_score(values: np.ndarray, higher_is_better: bool) -> float:
    """The value a failed unit gets in a paired comparison: one observed range worse than the worst finite value
    of either run (so a failure always loses against an output, and ties with another failure)."""
    v = values[np.isfinite(values)]
    if not v.size:
        return 0.0
    spread = float(v.max() - v.min()) or 1.0
    return float(v.min() - spread) if higher_is_better else float(v.max() + spread)


def compare_tables(a: pd.DataFrame, b: pd.DataFrame, key: str, n_boot: int = 10000,
                   seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Paired comparison of two runs' unit tables joined on ``key``: (per-unit differences, per-metric tests)."""
    metrics = [m for m in metric_columns(pd.concat([a, b])) if m != "dc_ref_nrmse"]  # dc_ref: same in both runs
    cols = [key, "nonfinite", *metrics]
    joined = a.reindex(columns=cols).merge(b.reindex(columns=cols), on=key, suffixes=("_a", "_b"))
    if len(joined) < len(a) or len(joined) < len(b):
        warnings.warn(f"paired comparison on {len(joined)} common units (A has {len(a)}, B has {len(b)})")
    diffs, tests = joined[[key]].copy(), []
    fail_a = joined["nonfinite_a"].fillna(False).to_numpy(bool)
    fail_b = joined["nonfinite_b"].fillna(False).to_numpy(bool)
    for m in metrics:
        va, vb = joined[f"{m}_a"].to_numpy(float), joined[f"{m}_b"].to_numpy(float)
        if fail_a.any() or fail_b.any():  # failures are scored, not dropped
            worst = failure_score(np.concatenate([va[~fail_a], vb[~fail_b]]), report.higher_is_better(m))
            va, vb = np.where(fail_a, worst, va), np.where(fail_b, worst, vb)
        with np.errstate(invalid="ignore"):  # inf - inf (two identical pairs' PSNR) is NaN, dropped later
            diffs[f"{m}_a"], diffs[f"{m}_b"], diffs[f"{m}_diff"] = va, vb, va - vb
        tests.append({"metric": m, **stats.paired_comparison(va, vb, n_boot=n_boot, seed=seed)})
    return diffs, pd.DataFrame(tests)


def _summary_view(summary: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"metric": summary["metric"],
                         "mean [95% CI]": [report.fmt_ci(r.mean, r.ci_lo, r.ci_hi) for r in summary.itertuples()],
                         "n": summary["n"], "unit": summary["unit"],
                         "failed (NaN/Inf output)": summary["n_failed"],
                         "non-finite metric dropped": summary["n_dropped"]})


def _comparison_view(tests: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"metric": tests["metric"], "mean A": tests["mean_a"], "mean B": tests["mean_b"],
                         "A - B [95% CI]": [report.fmt_ci(r.mean_diff, r.diff_lo, r.diff_hi)
                                            for r in tests.itertuples()],
                         "Wilcoxon p": tests["p_value"],
                         "A better / B better / ties": [
                             f"{a}/{b}/{t}" if report.higher_is_better(m) else f"{b}/{a}/{t}"
                             for m, a, b, t in zip(tests["metric"], tests["n_a_higher"], tests["n_b_higher"],
                                                   tests["n_ties"])],
                         "n": tests["n"]})
