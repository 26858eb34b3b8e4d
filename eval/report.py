"""Markdown tables and PNG figures (matplotlib, Agg backend) for evaluation and ablation reports."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "nmse": False, "nrmse": False, "hfen": False,
                    "dc_nrmse": False, "dc_psnr": True, "dc_band_nrmse": False, "err_band_nrmse": False,
                    "err_null_nrmse": False, "halluc_share": False, "bg_mean": False}


def higher_is_better(metric: str) -> bool:
    """Direction of a metric column (``ssim_uniform7`` counts as ``ssim``); unknown metrics: higher is better."""
    base = "ssim" if metric.startswith("ssim") else metric
    return HIGHER_IS_BETTER.get(base, True)


def fmt(x: float, digits: int = 4) -> str:
    """Compact number: ``inf``/``nan`` as words, otherwise ``digits`` significant figures."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def fmt_ci(mean: float, lo: float, hi: float, digits: int = 4) -> str:
    """``mean [lo, hi]``."""
    return f"{fmt(mean, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def markdown_table(df: pd.DataFrame) -> str:
    """A pipe table of ``df`` (values already formatted or numbers, formatted with ``fmt``)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        cells = [fmt(v) if isinstance(v, float) else str(v) for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(title: str, settings: dict, summary: pd.DataFrame, comparison: pd.DataFrame | None = None,
                     notes: Sequence[str] = (), figures: Sequence[str] = ()) -> str:
    """The evaluation summary: conventions, mean with 95% interval per metric, optional paired comparison."""
    out = [f"# {title}", "", "## Conventions", ""]
    out += [f"- {k}: {v}" for k, v in settings.items()]
    out += ["", "## Metrics (mean [95% bootstrap interval])", "", markdown_table(summary)]
    if comparison is not None and len(comparison):
        out += ["", "## Paired comparison (A = outputs, B = compare; difference A - B)", "",
                markdown_table(comparison)]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    for f in figures:
        out += ["", f"![{Path(f).stem}]({f})"]
    return "\n".join(out) + "\n"


def _show(ax, img: np.ndarray, vmin: float, vmax: float, cmap: str = "gray") -> None:
    ax.imshow(np.clip((img - vmin) / (vmax - vmin), 0, 1) if img.ndim == 3 else img, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_worst_cases(cases: Sequence[dict], path: str | Path) -> str:
    """PNG with one row per case: reference, each output, and its absolute error map (shared scale per row).

    ``cases``: dicts with ``title``, ``reference`` (H, W[, 3]), ``outputs`` (list of (label, image)), ``data_range``.
    """
    ncols = 1 + 2 * max(len(c["outputs"]) for c in cases)
    fig, axes = plt.subplots(len(cases), ncols, figsize=(2.4 * ncols, 2.5 * len(cases)), squeeze=False)
    for r, case in enumerate(cases):
        ref, dr = case["reference"], case["data_range"]
        lo = float(ref.min())
        errs = [np.abs(img - ref) if img.ndim == 2 else np.abs(img - ref).mean(-1) for _, img in case["outputs"]]
        emax = max(float(max(e.max() for e in errs)), 1e-12)
        _show(axes[r, 0], ref, lo, lo + dr)
        axes[r, 0].set_title("reference", fontsize=8)
        axes[r, 0].set_ylabel(case["title"], fontsize=7)
        for i, ((label, img), err) in enumerate(zip(case["outputs"], errs)):
            _show(axes[r, 1 + 2 * i], img, lo, lo + dr)
            axes[r, 1 + 2 * i].set_title(label, fontsize=8)
            axes[r, 2 + 2 * i].imshow(err, cmap="magma", vmin=0, vmax=emax)
            axes[r, 2 + 2 * i].set_title(f"|error| (max {emax:.3g})", fontsize=8)
            axes[r, 2 + 2 * i].set_xticks([])
            axes[r, 2 + 2 * i].set_yticks([])
        for c in range(1 + 2 * len(case["outputs"]), ncols):
            axes[r, c].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def image_grid(rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]], path: str | Path,
               data_range: float | None = None) -> str:
    """PNG grid: ``rows`` = [(row title, [(column label, image), ...]), ...], same intensity scale per row."""
    ncols = max(len(cols) for _, cols in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.2 * ncols, 2.3 * len(rows)), squeeze=False)
    for r, (title, cols) in enumerate(rows):
        lo = min(float(img.min()) for _, img in cols)
        hi = lo + data_range if data_range else max(float(img.max()) for _, img in cols)
        for c in range(ncols):
            ax = axes[r, c]
            if c >= len(cols):
                ax.axis("off")
                continue
            label, img = cols[c]
            _show(ax, img, lo, hi if hi > lo else lo + 1)
            ax.set_title(label, fontsize=7)
            if c == 0:
                ax.set_ylabel(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_metric_vs_param(table: pd.DataFrame, param: str, metric: str, path: str | Path,
                         hue: str | None = None) -> str:
    """Line plot of ``metric`` mean with its interval (columns ``metric``, ``metric_lo``, ``metric_hi``) vs ``param``.

    One line per value of ``hue`` (another flag) when given.
    """
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    groups = table.groupby(hue, dropna=False) if hue else [("all", table)]
    for key, g in groups:
        g = g.sort_values(param)
        x = pd.to_numeric(g[param], errors="coerce")
        x = x if x.notna().all() else g[param].astype(str)
        y, lo, hi = g[metric].to_numpy(float), g[f"{metric}_lo"].to_numpy(float), g[f"{metric}_hi"].to_numpy(float)
        ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], marker="o", capsize=3,
                    label=f"{hue}={key}" if hue else None)
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if hue:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
