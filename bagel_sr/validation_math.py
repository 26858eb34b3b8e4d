"""The pure pieces of validation during training: which val images, which rank restores which, how an image pair
is scored (:mod:`bagel_sr.image_metrics`, the evaluation's functions and conventions), how the ranks' scores are
summed, the picture of a validation and its CSV line.

Conventions (as ``bagel_sr.eval.evaluate``): integer images are divided by their dtype's maximum, so they are in
[0, 1] with ``data_range`` 1; an image whose RGB channels agree is gray (``--color gray``); a gray truth is compared
with the luma ``0.299 R + 0.587 G + 0.114 B`` of a colour restoration (``--color luma``), a colour truth channel by
channel (``--color rgb``); a CT set (manifest ``intensity.unit == "HU"``) is compared in the HU window :data:`CT_WINDOW`.
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import image_metrics as M

#: (level, width) in HU of the window CT val images are compared in (soft tissue).
CT_WINDOW = (40.0, 400.0)
HALLUCINATION_THRESHOLD = 0.1
#: The summed quantities, in the order of the all-reduced vector.
TOTALS = ("images", "psnr", "ssim", "halluc")
LOG_KEYS = ("val_psnr", "val_ssim", "val_halluc")
GRID_IMAGES = 4
_LUMA = np.array([0.299, 0.587, 0.114])


def choose_subset(num_images: int, k: int, seed: int) -> List[int]:
    """``k`` of ``range(num_images)`` chosen by ``seed`` (the same on every rank and every validation), sorted."""
    gen = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(int(num_images), generator=gen)[: int(k)].tolist())


def shard(indices: Sequence[int], rank: int, world: int) -> List[Optional[int]]:
    """Rank ``rank``'s share of ``indices`` (round robin), padded with None to ``ceil(len / world)`` entries so every
    rank runs the same number of restorations (a None slot repeats a real one and is not counted)."""
    per_rank = -(-len(indices) // max(int(world), 1))
    mine: List[Optional[int]] = list(indices[rank::world])
    return mine + [None] * (per_rank - len(mine))


def unit(array: np.ndarray) -> np.ndarray:
    """An image as float64 in [0, 1]: integers divided by their dtype's maximum, floats unchanged."""
    a = np.asarray(array)
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.float64) / float(np.iinfo(a.dtype).max)
    return a.astype(np.float64)


def _gray_if_equal(x: np.ndarray) -> np.ndarray:
    """(H, W) for a gray image, also one stored as RGB(A) with equal colour channels (alpha dropped)."""
    if x.ndim == 3:
        x = x[..., :3] if x.shape[-1] >= 3 else x[..., 0]
    if x.ndim == 3 and (x == x[..., :1]).all():
        return x[..., 0]
    return x


def comparable(truth: np.ndarray, restored: np.ndarray, intensity: Optional[dict] = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(ref, pred)`` as the metrics see them: [0, 1], luma of an RGB restoration against a gray truth, alpha
    dropped, and CT (``intensity`` in HU) through :data:`CT_WINDOW`."""
    ref, pred = _gray_if_equal(unit(truth)), _gray_if_equal(unit(restored))
    if ref.ndim == 2 and pred.ndim == 3:  # a gray truth: the restoration's luma (evaluate's --color luma)
        pred = pred @ _LUMA
    if ref.ndim == 3 and pred.ndim == 2:
        pred = np.repeat(pred[..., None], 3, axis=-1)
    if intensity and intensity.get("unit") == "HU" and "low" in intensity and "high" in intensity:
        lo, hi = float(intensity["low"]), float(intensity["high"])
        ref, pred = (M.hu_window(lo + x * (hi - lo), *CT_WINDOW) for x in (ref, pred))
    return ref, pred


def scores(ref: np.ndarray, pred: np.ndarray) -> Dict[str, float]:
    """PSNR, SSIM (uniform7) and hallucination share of one pair in [0, 1] (``data_range`` 1)."""
    chan = -1 if ref.ndim == 3 else None
    return {"psnr": M.psnr(ref, pred, 1.0), "ssim": M.ssim(ref, pred, 1.0, "uniform7", chan),
            "halluc": M.hallucination_share(ref, pred, 1.0, HALLUCINATION_THRESHOLD)}


def totals(rows: Sequence[Dict[str, float]]) -> torch.Tensor:
    """``(len(TOTALS),)`` float64: the count and the sums of one rank's scores (all-reduce it with SUM)."""
    return torch.tensor([float(len(rows))] + [float(sum(r[k] for r in rows)) for k in TOTALS[1:]], dtype=torch.float64)


def means(summed: torch.Tensor) -> Dict[str, float]:
    """``{"val_psnr": ..., "val_ssim": ..., "val_halluc": ...}`` from summed :func:`totals` (mean over images)."""
    n = max(float(summed[0]), 1.0)
    return {f"val_{k}": float(summed[i]) / n for i, k in enumerate(TOTALS) if i > 0}


def error_map(ref: np.ndarray, pred: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """``|pred - ref| * gain`` clipped to [0, 1] (channels averaged): the error column of the grid."""
    err = np.abs(pred - ref)
    return np.clip((err.mean(-1) if err.ndim == 3 else err) * gain, 0.0, 1.0)


def grid(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """uint8 ``(H_total, W_total, 3)``: one row per image of [0, 1] panels (input | restoration | truth | error),
    each panel padded to the largest panel with black, 2-pixel white gutters."""
    panels = [[np.repeat(p[..., None], 3, -1) if p.ndim == 2 else p[..., :3] for p in row] for row in rows]
    h = max(p.shape[0] for row in panels for p in row)
    w = max(p.shape[1] for row in panels for p in row)
    cols = max(len(row) for row in panels)
    gap = 2
    out = np.ones((len(panels) * (h + gap) + gap, cols * (w + gap) + gap, 3))
    for i, row in enumerate(panels):
        for j, p in enumerate(row):
            y, x = gap + i * (h + gap), gap + j * (w + gap)
            out[y:y + h, x:x + w] = 0.0
            out[y:y + p.shape[0], x:x + p.shape[1]] = np.clip(p, 0.0, 1.0)
    return np.round(out * 255).astype(np.uint8)


def append_csv(path: str | os.PathLike, row: Dict[str, object]) -> None:
    """Append ``row`` to the CSV at ``path`` (header written when the file is new or empty)."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
