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

from . import metrics as M  # noqa: E402

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
                     notes: Sequence[str] = (), figures: Sequence[str] = (), labels: tuple[str, str] | None = None,
                     glossary: Sequence[str] = ()) -> str:
    """The evaluation summary: conventions, mean with 95% interval per metric, optional paired comparison of runs
    ``labels`` = (A, B), notes, and ``glossary`` (one line per metric that needs explaining)."""
    out = [f"# {title}", "", "## Conventions", ""]
    out += [f"- {k}: {v}" for k, v in settings.items()]
    out += ["", "## Metrics (mean [95% bootstrap interval])", "", markdown_table(summary)]
    if comparison is not None and len(comparison):
        a, b = labels or ("outputs", "compare")
        out += ["", f"## Paired comparison (A = {a}, B = {b}; difference A - B)", "", markdown_table(comparison)]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if glossary:
        out += ["", "## What the less common metrics mean", ""] + [f"- {g}" for g in glossary]
    for f in figures:
        out += ["", f"![{Path(f).stem}]({f})"]
    return "\n".join(out) + "\n"


def _show(ax, img: np.ndarray, vmin: float, vmax: float, cmap: str = "gray") -> None:
    ax.imshow(np.clip((img - vmin) / (vmax - vmin), 0, 1) if img.ndim == 3 else img, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks([])
    ax.set_yticks([])


def _scores(ref: np.ndarray, img: np.ndarray, dr: float, window: str) -> str:

    if not np.isfinite(img).all():
        return "NaN/Inf output"
    chan = -1 if ref.ndim == 3 else None
    return f"PSNR {fmt(M.psnr(ref, img, dr), 4)} dB, SSIM {fmt(M.ssim(ref, img, dr, window, chan), 3)}"


def plot_worst_cases(cases: Sequence[dict], path: str | Path) -> str:
    """PNG with one row per case: the degraded input (if given), the reference, and for each output the image and
    its absolute error map (with a colour bar; one scale per row). Every image panel is titled with its PSNR/SSIM
    against the reference.

    ``cases``: dicts with ``title``, ``reference`` (H, W[, 3]), ``outputs`` (list of (label, image)), ``data_range``,
    optional ``input`` (image) and ``window`` (SSIM window, default uniform7).
    """
    n_out = max(len(c["outputs"]) for c in cases)
    has_input = any(c.get("input") is not None for c in cases)
    ncols = int(has_input) + 1 + 2 * n_out
    fig, axes = plt.subplots(len(cases), ncols, figsize=(2.7 * ncols, 2.9 * len(cases)), squeeze=False)
    for r, case in enumerate(cases):
        ref, dr, window = case["reference"], case["data_range"], case.get("window", "uniform7")
        lo = float(ref.min())
        errs = [np.abs(img - ref) if img.ndim == 2 else np.abs(img - ref).mean(-1) for _, img in case["outputs"]]
        emax = max([float(np.nanmax(e)) for e in errs if np.isfinite(e).any()] + [1e-12])
        c0 = 0
        if has_input:
            if case.get("input") is not None:
                _show(axes[r, 0], case["input"], lo, lo + dr)
                axes[r, 0].set_title("input\n" + _scores(ref, case["input"], dr, window), fontsize=7)
            else:
                axes[r, 0].axis("off")
            c0 = 1
        _show(axes[r, c0], ref, lo, lo + dr)
        axes[r, c0].set_title("reference", fontsize=8)
        axes[r, 0].set_ylabel(case["title"], fontsize=7)
        two = len(case["outputs"]) > 1
        for i, ((label, img), err) in enumerate(zip(case["outputs"], errs)):
            ax_img, ax_err = axes[r, c0 + 1 + 2 * i], axes[r, c0 + 2 + 2 * i]
            _show(ax_img, img, lo, lo + dr)
            name = (f"{'AB'[i]}: " if two else "") + (label if len(label) <= 40 else label[:37] + "...")
            ax_img.set_title(f"{name}\n" + _scores(ref, img, dr, window), fontsize=7)
            im = ax_err.imshow(err, cmap="magma", vmin=0, vmax=emax)
            ax_err.set_title(f"|error| of {'AB'[i]}" if two else "|error|", fontsize=7)
            ax_err.set_xticks([])
            ax_err.set_yticks([])
            bar = fig.colorbar(im, ax=ax_err, fraction=0.046, pad=0.03)
            bar.ax.tick_params(labelsize=6)
            bar.set_label("x data range" if dr == 1 else "image units", fontsize=6)
        for c in range(c0 + 1 + 2 * len(case["outputs"]), ncols):
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
                         hue: str | Sequence[str] | None = None, title: str | None = None) -> str:
    """Line plot of ``metric`` mean with its interval (columns ``metric``, ``metric_lo``, ``metric_hi``) vs ``param``.

    One line per value (or combination of values) of ``hue`` (the other flags), with a legend; points of the lines
    are shifted a little along x so that their intervals do not hide each other.
    """
    hues = [hue] if isinstance(hue, str) else list(hue or [])
    fig, ax = plt.subplots(figsize=(8.0 if hues else 5.5, 3.8))
    groups = list(table.groupby(hues, dropna=False)) if hues else [((), table)]
    x_all = pd.to_numeric(table[param], errors="coerce")
    numeric = bool(x_all.notna().all())
    span = float(x_all.max() - x_all.min()) if numeric and len(x_all) else 0.0
    for j, (key, g) in enumerate(groups):
        g = g.sort_values(param)
        key = key if isinstance(key, tuple) else (key,)
        x = pd.to_numeric(g[param], errors="coerce") if numeric else g[param].astype(str)
        if numeric and len(groups) > 1:
            x = x + (j - (len(groups) - 1) / 2) * 0.012 * (span or 1.0)
        y, lo, hi = g[metric].to_numpy(float), g[f"{metric}_lo"].to_numpy(float), g[f"{metric}_hi"].to_numpy(float)
        label = ", ".join(f"{h}={v}" for h, v in zip(hues, key)) if hues else None
        ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], marker="o", capsize=3,
                    label=label)
    ax.set_xlabel(param)
    ax.set_ylabel(f"{metric} (mean, 95% CI)")
    ax.set_title(title or f"{metric} vs {param}" + (f", one line per {', '.join(hues)}" if hues else ""),
                 fontsize=9)
    ax.grid(alpha=0.3)
    if hues:
        ax.legend(fontsize=7, title=" / ".join(hues), title_fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
